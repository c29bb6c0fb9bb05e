"""Indicative measurement: forward_backward to one local server, over gRPC and through same-host shared memory.

Usage: ``python benchmarks/shared_memory.py [--numel N ...] [--runs K]``. Starts an
in-process server on 127.0.0.1 (CPU) and, for each size, times
``forward_backward("square", x)`` of float32 ``x`` with a plain client (one message up to
1 MiB, StreamCall above) and one with ``shared_memory=True``, calls interleaved so both
see the same load, and prints the medians and their ratio. The machine this runs on is
shared and noisy: quote the ratios as indicative.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradserve.server.examples  # noqa: F401  (registers "square")
from gradserve.client import GradientClient
from gradserve.server import ServerConfig, create_server, registry


def timed_s(client: GradientClient, x: torch.Tensor) -> float:
    """Wall time of one checked forward_backward call, in seconds."""
    start = time.perf_counter()
    result = client.forward_backward("square", x)
    elapsed = time.perf_counter() - start
    assert torch.equal(result.grads[0], 2 * x.detach())
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=float, nargs="+", default=[1e7])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    limit = 1 << 30
    sizes = {"max_request_bytes": limit, "max_tensor_bytes": limit, "max_inflight_bytes": 4 * limit}
    server = create_server(ServerConfig(port=0, device="cpu", log_level="WARNING", **sizes), registry)
    try:
        target = f"127.0.0.1:{server.port}"
        with GradientClient(target, timeout=120) as net, GradientClient(target, timeout=120, shared_memory=True) as shared:
            print(f"{'float32 elements':>16} {'gRPC ms':>9} {'shm ms':>9} {'ratio':>6}   (medians of {args.runs}, interleaved)")
            for numel in args.numel:
                x = torch.randn(int(numel), requires_grad=True)
                timed_s(net, x), timed_s(shared, x)  # warm-up; the first shared call probes
                assert shared.transport == "shared_memory", shared.transport
                pairs = [(timed_s(net, x), timed_s(shared, x)) for _ in range(args.runs)]
                network_s = statistics.median(p[0] for p in pairs)
                shared_s = statistics.median(p[1] for p in pairs)
                print(f"{int(numel):>16} {1e3 * network_s:>9.2f} {1e3 * shared_s:>9.2f} {shared_s / network_s:>6.2f}")
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
