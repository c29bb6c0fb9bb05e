"""Indicative measurement: forward_backward of 1e7 float32 to one local server, over the network and through shared memory.

Usage: ``python benchmarks/shared_memory.py [--numel N] [--runs K]``. Starts an in-process
server on 127.0.0.1 (CPU), times ``forward_backward("square", x)`` with a client that
streams over gRPC and one with ``shared_memory=True``, and prints the medians and their
ratio. The machine this runs on is shared and noisy: quote the ratio as indicative.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradserve.server.examples  # noqa: F401  (registers "square")
from gradserve.client import GradientClient
from gradserve.server import ServerConfig, create_server, registry


def median_s(client: GradientClient, x: torch.Tensor, runs: int) -> float:
    """Median wall time of ``runs`` forward_backward calls, in seconds, after one warm-up call (which probes)."""
    client.forward_backward("square", x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = client.forward_backward("square", x)
        times.append(time.perf_counter() - start)
        assert torch.equal(result.grads[0], 2 * x.detach())
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=float, default=1e7)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    limit = 1 << 30
    server = create_server(
        ServerConfig(port=0, device="cpu", max_request_bytes=limit, max_tensor_bytes=limit, max_inflight_bytes=4 * limit),
        registry,
    )
    try:
        target = f"127.0.0.1:{server.port}"
        x = torch.randn(int(args.numel), requires_grad=True)
        with GradientClient(target, timeout=120) as net, GradientClient(target, timeout=120, shared_memory=True) as shared:
            network_s = median_s(net, x, args.runs)
            shared_s = median_s(shared, x, args.runs)
            assert shared.transport == "shared_memory", shared.transport
    finally:
        server.stop(0)
    print(f"forward_backward of {int(args.numel)} float32, median of {args.runs} runs")
    print(f"  network (StreamCall)  {1e3 * network_s:8.1f} ms")
    print(f"  shared memory         {1e3 * shared_s:8.1f} ms")
    print(f"  ratio shared/network  {shared_s / network_s:8.2f}")


if __name__ == "__main__":
    main()
