"""The client-side autograd step: a ``torch.autograd.Function`` whose forward and backward are remote calls."""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from ._client import GradientClient

__all__ = ["RemoteFunction"]


class RemoteFunction(torch.autograd.Function):
    """``RemoteFunction.apply(client, name, timeout, *args)``: one remote Function as a graph node.

    Forward asks the server to keep the graph (when some argument needs grad) and
    saves the tensor arguments; backward sends ``grad_outputs`` with the handle, or
    the saved arguments when the handle is gone, so the server recomputes. If the
    node is garbage-collected before its backward ran, the handle is released.
    """

    @staticmethod
    def forward(ctx: Any, client: GradientClient, name: str, timeout: float | None, *args: Any) -> Any:
        requires_grad = tuple(ctx.needs_input_grad[3:])
        result = client._forward_keep(name, args, requires_grad, timeout)
        ctx.set_materialize_grads(False)  # None, not zeros, for outputs that got no gradient
        ctx.client, ctx.name, ctx.timeout = client, name, timeout
        # Without the outputs: they hold this node as grad_fn, a cycle through C++ that
        # the garbage collector cannot see (it would leak the graph and its handle).
        ctx.forwarded, ctx.arg_requires_grad = dataclasses.replace(result, outputs=()), requires_grad
        ctx.tensor_positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.scalars = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_positions))
        if result.handle:
            # Holds the client, not ctx: the finalizer must not keep the node alive.
            ctx.release = weakref.finalize(ctx, client._release, result.handle)
        outputs = result.outputs
        ctx.mark_non_differentiable(*(o for o, d in zip(outputs, result.differentiable) if not d))
        return outputs if result.returns_tuple else outputs[0]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        args = list(ctx.scalars)
        for i, t in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[i] = t
        forwarded = ctx.forwarded
        grads = ctx.client._backward(ctx.name, forwarded, args, ctx.arg_requires_grad, grad_outputs, ctx.timeout)
        if forwarded.handle:
            ctx.release.detach()  # the server freed it with the backward
            ctx.forwarded = dataclasses.replace(forwarded, handle="")  # a second backward recomputes
        return (None, None, None, *grads)
