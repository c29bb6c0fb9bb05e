"""What the sync and async clients share: channel set-up, request builders, reply decoders, results."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradserve.v1 import codec, streaming
from gradserve.v1 import gradserve_pb2 as pb

__all__ = ["ForwardBackwardResult", "FunctionInfo", "Outputs"]

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


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
    signature : str
        forward's parameters, defaults included: ``"(x, k=3.0)"``.
    required_inputs : int
        Arguments without a default.
    double_backward : bool
        Whether its backward may be differentiated (``create_graph=True``).
    """

    name: str
    num_inputs: int | None
    doc: str
    kind: str
    version: str
    unavailable_reason: str = ""
    signature: str = ""
    required_inputs: int = 0
    double_backward: bool = False


@dataclass(frozen=True)
class ForwardBackwardResult:
    """Outputs and input gradients of one forward + backward.

    Attributes
    ----------
    outputs : Tensor or tuple of Tensor
        As :meth:`GradientClient.forward` returns them.
    grads : tuple of (Tensor or None)
        One entry per argument, positional then keyword in the order given: the
        gradient, on the argument's device and dtype (sparse where torch computes it
        sparse), or None where the argument is not a tensor with
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
    rng: pb.RngReplay | None = None


# -- requests ------------------------------------------------------------------------------

Payloads = list[torch.Tensor] | None
"""Tensor bytes sent outside the message (StreamCall), or None to send them inline."""


def payload_list(threshold_bytes: int, *groups: Sequence[Any]) -> Payloads:
    """A list to collect tensor bytes in when the tensors and numpy arrays of ``groups``
    total more than ``threshold_bytes`` (the call is then streamed), else None (a unary call)."""
    total = sum(codec.nbytes(t) for group in groups for t in group)
    return [] if total > threshold_bytes else None


# The encoders below add to a request's repeated field in place (``into``): a message built
# apart and then assigned would have its tensor bytes copied a second time.


def encode_args(args: Sequence[Any], requires_grad: Sequence[bool] | None, payloads: Payloads, into: Any) -> None:
    """Arguments as Values added to ``into``; ``requires_grad`` overrides each tensor's own flag."""
    flags = requires_grad if requires_grad is not None else [None] * len(args)
    for a, rg in zip(args, flags):
        codec.encode_value(a, requires_grad=rg, payloads=payloads, out=into.add())


def encode_kwargs(kwargs: Mapping[str, Any], requires_grad: Sequence[bool] | None, payloads: Payloads, into: Any) -> None:
    """Keyword arguments as NamedValues added to ``into``, in the order given; ``requires_grad`` as :func:`encode_args`."""
    flags = requires_grad if requires_grad is not None else [None] * len(kwargs)
    for (name, value), rg in zip(kwargs.items(), flags):
        item = into.add(name=name)
        codec.encode_value(value, requires_grad=rg, payloads=payloads, out=item.value)


def as_grad_outputs(grad_outputs: torch.Tensor | Sequence[torch.Tensor | None] | None) -> Sequence[torch.Tensor | None]:
    """A bare tensor stands for a one-output Function's cotangent; None for none given."""
    if grad_outputs is None:
        return ()
    if isinstance(grad_outputs, torch.Tensor):
        return (grad_outputs,)
    if not isinstance(grad_outputs, (list, tuple)):
        raise codec.CodecError(
            f"grad_outputs must be a tensor, a list or tuple of tensors (or None), or None; got {type(grad_outputs).__name__}"
        )
    for i, g in enumerate(grad_outputs):
        if g is not None and not isinstance(g, torch.Tensor):
            raise codec.CodecError(f"grad_outputs[{i}] must be a torch.Tensor or None, got {type(g).__name__}")
    return grad_outputs


