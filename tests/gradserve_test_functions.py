"""Tiny Functions for tests, registered beside the built-in examples.

Served by in-process test servers and, through ``--functions gradserve_test_functions``
(with tests/ on PYTHONPATH), by subprocess servers.
"""

from __future__ import annotations

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
