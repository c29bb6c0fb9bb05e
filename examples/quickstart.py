"""The seed examples through the client: y = x² and f(x, y) = x³ + y².

Usage: ``python examples/quickstart.py --target 127.0.0.1:50051``
"""

from __future__ import annotations

import argparse

import torch

from gradserve.client import GradientClient


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="gradserve server HOST:PORT")
    target = parser.parse_args(argv).target

    with GradientClient(target, timeout=30) as client:
        print("functions:", ", ".join(f.name for f in client.list_functions()))

        # y = x², as a differentiable step of a local graph.
        x = torch.tensor(1.0, requires_grad=True)
        y = client.function("square")(x)
        y.backward()
        print(f"square at x = 1:            y = {y.item():g}, dy/dx = {x.grad.item():g}")

        # f(x, y) = x³ + y², outputs and both gradients in one round trip.
        x = torch.tensor(2.0, requires_grad=True)
        y = torch.tensor(3.0, requires_grad=True)
        result = client.forward_backward("cube_plus_square", x, y)
        dfdx, dfdy = result.grads
        print(f"cube_plus_square at (2, 3): f = {result.outputs.item():g}, df/dx = {dfdx.item():g}, df/dy = {dfdy.item():g}")


if __name__ == "__main__":
    main()
