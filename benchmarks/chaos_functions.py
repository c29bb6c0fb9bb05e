"""Functions the chaos soak serves beside the built-in examples: broken on purpose.

Served with ``--functions benchmarks/chaos_functions.py``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from gradserve.server import register


@register("chaos_exit", gradcheck=False, skip_reason="raises SystemExit on purpose")
def chaos_exit(x: torch.Tensor) -> torch.Tensor:
    """Calls sys.exit: must be FAILED_PRECONDITION, and the server must stay up."""
    raise SystemExit(1)


@register("chaos_interrupt", gradcheck=False, skip_reason="raises KeyboardInterrupt on purpose")
class ChaosInterrupt(torch.autograd.Function):
    """Raises KeyboardInterrupt in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt


@register("chaos_slow", gradcheck=False, skip_reason="sleeps")
def chaos_slow(x: torch.Tensor, seconds: float) -> torch.Tensor:
    """x * 1 after ``seconds`` (at most 2): holds a compute slot."""
    time.sleep(min(max(seconds, 0.0), 2.0))
    return x * 1
