"""Built-in example Functions, served when ``gradserve serve`` gets no ``--functions``.

Two teaching examples and a few custom Functions people really write. Every one is
checked against ``torch.autograd.gradcheck`` in float64 by the tests. Each also runs
locally: ``Square.apply(x)`` works without a server.
"""

from __future__ import annotations

from typing import Any

import torch

from ._registry import register


def _sample(*shape: int, scale: float = 1.0) -> torch.Tensor:
    """A float64 standard-normal sample input (fixed seed) for ``gradserve check``."""
    g = torch.Generator().manual_seed(sum(shape))
    return (scale * torch.randn(*shape, dtype=torch.float64, generator=g)).requires_grad_()


__all__ = ["CubePlusSquare", "Linear", "LogSumExp", "MaxWithIndex", "Softplus", "Square", "StraightThroughSign", "scale"]


@register("square", uses_rng=False, double_backward=True, supports_complex=True)
class Square(torch.autograd.Function):
    """y = x ** 2, elementwise; dy/dx = 2x. At x = 1: y = 1, dy/dx = 2.

    Shapes: any; the output has the input's shape and dtype. Complex x gets PyTorch's
    convention (conjugate Wirtinger calculus, see the autograd notes): the gradient is
    grad_output * conj(2x); at x = 1+2j with grad_output 1 it is 2-4j.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        # One temporary of x's size, not two (``grad_output * (2 * x).conj()`` allocates 2x, then
        # the product): on a big tensor, what the server's peak memory is made of. Bit-identical:
        # multiplying by 2 is exact.
        return torch.mul(grad_output, x.conj()).mul_(2)


@register("cube_plus_square", uses_rng=False, double_backward=True, supports_complex=True)
class CubePlusSquare(torch.autograd.Function):
    """f(x, y) = x ** 3 + y ** 2, elementwise; df/dx = 3x², df/dy = 2y. At (2, 3): f = 17, 12, 6.

    The version of this example that circulates in articles returns only the x
    gradient from backward, dropping df/dy; this one returns one gradient per input.
    x and y broadcast like ``+``; each gradient is reduced to its input's shape.
    Complex inputs: gradients grad_output * conj(3x²) and grad_output * conj(2y).
    """

    @staticmethod
    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x**3 + y**2

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, y = ctx.saved_tensors
        grad_x = _sum_to(grad_output * (3 * x**2).conj(), x.shape) if ctx.needs_input_grad[0] else None
        grad_y = _sum_to(grad_output * (2 * y).conj(), y.shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_y


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Undo broadcasting: sum ``grad`` down to ``shape``."""
    return grad if grad.shape == shape else grad.sum_to_size(shape)


@register(
    "straight_through_sign",
    uses_rng=False,
    gradcheck=False,
    skip_reason="surrogate gradient by design (straight-through estimator)",
)
class StraightThroughSign(torch.autograd.Function):
    """sign(x) forward; the straight-through estimator backward (Bengio et al. 2013, "hardtanh" STE).

    The true derivative of sign is 0 almost everywhere, so binarized networks pass
    the gradient through unchanged where |x| <= 1 and block it elsewhere.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_output * (x.abs() <= 1).to(grad_output.dtype)


@register("softplus", uses_rng=False, double_backward=True, sample_inputs=lambda: (_sample(6, scale=30),))
class Softplus(torch.autograd.Function):
    """softplus(x) = log(1 + exp(x)), computed stably as max(x, 0) + log1p(exp(-|x|)).

    The naive form overflows to inf for x > 88 in float32; this one does not.
    d/dx softplus(x) = sigmoid(x).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(x)


@register("logsumexp", uses_rng=False, double_backward=True, sample_inputs=lambda: (_sample(3, 5),))
class LogSumExp(torch.autograd.Function):
    """log(sum(exp(x), dim=-1)), stable by subtracting the row max; gradient softmax(x).

    Shapes: x [..., n] -> [...]. Rows of all -inf give -inf and a zero gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        m = x.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        out = (x - m).exp().sum(dim=-1).log() + m.squeeze(-1)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        x, out = ctx.saved_tensors
        softmax = torch.nan_to_num((x - out.unsqueeze(-1)).exp())
        return grad_output.unsqueeze(-1) * softmax


@register(
    "linear",
    uses_rng=False,
    double_backward=True,
    supports_complex=True,
    sample_inputs=lambda: (_sample(4, 3), _sample(2, 3), _sample(2)),
)
class Linear(torch.autograd.Function):
    """y = x @ weight.T + bias, like ``torch.nn.functional.linear``, with a hand-written backward.

    Shapes: x [batch, in], weight [out, in], bias [out] or None -> y [batch, out].
    Gradients: grad_x = g @ weight, grad_weight = g.T @ x, grad_bias = g.sum(0), each
    computed only when ``ctx.needs_input_grad`` asks for it; for complex tensors
    weight and x are conjugated (PyTorch's convention).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = x @ weight.T
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_output @ weight.conj() if ctx.needs_input_grad[0] else None
        grad_w = grad_output.T @ x.conj() if ctx.needs_input_grad[1] else None
        grad_b = grad_output.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


@register("max_with_index", uses_rng=False, sample_inputs=lambda: (_sample(3, 5),))
class MaxWithIndex(torch.autograd.Function):
    """Row maximum and its index: x [..., n] -> (values [...], indices [...] int64).

    Two outputs; the integer indices are not differentiable. The gradient of the
    values goes to the arg-max position of each row.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = x.max(dim=-1)
        ctx.save_for_backward(indices)
        ctx.input_shape = x.shape
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor, grad_indices: torch.Tensor | None) -> torch.Tensor:
        (indices,) = ctx.saved_tensors
        grad = grad_values.new_zeros(ctx.input_shape)
        return grad.scatter(-1, indices.unsqueeze(-1), grad_values.unsqueeze(-1))


@register("scale", uses_rng=False, double_backward=True, supports_complex=True, sample_inputs=lambda: (_sample(4), 2.5))
def scale(x: torch.Tensor, k: float) -> torch.Tensor:
    """k * x: a plain differentiable callable with a scalar parameter (autograd derives backward)."""
    return x * k
