"""Functions for the scale-out and drain tests.

``square_and_pid`` says which server process ran it; ``slow_square`` takes as long as
asked. Served through ``--functions integration.replica_functions`` (tests/ is on the
subprocess servers' PYTHONPATH), and in ``make compose-test``'s replicas through
compose.replicas.yml.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from gradserve.server import register


@register("square_and_pid")
class SquareAndPid(torch.autograd.Function):
    """x -> (x**2, the serving process's id); the gradient is 2x, the id has none."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(x)
        pid = torch.tensor(os.getpid(), dtype=torch.int64)
        ctx.mark_non_differentiable(pid)
        return x * x, pid

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor | None, _grad_pid: torch.Tensor | None) -> torch.Tensor | None:
        (x,) = ctx.saved_tensors
        return None if grad_output is None else 2 * x * grad_output


@register("slow_square", sample_inputs=lambda: (torch.rand(3, dtype=torch.float64, requires_grad=True), 0.0))
class SlowSquare(torch.autograd.Function):
    """x -> x**2 after sleeping ``seconds`` in forward: a long call, for the drain test."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seconds: float) -> torch.Tensor:
        time.sleep(seconds)
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return 2 * x * grad_output, None
