"""Functions with the bugs people really write, for the error-path and check tests.

Values worked by hand are in each docstring.
"""

from __future__ import annotations

from typing import Any

import torch

from gradserve.server import register


def _x2() -> tuple[torch.Tensor]:
    return (torch.tensor([2.0], dtype=torch.float64, requires_grad=True),)


@register("wrong_cube", sample_inputs=_x2)
class WrongCube(torch.autograd.Function):
    """x**3 with backward written 2x² instead of 3x²: at x = 2, numerical 12, analytical 8."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x**2 * g


@register(
    "ctx_attribute_square",
    double_backward=True,
    sample_inputs=lambda: (torch.tensor([1.0], dtype=torch.float64, requires_grad=True),),
)
class CtxAttributeSquare(torch.autograd.Function):
    """(2x)² keeping 2x on ctx as an attribute: first derivative 8 at x = 1 is right, double backward gives 0, truth 8."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.two_x = 2 * x  # not save_for_backward: autograd cannot see through it
        return ctx.two_x**2

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return 2 * ctx.two_x * 2 * g


@register("bad_grad_shape")
class BadGradShape(torch.autograd.Function):
    """Backward returns a [2, 5] gradient whatever the input's shape."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return torch.ones(2, 5, dtype=g.dtype)


@register("bad_grad_dtype")
class BadGradDtype(torch.autograd.Function):
    """Backward returns an int64 gradient for a floating input (torch would cast another floating dtype)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g.to(torch.int64)


@register("grad_for_scalar", sample_inputs=lambda: (torch.ones(3, dtype=torch.float64, requires_grad=True), 2.0))
class GradForScalar(torch.autograd.Function):
    """x * k, whose backward also returns a tensor for the float k (not a tensor: must be None)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: float) -> torch.Tensor:
        ctx.k = k
        return x * k

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return g * ctx.k, g.sum()


@register(
    "unconjugated_square",
    double_backward=True,
    supports_complex=True,
    sample_inputs=lambda: (torch.tensor([1.0], dtype=torch.float64, requires_grad=True),),
)
class UnconjugatedSquare(torch.autograd.Function):
    """x² whose backward forgets the conjugate (g * 2x, not g * conj(2x)): right for real x, wrong for complex x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g * 2 * x
