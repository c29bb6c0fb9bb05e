"""What the sync and async clients share: channel set-up, request builders, reply decoders, results."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from gradserve.v1 import gradserve_pb2 as pb

from . import codec, streaming

__all__ = ["ChannelSettings", "ForwardBackwardResult", "FunctionInfo", "Outputs"]

Outputs = torch.Tensor | tuple[torch.Tensor, ...]

# A server restarting (a rolling update, a crash) is UNAVAILABLE for a moment: retry
# then, with gRPC's own retry policy, and reconnect quickly. Limits on sizes are the
# server's to enforce, so the client sets none of its own.
_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": "gradserve.v1.GradientService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
_DEFAULT_OPTIONS: dict[str, Any] = {
    "grpc.max_receive_message_length": -1,
    "grpc.max_send_message_length": -1,
    "grpc.service_config": json.dumps(_SERVICE_CONFIG),
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2000,
}


@dataclass(frozen=True)
class ChannelSettings:
    """How to reach a server: TLS, mutual TLS, a bearer token, channel options.

    Attributes
    ----------
    tls : bool
        Use TLS. Implied by any certificate argument.
    root_certificates, private_key, certificate_chain : bytes or None
        PEM bytes: the CA to trust (None: the system's), and the client's key and
        certificate for mutual TLS.
    token : str or None
        Sent as ``authorization: Bearer <token>`` on every call.
    options : sequence of (str, Any)
        gRPC channel options, overriding the defaults (no client-side size limit;
        retry on UNAVAILABLE up to 5 attempts with 0.1-2 s backoff; reconnect
        backoff 0.1-2 s).
    """

    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    token: str | None = None
    options: Sequence[tuple[str, Any]] = ()

    @property
    def secure(self) -> bool:
        return self.tls or any(x is not None for x in (self.root_certificates, self.private_key, self.certificate_chain))

    def channel_options(self) -> list[tuple[str, Any]]:
        return list((_DEFAULT_OPTIONS | dict(self.options)).items())

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def open_channel(self, target: str, api: Any = grpc) -> Any:
        """A channel to ``target`` from ``api``: ``grpc`` (sync) or ``grpc.aio`` (asyncio)."""
        if self.secure:
            return api.secure_channel(target, self.credentials(), options=self.channel_options())
        return api.insecure_channel(target, options=self.channel_options())

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


@dataclass(frozen=True)
class FunctionInfo:
    """A Function the server serves.

    Attributes
    ----------
    name : str
        Name to call it by.
    num_inputs : int or None
        Positional arguments it takes; None when it takes ``*args``.
    doc : str
        First paragraph of its docstring.
    kind : str
        ``"autograd.Function"`` or ``"callable"``.
    version : str
        Version of its code on the server.
    unavailable_reason : str
        Empty when served; else why not (e.g. it failed the server's start-up gradcheck).
    """

    name: str
    num_inputs: int | None
    doc: str
    kind: str
    version: str
    unavailable_reason: str = ""


@dataclass(frozen=True)
class ForwardBackwardResult:
    """Outputs and input gradients of one forward + backward.

    Attributes
    ----------
    outputs : Tensor or tuple of Tensor
        As :meth:`GradientClient.forward` returns them.
    grads : tuple of (Tensor or None)
        One entry per argument, aligned with the arguments: the gradient, on the
        argument's device and dtype, or None where the argument is not a tensor with
        ``requires_grad=True`` or the Function returned no gradient for it.
    """

    outputs: Outputs
    grads: tuple[torch.Tensor | None, ...]


@dataclass(frozen=True)
class Forwarded:
    """A forward whose graph the server may keep (the autograd step's view)."""

    outputs: tuple[torch.Tensor, ...]
    returns_tuple: bool
    differentiable: tuple[bool, ...]
    handle: str
    version: str


# -- requests ------------------------------------------------------------------------------

Payloads = list[torch.Tensor] | None
"""Tensor bytes sent outside the message (StreamCall), or None to send them inline."""


def payload_list(threshold_bytes: int, *groups: Sequence[Any]) -> Payloads:
    """A list to collect tensor bytes in when the tensors of ``groups`` total more than
    ``threshold_bytes`` (the call is then streamed), else None (a unary call)."""
    total = sum(t.numel() * t.element_size() for group in groups for t in group if isinstance(t, torch.Tensor))
    return [] if total > threshold_bytes else None


def encode_args(args: Sequence[Any], requires_grad: Sequence[bool] | None = None, payloads: Payloads = None) -> list[pb.Value]:
    """Positional arguments as Values; ``requires_grad`` overrides each tensor's own flag."""
    if requires_grad is None:
        return [codec.encode_value(a, payloads=payloads) for a in args]
    return [
        pb.Value(tensor=codec.encode_tensor(a, requires_grad=rg, payloads=payloads))
        if isinstance(a, torch.Tensor)
        else codec.encode_value(a)
        for a, rg in zip(args, requires_grad)
    ]


def as_grad_outputs(grad_outputs: torch.Tensor | Sequence[torch.Tensor | None] | None) -> Sequence[torch.Tensor | None]:
    """A bare tensor stands for a one-output Function's cotangent; None for none given."""
    if grad_outputs is None:
        return ()
    return (grad_outputs,) if isinstance(grad_outputs, torch.Tensor) else grad_outputs


def encode_grad_outputs(grad_outputs: Sequence[torch.Tensor | None], payloads: Payloads = None) -> list[pb.MaybeTensor]:
    return [codec.encode_maybe_tensor(g, payloads=payloads) for g in grad_outputs]


def forward_request(name: str, args: Sequence[Any], payloads: Payloads = None) -> pb.ForwardRequest:
    """A plain forward: no gradients wanted, so the server records no graph."""
    return pb.ForwardRequest(function=name, args=encode_args(args, [False] * len(args), payloads))


def forward_backward_request(
    name: str, args: Sequence[Any], grad_outputs: Sequence[torch.Tensor | None], payloads: Payloads = None
) -> pb.ForwardBackwardRequest:
    # Slot order: args (field 2) are encoded before grad_outputs (field 3).
    values = encode_args(args, payloads=payloads)
    return pb.ForwardBackwardRequest(function=name, args=values, grad_outputs=encode_grad_outputs(grad_outputs, payloads))


# -- replies ---------------------------------------------------------------------------------


def home_device(args: Sequence[Any]) -> torch.device:
    """Where outputs go: the first tensor argument's device, else the CPU."""
    return next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))


def decode_outputs(
    messages: Sequence[pb.Tensor], returns_tuple: bool, args: Sequence[Any], payloads: Iterator[torch.Tensor] | None = None
) -> Outputs:
    """Outputs on the caller's device, shaped like the Function's return."""
    device = home_device(args)
    outputs = tuple(codec.decode_tensor(m, what=f"output {i}", payloads=payloads).to(device) for i, m in enumerate(messages))
    return outputs if returns_tuple else outputs[0]


def decode_grads(
    messages: Sequence[pb.MaybeTensor], args: Sequence[Any], payloads: Iterator[torch.Tensor] | None = None
) -> tuple[torch.Tensor | None, ...]:
    """Gradients aligned with ``args``, each on its argument's device and dtype."""
    if len(messages) != len(args):
        raise codec.CodecError(f"server sent {len(messages)} gradients for {len(args)} arguments")
    grads: list[torch.Tensor | None] = []
    for i, (m, arg) in enumerate(zip(messages, args)):
        g = codec.decode_maybe_tensor(m, what=f"gradient {i}", payloads=payloads)
        if g is not None and isinstance(arg, torch.Tensor):
            g = g.to(device=arg.device, dtype=arg.dtype)
        grads.append(g)
    return tuple(grads)


def forward_backward_result(
    response: pb.ForwardBackwardResponse, args: Sequence[Any], payloads: Iterator[torch.Tensor] | None = None
) -> ForwardBackwardResult:
    return ForwardBackwardResult(
        outputs=decode_outputs(response.outputs, response.returns_tuple, args, payloads),
        grads=decode_grads(response.grads, args, payloads),
    )


def forwarded(response: pb.ForwardResponse, args: Sequence[Any], payloads: Iterator[torch.Tensor] | None = None) -> Forwarded:
    return Forwarded(
        outputs=decode_outputs(response.outputs, True, args, payloads),
        returns_tuple=response.returns_tuple,
        differentiable=tuple(t.requires_grad for t in response.outputs),
        handle=response.handle,
        version=response.version,
    )


def move_data_out(request: Any) -> list[torch.Tensor]:
    """Turn an inline request into a stream header: empty its tensors' data, return the payloads.

    For a call the server refused as unary because its reply would pass 2 GiB
    (reason RESPONSE_TOO_LARGE): it is repeated through StreamCall.
    """
    payloads = []
    for slot in streaming.tensor_slots(request):
        payloads.append(
            torch.frombuffer(bytearray(slot.data), dtype=torch.uint8) if slot.data else torch.empty(0, dtype=torch.uint8)
        )
        slot.data = b""
    return payloads


def stream_requests(kind: str, header: Any, payloads: list[torch.Tensor]) -> Iterator[pb.StreamRequest]:
    """A StreamCall's messages: the header, then the payloads in chunks."""
    yield pb.StreamRequest(**{kind: header})
    for chunk in streaming.chunks(payloads):
        yield pb.StreamRequest(data=chunk)


def read_stream_header(first: pb.StreamResponse | None, kind: str) -> tuple[Any, streaming.Assembler]:
    """The response header of a StreamCall, and an assembler for its data chunks."""
    if first is None or first.WhichOneof("part") != kind:
        raise codec.CodecError(f"StreamCall: expected a {kind} header first, got {first and first.WhichOneof('part')}")
    header = getattr(first, kind)
    return header, streaming.Assembler(header, what=f"{kind} response")


def function_infos(response: pb.ListFunctionsResponse) -> list[FunctionInfo]:
    return [
        FunctionInfo(
            name=f.name,
            num_inputs=f.num_inputs if f.HasField("num_inputs") else None,
            doc=f.doc,
            kind=f.kind,
            version=f.version,
            unavailable_reason=f.unavailable_reason,
        )
        for f in response.functions
    ]
