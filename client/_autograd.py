"""The client-side autograd bridge: ``torch.autograd.Function`` nodes whose forward and backward are remote calls.

Order 0 (:class:`RemoteFunction`) is the Function's forward on the server. Its backward
is a remote backward; under ``create_graph=True`` it is itself a node,
:class:`RemoteGradient`, whose forward is the remote backward (kept on the server with
``keep_graph``) and whose backward is the remote backward of the next order. Every
order works by handle or, when the handle is gone, by recompute (the arguments, the
lower-order cotangents and the forward's random seed sent again), so the gradients
are those of local autograd at every order.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from gradserve.v1 import gradserve_pb2 as pb

from ._errors import ArgumentError
from ._messages import BackwardStep, Outputs

__all__ = ["RemoteFunction", "RemoteGradient", "remote_call"]


@dataclass
class _Node:
    """What a node's backward needs: the call's identity, the graph's shape, and its handle on the server."""

    client: Any  # a GradientClient: _forward_keep, _backward, _release
    name: str
    timeout: float | None
    version: str
    rng: pb.RngReplay | None
    num_positional: int
    kwarg_names: tuple[str, ...]
    levels: tuple[int, ...]  # entries of each lower-order cotangent among the inputs
    built: list[bool]  # each input's requires_grad as the server built the graph
    grad_enabled: bool = True  # the caller's grad mode at the call (forward itself runs with it off)
    handle: str = ""
    release: Any = None  # weakref.finalize freeing the handle if the node dies unused

    def keep(self, ctx: Any, handle: str) -> None:
        self.handle = handle
        if handle:
            # Holds the client, not ctx: the finalizer must not keep the node alive.
            self.release = weakref.finalize(ctx, self.client._release, handle)

    def consumed(self) -> None:
        """The server freed the handle with a backward: a later backward recomputes."""
        if self.release is not None:
            self.release.detach()
        self.handle = ""


def remote_call(client: Any, name: str, timeout: float | None, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Outputs:
    """Run the remote Function ``name`` as one node of the caller's autograd graph."""
    _refuse_vmap(name, [*args, *kwargs.values()])
    node = _Node(client, name, timeout, "", None, len(args), tuple(kwargs), (), [], torch.is_grad_enabled())
    return RemoteFunction.apply(node, *args, *kwargs.values())


def _refuse_vmap(name: str, tensors: Sequence[Any] = ()) -> None:
    """Batched tensors (torch.func.vmap, jacobian(vectorize=True), grad(is_grads_batched=True)) have no
    wire form: say so, rather than fail somewhere inside the codec."""
    batched = any(
        isinstance(t, torch.Tensor)
        and (torch._C._functorch.is_batchedtensor(t) or torch._C._functorch.is_legacy_batchedtensor(t))
        for t in tensors
    )
    if batched or torch._C._are_functorch_transforms_active():
        raise ArgumentError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{name}: a remote gradserve step cannot run under torch.func transforms (vmap, "
            "jacobian/hessian(vectorize=True), grad(is_grads_batched=True)); use vectorize=False",
            "INVALID_ARGUMENT",
        )


def _save_inputs(ctx: Any, inputs: Sequence[Any]) -> None:
    ctx.tensor_positions = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
    ctx.others = [None if isinstance(a, torch.Tensor) else a for a in inputs]
    ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions))


def _saved_inputs(ctx: Any) -> list[Any]:
    inputs = list(ctx.others)
    for i, t in zip(ctx.tensor_positions, ctx.saved_tensors):
        inputs[i] = t
    return inputs


def _backward(ctx: Any, grad_outputs: Sequence[torch.Tensor | None]) -> tuple[Any, ...]:
    """A node's backward: remote, and itself a node when autograd records it (create_graph=True)."""
    node: _Node = ctx.node
    _refuse_vmap(node.name, grad_outputs)
    inputs = _saved_inputs(ctx)
    if torch.is_grad_enabled():
        return (None, *RemoteGradient.apply(node, *inputs, *grad_outputs))
    step = _step(node, inputs, grad_outputs, [False] * len(grad_outputs), keep_graph=False)
    reply = node.client._backward(step, node.timeout)
    node.consumed()
    return (None, *reply.grads)


