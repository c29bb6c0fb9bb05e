"""The backward contract, checked on every call: what a Function's backward returns must fit its forward's inputs.

:func:`contract_checked` wraps an autograd Function so that what its backward returns is
checked against its forward's inputs: one gradient (or None) per input (trailing Nones
for parameters left to their defaults are dropped, as torch does), each a tensor of the
input's shape (or one torch would reduce to it) and dtype, and None for inputs that
cannot have a gradient. The article version of ``cube_plus_square`` (one gradient for two
inputs) gets a clear error, never a wrong gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["BackwardContractError", "contract_checked", "dtype_name"]

_META = "_gradserve_input_meta"


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: a dtype as error messages name it."""
    return str(dtype).removeprefix("torch.")


class BackwardContractError(RuntimeError):
    """A Function's backward returned the wrong number, kind, shape or dtype of gradients."""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _input_meta(inputs: Sequence[Any]) -> tuple[tuple[tuple[int, ...], torch.dtype] | None, ...]:
    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else None for a in inputs)


def _check_grads(name: str, meta: Sequence[Any], grads: Any) -> tuple[Any, ...]:
    grads = grads if isinstance(grads, tuple) else (grads,)
    if len(grads) > len(meta) and all(g is None for g in grads[len(meta) :]):
        # As torch does: trailing Nones for parameters the call left to their defaults.
        grads = grads[: len(meta)]
    if len(grads) != len(meta):
        raise BackwardContractError(
            f"{name} backward returned {_plural(len(grads), 'gradient')} for {_plural(len(meta), 'input')}; "
            "return one gradient (or None) per forward input"
        )
    for i, (grad, m) in enumerate(zip(grads, meta)):
        if grad is None:
            continue
        if not isinstance(grad, torch.Tensor):
            raise BackwardContractError(
                f"{name} backward returned a {type(grad).__name__} for argument {i}; expected a tensor or None"
            )
        if m is None:
            raise BackwardContractError(
                f"{name} backward returned a gradient for argument {i}, which is not a tensor; expected None"
            )
        shape, dtype = m
        if not (dtype.is_floating_point or dtype.is_complex):
            raise BackwardContractError(
                f"{name} backward returned a gradient for argument {i}, a {dtype_name(dtype)} tensor that cannot "
                "have one; expected None"
            )
        if tuple(grad.shape) != shape and not _reducible(shape, tuple(grad.shape)):
            raise BackwardContractError(
                f"{name} backward: gradient for argument {i}: got shape {list(grad.shape)}, expected {list(shape)}"
            )
        # torch casts a gradient to its input's dtype (a float64 gradient for a float32 input of a
        # mixed-precision call); only a complex gradient for a real input has no meaning.
        castable = grad.is_floating_point() or (grad.is_complex() and dtype.is_complex)
        if grad.dtype != dtype and not castable:
            raise BackwardContractError(
                f"{name} backward: gradient for argument {i}: got dtype {dtype_name(grad.dtype)}, "
                f"expected {dtype_name(dtype)} (the argument's dtype) or another floating dtype torch casts to it"
            )
    return grads


def _reducible(shape: tuple[int, ...], grad_shape: tuple[int, ...]) -> bool:
    """Whether torch would sum a gradient of ``grad_shape`` down to ``shape`` (input broadcast in forward)."""
    try:
        return tuple(torch.broadcast_shapes(shape, grad_shape)) == grad_shape
    except RuntimeError:
        return False


def contract_checked(cls: type[torch.autograd.Function], name: str) -> type[torch.autograd.Function]:
    """A subclass of ``cls`` whose backward output is checked; forward and backward math are ``cls``'s.

    Raises (from backward) :class:`BackwardContractError` with a message naming ``name``,
    the argument, what was expected and what arrived.
    """
    namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    if cls.setup_context is torch.autograd.Function.setup_context:  # forward(ctx, *args)

        def forward(ctx: Any, *args: Any) -> Any:
            setattr(ctx, _META, _input_meta(args))
            return cls.forward(ctx, *args)

        namespace["forward"] = staticmethod(forward)
    else:  # forward(*args) + setup_context(ctx, inputs, output)

        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> Any:
            setattr(ctx, _META, _input_meta(inputs))
            return cls.setup_context(ctx, inputs, output)

        namespace["setup_context"] = staticmethod(setup_context)

    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        return _check_grads(name, getattr(ctx, _META), cls.backward(ctx, *grad_outputs))

    namespace["backward"] = staticmethod(backward)
    return type(cls.__name__, (cls,), namespace)