def encode_grad_outputs(
    grad_outputs: Sequence[torch.Tensor | None], payloads: Payloads, requires_grad: Sequence[bool] | None, into: Any
) -> None:
    """Cotangents as MaybeTensors added to ``into``; ``requires_grad`` marks those that are leaves of a kept graph."""
    flags = requires_grad if requires_grad is not None else [False] * len(grad_outputs)
    for g, rg in zip(grad_outputs, flags):
        codec.encode_maybe_tensor(g, requires_grad=rg, payloads=payloads, out=into.add())


def caller_seed() -> int:
    """A seed for the server's random generators, drawn from the caller's own (CPU) generator: remote
    randomness then follows the caller's ``torch.manual_seed``, and a forward re-run under
    ``torch.utils.checkpoint(preserve_rng_state=True)`` draws the same numbers again."""
    return int(torch.randint(0, 2**63 - 1, ()).item())


def forward_request(
    name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    payloads: Payloads = None,
    requires_grad: Sequence[bool] | None = None,
    grad_enabled: bool | None = None,
) -> pb.ForwardRequest:
    """A forward in the caller's grad mode (default: the current one). ``requires_grad``
    (positional then keyword) None: no gradients wanted, so the server keeps no graph."""
    flags = list(requires_grad) if requires_grad is not None else [False] * (len(args) + len(kwargs))
    request = pb.ForwardRequest(
        function=name,
        keep_graph=any(flags),
        no_grad=not (torch.is_grad_enabled() if grad_enabled is None else grad_enabled),
        seed=caller_seed(),
    )
    encode_args(args, flags[: len(args)], payloads, request.args)  # slot order: args, then kwargs
    encode_kwargs(kwargs, flags[len(args) :], payloads, request.kwargs)
    return request


def forward_backward_request(
    name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    grad_outputs: Sequence[torch.Tensor | None],
    payloads: Payloads = None,
) -> pb.ForwardBackwardRequest:
    request = pb.ForwardBackwardRequest(function=name, seed=caller_seed())
    # Slot order: args (field 2), grad_outputs (field 3), kwargs (field 4).
    encode_args(args, None, payloads, request.args)
    encode_grad_outputs(grad_outputs, payloads, None, request.grad_outputs)
    encode_kwargs(kwargs, None, payloads, request.kwargs)
    return request


@dataclass(frozen=True)
class BackwardStep:
    """One backward of the autograd bridge: of a forward's graph (order 1) or of a gradient's (order k >= 2).

    ``inputs`` are the graph's inputs, flat: the positional arguments, the keyword
    arguments' values (``kwarg_names``), then the cotangents of orders 1 .. k-1
    (``levels`` gives how many entries each has). ``built`` is each input's
    ``requires_grad`` as the graph was built, so a recompute builds the same graph.
    ``grad_outputs`` are the cotangents of this order; ``grad_output_leaves`` marks
    those the next order may differentiate (with ``keep_graph``).
    """

    name: str
    version: str
    handle: str
    rng: pb.RngReplay | None
    num_positional: int
    kwarg_names: tuple[str, ...]
    levels: tuple[int, ...]
    inputs: list[Any]
    built: list[bool]
    grad_outputs: Sequence[torch.Tensor | None]
    grad_output_leaves: list[bool]
    keep_graph: bool


@dataclass(frozen=True)
class BackwardReply:
    """Gradients of a :class:`BackwardStep`, aligned with its inputs; with ``keep_graph``,
    whether each can be differentiated again and the handle of their graph."""

    grads: tuple[torch.Tensor | None, ...]
    differentiable: tuple[bool, ...]
    handle: str


def backward_by_handle(step: BackwardStep, payloads: Payloads = None) -> pb.BackwardRequest:
    request = pb.BackwardRequest(function=step.name, handle=step.handle, version=step.version, keep_graph=step.keep_graph)
    encode_grad_outputs(step.grad_outputs, payloads, step.grad_output_leaves, request.grad_outputs)
    return request


