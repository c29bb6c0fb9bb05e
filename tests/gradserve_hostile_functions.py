"""Functions for the start-up and shutdown tests (subprocess servers only; not imported by conftest).

``GRADSERVE_TEST_IMPORT_SLEEP_S`` makes importing this module take that long.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from gradserve.server import register

time.sleep(float(os.environ.get("GRADSERVE_TEST_IMPORT_SLEEP_S", "0")))


def _slow_sample() -> tuple[torch.Tensor]:
    time.sleep(60)  # a check that takes a minute: over any sensible --check-timeout-s
    return (torch.ones(2, dtype=torch.float64, requires_grad=True),)


@register("slow_check", sample_inputs=_slow_sample)
def slow_check(x: torch.Tensor) -> torch.Tensor:
    """x * 2, whose start-up check takes a minute."""
    return x * 2


@register("nap", gradcheck=False, skip_reason="sleeps; its gradient is trivial")
def nap(x: torch.Tensor, seconds: float) -> torch.Tensor:
    """x * 1 after sleeping ``seconds`` (the grace-period test)."""
    time.sleep(seconds)
    return x * 1


@register("stop_the_process", gradcheck=False, skip_reason="exits on purpose")
class StopTheProcess(torch.autograd.Function):
    """Forward calls sys.exit: it must not stop the server."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        raise SystemExit(0)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g
