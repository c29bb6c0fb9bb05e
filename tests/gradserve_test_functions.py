"""Tiny Functions for tests, registered beside the built-in examples.

Served by in-process test servers and, through ``--functions gradserve_test_functions``
(with tests/ on PYTHONPATH), by subprocess servers.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from gradserve.server import register


@register("identity")
class Identity(torch.autograd.Function):
    """x -> x (a copy); gradient passes through."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g


@register("two_outputs")
class TwoOutputs(torch.autograd.Function):
    """x -> (2x, x + 1)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 2 * x, x + 1

    @staticmethod
    def backward(ctx: Any, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        return 2 * g1 + g2


@register("forward_raises")
class ForwardRaises(torch.autograd.Function):
    """Forward always raises ValueError."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("x must be positive")

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g


@register("article_cube_plus_square")
class ArticleCubePlusSquare(torch.autograd.Function):
    """The article's broken f(x, y) = x**3 + y**2: backward returns one gradient for two inputs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, y)
        return x**3 + y**2

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        x, _ = ctx.saved_tensors
        return 3 * x**2 * g


@register("slow_square")
def slow_square(x: torch.Tensor, seconds: float) -> torch.Tensor:
    """x**2 after sleeping ``seconds`` (drain and deadline tests)."""
    time.sleep(seconds)
    return x * x


@register("returns_string")
def returns_string(x: torch.Tensor) -> Any:
    """Not a valid Function: returns a str."""
    return "oops"


@register("log")
def log(x: torch.Tensor) -> torch.Tensor:
    """Natural log: NaN for negative inputs (the --check-finite test)."""
    return torch.log(x)


@register("allocate_huge")
def allocate_huge(x: torch.Tensor) -> torch.Tensor:
    """Asks the allocator for 32 TiB: out of memory on any machine."""
    return x + torch.empty(2**45, dtype=torch.uint8).sum()


# -- Function shapes users write (issue: gradients you can trust) ----------------------


@register("dropout")
def dropout(x: torch.Tensor) -> torch.Tensor:
    """Dropout with p = 0.5 in training mode: draws a random mask on every forward."""
    return torch.nn.functional.dropout(x, p=0.5, training=True)


@register("forces")
def forces(pos: torch.Tensor) -> torch.Tensor:
    """Autograd inside forward, as force fields do: -dE/dpos for E = sum(pos**2)."""
    p = pos.detach().requires_grad_(True)
    (g,) = torch.autograd.grad((p**2).sum(), p)
    return -g


@register("grad_mode")
def grad_mode(x: torch.Tensor) -> torch.Tensor:
    """1.0 when forward runs with grad mode on, else 0.0."""
    return torch.tensor(float(torch.is_grad_enabled()))


@register("scale_default")
def scale_default(x: torch.Tensor, k: float = 3.0) -> torch.Tensor:
    """k * x with a default k."""
    return x * k


@register("scale_default_fn")
class ScaleDefault(torch.autograd.Function):
    """k * x with a default k; backward returns a trailing None for k, as PyTorch allows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: float = 3.0) -> torch.Tensor:
        ctx.k = k
        return x * k

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g * ctx.k, None


@register("embedding_sparse")
def embedding_sparse(indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.embedding with sparse=True: the weight's gradient is a sparse COO tensor."""
    return torch.nn.functional.embedding(indices, weight, sparse=True)


@register("meta_output")
def meta_output(x: torch.Tensor) -> torch.Tensor:
    """Returns a meta tensor, which has no data to send."""
    return torch.empty(x.shape, device="meta")


@register("fnuz_output")
def fnuz_output(x: torch.Tensor) -> torch.Tensor:
    """Returns float8_e4m3fnuz, a dtype the wire does not carry."""
    return x.to(torch.float8_e4m3fnuz)


@register("sparse_output")
def sparse_output(x: torch.Tensor) -> torch.Tensor:
    """Returns a sparse tensor; outputs travel dense only."""
    return x.to_sparse()


@register("once_differentiable_square", double_backward=True)
class OnceDifferentiableSquare(torch.autograd.Function):
    """x**2 whose backward is @once_differentiable, though registered with double_backward=True."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


@register("random_backward")
class RandomBackward(torch.autograd.Function):
    """Identity whose backward draws (and discards) random numbers: noise for other callers' streams."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        torch.randn(100_000)
        return g


@register("work_then_dropout")
def work_then_dropout(x: torch.Tensor) -> torch.Tensor:
    """Some work (during which other threads run), then dropout: the mask must survive a recompute."""
    h = x
    for _ in range(10):
        h = torch.tanh(h @ torch.eye(h.shape[-1], dtype=h.dtype))
    return torch.nn.functional.dropout(h, p=0.5, training=True)


@register("deterministic_liar", uses_rng=False)
def deterministic_liar(x: torch.Tensor) -> torch.Tensor:
    """Registered with uses_rng=False, yet draws random numbers: gradserve check must fail it."""
    return x * torch.rand(())


@register("keyword_only")
def keyword_only(x: torch.Tensor, *, w: float) -> torch.Tensor:
    """w * x, w keyword-only."""
    return x * w


@register("square_after_signal")
def square_after_signal(x: torch.Tensor, path: str, seconds: float) -> torch.Tensor:
    """x**2 after creating the file ``path`` (a test's readiness signal: the call is running) and sleeping ``seconds``."""
    open(path, "x").close()  # noqa: SIM115
    time.sleep(seconds)
    return x * x


@register("worker_pid")
def worker_pid(x: torch.Tensor) -> torch.Tensor:
    """2x + the serving process's pid (tests of ``--workers``: which process ran the call). Send float64."""
    return 2 * x + os.getpid()