def backward_by_recompute(step: BackwardStep, payloads: Payloads = None) -> pb.BackwardRequest:
    # Slot order: recompute's args and kwargs, grad_outputs, then lower_order.
    n, n0 = step.num_positional, step.num_positional + len(step.kwarg_names)
    request = pb.BackwardRequest(function=step.name, version=step.version, keep_graph=step.keep_graph, rng=step.rng)
    request.recompute.SetInParent()  # the graph's source, even for a Function without arguments
    encode_args(step.inputs[:n], step.built[:n], payloads, request.recompute.values)
    encode_kwargs(dict(zip(step.kwarg_names, step.inputs[n:n0])), step.built[n:n0], payloads, request.recompute.kwargs)
    encode_grad_outputs(step.grad_outputs, payloads, step.grad_output_leaves, request.grad_outputs)
    start = n0
    for size in step.levels:
        chunk = slice(start, start + size)
        encode_grad_outputs(step.inputs[chunk], payloads, step.built[chunk], request.lower_order.add().values)
        start += size
    return request


def backward_reply(
    response: pb.BackwardResponse, inputs: Sequence[Any], payloads: Iterator[torch.Tensor] | None = None
) -> BackwardReply:
    flags = tuple(
        m.WhichOneof("kind") in ("tensor", "sparse") and getattr(m, m.WhichOneof("kind")).requires_grad for m in response.grads
    )
    return BackwardReply(decode_grads(response.grads, inputs, payloads), flags, response.handle)


# -- replies ---------------------------------------------------------------------------------


def home_device(args: Sequence[Any]) -> torch.device:
    """Where outputs go: the first tensor argument's device, else the CPU."""
    return next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))


def decode_outputs(
    messages: Sequence[pb.Tensor], returns_tuple: bool, args: Sequence[Any], payloads: Iterator[torch.Tensor] | None = None
) -> Outputs:
    """Outputs on the caller's device, shaped like the Function's return."""
    if not messages:
        raise codec.CodecError("the reply holds no outputs; every Function returns at least one")
    device = home_device(args)
    outputs = tuple(codec.decode_tensor(m, what=f"output {i}", payloads=payloads).to(device) for i, m in enumerate(messages))
    return outputs if returns_tuple else outputs[0]


def decode_grads(
    messages: Sequence[pb.MaybeTensor], args: Sequence[Any], payloads: Iterator[torch.Tensor] | None = None
) -> tuple[torch.Tensor | None, ...]:
    """Gradients aligned with ``args`` (the graph's inputs), each on its argument's device and dtype."""
    if len(messages) != len(args):
        raise codec.CodecError(f"server sent {len(messages)} gradients for {len(args)} inputs")
    grads: list[torch.Tensor | None] = []
    for i, (m, arg) in enumerate(zip(messages, args)):
        g = codec.decode_maybe_tensor(m, what=f"gradient {i}", payloads=payloads)
        if g is not None and (not isinstance(arg, torch.Tensor) or g.shape != arg.shape):
            got = list(g.shape)
            want = list(arg.shape) if isinstance(arg, torch.Tensor) else f"none (input {i} is a {type(arg).__name__})"
            raise codec.CodecError(f"gradient {i} has shape {got}, expected {want}")
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
        rng=response.rng if response.HasField("rng") else None,
    )


def stream_requests(kind: str, header: Any, payloads: list[torch.Tensor]) -> Iterator[pb.StreamRequest | bytes]:
    """A StreamCall's messages: the header, then the payloads in chunks (wire bytes: see streaming.serialize)."""
    yield pb.StreamRequest(**{kind: header})
    yield from streaming.data_messages(payloads)


def read_stream_header(first: pb.StreamResponse | None, kind: str) -> tuple[Any, streaming.Assembler]:
    """The response header of a StreamCall, and an assembler for its data chunks."""
    if first is None or streaming.part(first) != kind:
        raise codec.CodecError(f"StreamCall: expected a {kind} header first, got {first and streaming.part(first)}")
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
            signature=f.signature,
            required_inputs=f.required_inputs,
            double_backward=f.double_backward,
        )
        for f in response.functions
    ]
