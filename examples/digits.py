"""Train a small digits classifier whose custom linear layer runs on a gradserve server.

scikit-learn's bundled 8x8 digits (1,797 images, no download). The model is
``Linear(64 -> 32) -> tanh -> nn.Linear(32 -> 10)``; the first layer is the built-in
``linear`` autograd Function with a hand-written backward. The remote run calls it
on the server through ``client.function("linear")``; the local run calls
``Linear.apply`` in this process. Both start from the same weights and see the same
batches, so their losses agree to float32 rounding.

Usage: ``python examples/digits.py --target 127.0.0.1:50051 [--epochs 8]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from sklearn.datasets import load_digits

from gradserve.client import GradientClient
from gradserve.server.examples import Linear


class DigitsNet(torch.nn.Module):
    """64 -> 32 (custom linear, local or remote) -> tanh -> 10 logits."""

    def __init__(self, linear: Callable[..., torch.Tensor], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.linear = linear
        self.w1 = torch.nn.Parameter(torch.randn(32, 64, generator=g) / 8)
        self.b1 = torch.nn.Parameter(torch.zeros(32))
        self.w2 = torch.nn.Parameter(torch.randn(10, 32, generator=g) / 32**0.5)
        self.b2 = torch.nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.linear(x, self.w1, self.b1))
        return torch.nn.functional.linear(hidden, self.w2, self.b2)


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1]; a fixed 80/20 split. Shapes: [n, 64] float32 and [n] int64."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(linear: Callable[..., torch.Tensor], epochs: int, batch_size: int = 64, lr: float = 0.5) -> tuple[list[float], float]:
    """Train from a fixed start; return the mean training loss per epoch and the test accuracy."""
    x_train, y_train, x_test, y_test = load_data()
    model = DigitsNet(linear)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        losses.append(total / len(order))
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    return losses, accuracy


def compare(client: GradientClient, epochs: int) -> dict[str, Any]:
    """Train remotely and locally; print and return both loss curves and accuracies."""
    remote_losses, remote_acc = train(client.function("linear"), epochs)
    local_losses, local_acc = train(Linear.apply, epochs)
    print("epoch  remote loss  local loss   |difference|")
    for epoch, (remote, local) in enumerate(zip(remote_losses, local_losses), start=1):
        print(f"{epoch:>5}  {remote:>11.6f}  {local:>10.6f}   {abs(remote - local):.1e}")
    print(f"test accuracy: remote {remote_acc:.3f}, local {local_acc:.3f}")
    return {"remote": remote_losses, "local": local_losses, "remote_acc": remote_acc, "local_acc": local_acc}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="gradserve server HOST:PORT")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    with GradientClient(args.target, timeout=60) as client:
        compare(client, args.epochs)


if __name__ == "__main__":
    main()
