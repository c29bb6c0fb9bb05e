"""A functions module whose start-up checks take seconds: each forward sleeps 0.25 s.

Served with ``serve --check`` it keeps the server in its loading state (UNAVAILABLE,
reason LOADING) for a while, which the client resilience tests need.
"""

from __future__ import annotations

import time

import torch

from gradserve.server import register


@register("slow_double", sample_inputs=lambda: (torch.ones(1, dtype=torch.float64, requires_grad=True),))
def slow_double(x: torch.Tensor) -> torch.Tensor:
    """2x, after sleeping 0.25 s."""
    time.sleep(0.25)
    return 2 * x
