"""Example user Functions, served by the compose stack from this folder.

docker-compose.yml mounts ./functions at /functions (on the server's PYTHONPATH) and
serves this module (GRADSERVE_FUNCTIONS, default ``my_functions``). Replace this file with
your own (the README's ``my_functions.py`` works as it is), or add modules here and name
them in GRADSERVE_FUNCTIONS, comma-separated.

This example also loads the built-in examples (``square``, ``cube_plus_square``, ...),
which the integration suite calls; a file of yours that does not import them serves only
its own Functions, so its names may be the built-ins' names.
"""

from __future__ import annotations

from typing import Any

import torch

import gradserve.server.examples  # noqa: F401  (registers the built-in examples)
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
