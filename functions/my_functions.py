"""Example user Functions, served by the compose stack from this folder.

docker-compose.yml mounts ./functions at /functions (on the server's PYTHONPATH) and names
this module with ``--functions my_functions``. Put your own modules here and name them
the same way (GRADSERVE_FUNCTIONS in docker-compose.yml, comma-separated).
"""

from __future__ import annotations

from typing import Any

import torch

from gradserve.server import register


@register("swish", double_backward=False)
class Swish(torch.autograd.Function):
    """swish(x) = x * sigmoid(x), with a hand-written backward: s + x * s * (1 - s)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(x)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        x, s = ctx.saved_tensors
        return grad_output * (s + x * s * (1 - s))
