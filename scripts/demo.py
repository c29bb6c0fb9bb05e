"""``make demo``: start a server, run the seed examples and the digits example, stop the server."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import digits  # noqa: E402
import quickstart  # noqa: E402

from gradserve.client import GradientClient  # noqa: E402


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradserve.server._cli", "serve", "--port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""  # blocks until the server has bound its port
    match = re.search(r"listening on (\S+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start (printed {line!r}); see the messages above")
    return proc, match.group(1)


def latency(target: str, calls: int = 200) -> float:
    with GradientClient(target, timeout=30) as client:
        x = torch.tensor([1.0], requires_grad=True)
        for _ in range(20):
            client.forward_backward("square", x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            client.forward_backward("square", x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    proc, target = start_server()
    try:
        print(f"== gradserve server on {target}\n")
        quickstart.main(["--target", target])
        print(f"\nForwardBackward round trip, 1-element float32 square: median {latency(target):.2f} ms over 200 calls")
        print("\n== digits classifier: custom linear layer on the server vs the same layer locally\n")
        digits.main(["--target", target, "--epochs", "8"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        print("\n== server stopped")


if __name__ == "__main__":
    main()
