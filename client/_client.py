"""``GradientClient``: outputs and gradients of remote autograd Functions."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

from . import codec
from ._errors import HandleNotFoundError, from_rpc_error

__all__ = ["ForwardBackwardResult", "FunctionInfo", "GradientClient"]

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
class _Forwarded:
    outputs: tuple[torch.Tensor, ...]
    returns_tuple: bool
    differentiable: tuple[bool, ...]
    handle: str


class GradientClient:
    """Client of a gradserve server. A context manager; one instance is safe to share between threads.

    Parameters
    ----------
    target
        ``host:port`` of the server, or any gRPC target (``dns:///svc:50051``).
    timeout
        Default deadline of every call, in seconds; None waits as long as it takes.
        Each method also takes its own ``timeout``.
    channel
        Use this channel instead of opening an insecure one to ``target``; the client
        does not close a channel it did not open.
    options
        Extra gRPC channel options, as ``(name, value)`` pairs; they override the
        defaults (no client-side size limit, retry on UNAVAILABLE up to 5 attempts
        with 0.1-2 s backoff, reconnect backoff 0.1-2 s).

    Tensors may come on any device and in any supported dtype; outputs come back on
    the device of the first tensor argument (CPU when there is none) and gradients on
    their argument's device and dtype.

    Errors: every method raises :class:`gradserve.client.GradServeError` subclasses
    for failed calls (``.code`` is a ``grpc.StatusCode``) and
    :class:`gradserve.client.codec.CodecError` (a ValueError) for arguments that
    cannot be encoded, before anything is sent.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._owns_channel = channel is None
        self._channel = channel or grpc.insecure_channel(target, options=list((_DEFAULT_OPTIONS | dict(options)).items()))
        self._stub = pb_grpc.GradientServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel (if this client opened it). Calls in flight are cancelled."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> GradientClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ------------------------------------------------------------------

    def list_functions(self, *, timeout: float | None = None) -> list[FunctionInfo]:
        """The Functions the server serves, sorted by name."""
        response = self._call(self._stub.ListFunctions, pb.ListFunctionsRequest(), timeout)
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

    def forward(self, name: str, *args: Any, timeout: float | None = None) -> Outputs:
        """Run the Function's forward on the server; no graph is kept.

        Parameters
        ----------
        name
            Registered name.
        *args
            Positional arguments: tensors (any device, dtype, strides), numpy arrays,
            bool, int, float, str or None.

        Returns
        -------
        Tensor or tuple of Tensor
            Shaped like the Function's return; on the first tensor argument's device;
            detached (use :meth:`function` to join your autograd graph).
        """
        # No gradients are wanted here, so the server need not record a graph.
        request = pb.ForwardRequest(function=name, args=_encode_args(args, [False] * len(args)))
        response = self._call(self._stub.Forward, request, timeout)
        outputs = _decode_outputs(response.outputs, _home_device(args))
        return tuple(outputs) if response.returns_tuple else outputs[0]

    def forward_backward(
        self,
        name: str,
        *args: Any,
        grad_outputs: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        timeout: float | None = None,
    ) -> ForwardBackwardResult:
        """Forward and backward in one round trip; the server keeps nothing.

        Parameters
        ----------
        name, *args
            As :meth:`forward`. Gradients are computed for the tensor arguments with
            ``requires_grad=True``, as torch would.
        grad_outputs
            The vector of the vector-Jacobian product: one tensor (or None) per
            output, each with its output's shape and dtype; a bare tensor for a
            Function returning one tensor. None means ones for every differentiable
            output (the gradient of ``outputs.sum()``).

        Returns
        -------
        ForwardBackwardResult
            ``.outputs`` as :meth:`forward`; ``.grads`` aligned with ``args``.
        """
        request = pb.ForwardBackwardRequest(
            function=name,
            args=[codec.encode_value(a) for a in args],
            grad_outputs=_encode_grad_outputs(grad_outputs),
        )
        response = self._call(self._stub.ForwardBackward, request, timeout)
        outputs = _decode_outputs(response.outputs, _home_device(args))
        return ForwardBackwardResult(
            outputs=tuple(outputs) if response.returns_tuple else outputs[0],
            grads=_decode_grads(response.grads, args),
        )

    def function(self, name: str, *, timeout: float | None = None) -> Callable[..., Outputs]:
        """A callable running the remote Function as one differentiable step of your graph.

        ``y = client.function("square")(x)`` runs the forward on the server (which
        keeps the graph); ``y.sum().backward()`` later sends the upstream gradients and
        fills ``x.grad``. Integer outputs and outputs the server marks
        non-differentiable do not require grad. If the server no longer has the graph
        (restart, eviction, another replica), backward sends the inputs again and the
        server recomputes: same gradients, no error. Double backward through the
        remote step is not supported.
        """
        from ._autograd import RemoteFunction

        def call(*args: Any) -> Outputs:
            return RemoteFunction.apply(self, name, timeout, *args)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = f"Remote gradserve Function {name!r} at {self.target}."
        return call

    # -- used by the autograd step ---------------------------------------------------

    def _forward_keep(self, name: str, args: Sequence[Any], requires_grad: Sequence[bool], timeout: float | None) -> _Forwarded:
        values = _encode_args(args, requires_grad)
        request = pb.ForwardRequest(function=name, args=values, keep_graph=any(requires_grad))
        response = self._call(self._stub.Forward, request, timeout)
        return _Forwarded(
            outputs=tuple(_decode_outputs(response.outputs, _home_device(args))),
            returns_tuple=response.returns_tuple,
            differentiable=tuple(t.requires_grad for t in response.outputs),
            handle=response.handle,
        )

    def _backward(
        self,
        name: str,
        handle: str,
        args: Sequence[Any],
        requires_grad: Sequence[bool],
        grad_outputs: Sequence[torch.Tensor | None],
        timeout: float | None,
    ) -> tuple[torch.Tensor | None, ...]:
        encoded = [codec.encode_maybe_tensor(g) for g in grad_outputs]
        if handle:
            try:
                request = pb.BackwardRequest(function=name, handle=handle, grad_outputs=encoded)
                return _decode_grads(self._call(self._stub.Backward, request, timeout).grads, args)
            except HandleNotFoundError:
                pass  # the graph is gone: recompute below, the caller sees no error
        recompute = pb.Arguments(values=_encode_args(args, requires_grad))
        request = pb.BackwardRequest(function=name, recompute=recompute, grad_outputs=encoded)
        return _decode_grads(self._call(self._stub.Backward, request, timeout).grads, args)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


def _encode_args(args: Sequence[Any], requires_grad: Sequence[bool]) -> list[pb.Value]:
    values = []
    for arg, rg in zip(args, requires_grad):
        if isinstance(arg, torch.Tensor):
            values.append(pb.Value(tensor=codec.encode_tensor(arg, requires_grad=rg)))
        else:
            values.append(codec.encode_value(arg))
    return values


def _encode_grad_outputs(grad_outputs: torch.Tensor | Sequence[torch.Tensor | None] | None) -> list[pb.MaybeTensor]:
    if grad_outputs is None:
        return []
    if isinstance(grad_outputs, torch.Tensor):
        grad_outputs = (grad_outputs,)
    return [codec.encode_maybe_tensor(g) for g in grad_outputs]


def _home_device(args: Sequence[Any]) -> torch.device:
    return next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))


def _decode_outputs(messages: Sequence[pb.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [codec.decode_tensor(m, what=f"output {i}").to(device) for i, m in enumerate(messages)]


def _decode_grads(messages: Sequence[pb.MaybeTensor], args: Sequence[Any]) -> tuple[torch.Tensor | None, ...]:
    if len(messages) != len(args):
        raise codec.CodecError(f"server sent {len(messages)} gradients for {len(args)} arguments")
    grads: list[torch.Tensor | None] = []
    for i, (m, arg) in enumerate(zip(messages, args)):
        g = codec.decode_maybe_tensor(m, what=f"gradient {i}")
        if g is not None and isinstance(arg, torch.Tensor):
            g = g.to(device=arg.device, dtype=arg.dtype)
        grads.append(g)
    return tuple(grads)