def _step(node: _Node, inputs: list[Any], grad_outputs: Sequence[Any], leaves: list[bool], keep_graph: bool) -> BackwardStep:
    return BackwardStep(
        name=node.name,
        version=node.version,
        handle=node.handle,
        rng=node.rng,
        num_positional=node.num_positional,
        kwarg_names=node.kwarg_names,
        levels=node.levels,
        inputs=inputs,
        built=node.built,
        grad_outputs=grad_outputs,
        grad_output_leaves=leaves,
        keep_graph=keep_graph,
    )


class RemoteFunction(torch.autograd.Function):
    """``RemoteFunction.apply(node, *args, *kwarg_values)``: a remote Function's forward as a graph node.

    Forward asks the server to keep the graph (when some argument needs grad) and
    saves the arguments; backward sends ``grad_outputs`` with the handle, or the saved
    arguments (and the forward's random seed) when the handle is gone, so the server
    recomputes. If the node is garbage-collected before its backward ran, the handle
    is released.
    """

    @staticmethod
    def forward(ctx: Any, node: _Node, *inputs: Any) -> Any:
        requires_grad = list(ctx.needs_input_grad[1:])
        n = node.num_positional
        kwargs = dict(zip(node.kwarg_names, inputs[n:]))
        result = node.client._forward_keep(node.name, inputs[:n], kwargs, requires_grad, node.grad_enabled, node.timeout)
        ctx.set_materialize_grads(False)  # None, not zeros, for outputs that got no gradient
        # The node, not the outputs: they hold this node as grad_fn, a cycle through C++
        # that the garbage collector cannot see (it would leak the graph and its handle).
        ctx.node = dataclasses.replace(node, version=result.version, rng=result.rng, built=requires_grad)
        ctx.node.keep(ctx, result.handle)
        _save_inputs(ctx, inputs)
        ctx.mark_non_differentiable(*(o for o, d in zip(result.outputs, result.differentiable) if not d))
        return result.outputs if result.returns_tuple else result.outputs[0]

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[Any, ...]:
        return _backward(ctx, grad_outputs)


class RemoteGradient(torch.autograd.Function):
    """``RemoteGradient.apply(parent, *parent_inputs, *grad_outputs)``: a remote backward as a graph node.

    Recorded when a :class:`RemoteFunction` (or another ``RemoteGradient``) is
    differentiated with ``create_graph=True``. Its forward runs the parent's backward
    on the server with ``keep_graph`` and returns one gradient per parent input; its
    backward is the remote backward of the next order.
    """

    @staticmethod
    def forward(ctx: Any, parent: _Node, *flat: Any) -> Any:
        needs = list(ctx.needs_input_grad[1:])
        n = len(parent.built)
        inputs, grad_outputs = list(flat[:n]), list(flat[n:])
        leaves = [isinstance(g, torch.Tensor) and need for g, need in zip(grad_outputs, needs[n:])]
        keep_graph = any(needs)
        reply = parent.client._backward(_step(parent, inputs, grad_outputs, leaves, keep_graph), parent.timeout)
        parent.consumed()
        ctx.set_materialize_grads(False)
        ctx.node = dataclasses.replace(
            parent, levels=(*parent.levels, len(grad_outputs)), built=[*parent.built, *leaves], handle="", release=None
        )
        ctx.node.keep(ctx, reply.handle if keep_graph else "")
        _save_inputs(ctx, flat)
        ctx.mark_non_differentiable(*(g for g, d in zip(reply.grads, reply.differentiable) if g is not None and not d))
        return reply.grads

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[Any, ...]:
        return _backward(ctx, grad_outputs)
