"""A Function that says which server process ran it, for the scale-out test.

Served through ``--functions integration.replica_functions`` (tests/ is on the
subprocess servers' PYTHONPATH).
"""

from __future__ import annotations

import os
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
