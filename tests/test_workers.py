"""``gradserve serve --workers N``: worker processes on one port, and clients that use them all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import socket
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from conftest import TESTS, ServerProcess, free_port, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import AsyncGradientClient, GradientClient
from gradserve.server import ServerConfig
from gradserve.server._workers import supervise

# Connections a client opens so that, whatever the kernel's hash, both workers get some:
# all 16 on one of 2 workers has a chance of 2**-15.
SPREAD = 16
X = torch.tensor([1.0, -2.0], dtype=torch.float64)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Workers(ServerProcess):
    """``gradserve serve --workers N``, by default on ``--port 0``: the port is read from the line the parent prints."""

    def __init__(self, *extra: str, port: int = 0, env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.metrics_port = free_port()
        self._start(
            [
                sys.executable,
                "-m",
                "gradserve.server._cli",
                "serve",
                "--port",
                str(port),
                "--device",
                "cpu",
                "--metrics-port",
                str(self.metrics_port),
                "--max-workers",
                "4",
                *extra,
            ],
            {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **(env or {})},
        )
        if wait:
            self.port = self._announced_port(timeout_s=90)
            self.target = f"127.0.0.1:{self.port}"
            self._wait_ready(timeout_s=60)

    def _announced_port(self, timeout_s: float) -> int:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        match = re.search(r"gradserve listening on 127\.0\.0\.1:(\d+)", line)
        if not match:
            self.kill()
            raise RuntimeError(f"no listening line ({line!r}); log: {''.join(self.log)}")
        return int(match.group(1))

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of the parent's /metrics (0 when absent)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        self.metrics_text = text
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            base, _, rest = sample.partition("{")
            if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                return float(value)
        return 0.0

    def children(self) -> set[int]:
        """Pids of the parent's child processes (workers, and multiprocessing's resource tracker)."""
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        try:
            with open(path) as f:
                return {int(p) for p in f.read().split()}
        except FileNotFoundError:
            return set()

    def worker_pids(self) -> set[int]:
        """Pids of the worker processes (children started by multiprocessing's spawn)."""
        pids = set()
        for pid in self.children():
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    pids.add(pid)
        return pids


class HealthProbes:
    """Health checks over ``count`` connections opened once (each its own), so a check during the
    drain needs no new connection."""

    def __init__(self, target: str, count: int = 6) -> None:
        self.channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)]

    def statuses(self) -> set[int]:
        return {
            health_pb2_grpc.HealthStub(c).Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True).status
            for c in self.channels
        }

    def close(self) -> None:
        for c in self.channels:
            c.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def pids_of(client: GradientClient, calls: int) -> set[int]:
    """Pids of the worker processes that ran ``calls`` calls; checks each call's value and gradient."""
    pids = set()
    for _ in range(calls):
        x = X.clone().requires_grad_()
        result = client.forward_backward("worker_pid", x)
        pid = result.outputs - 2 * X
        assert torch.equal(pid, pid[0].expand(2)), pid
        torch.testing.assert_close(result.grads[0], torch.full_like(X, 2.0))
        pids.add(int(pid[0]))
    return pids


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    """Two workers; at the end the parent is killed (SIGKILL) and no worker may outlive it: the kernel
    tells them (PR_SET_PDEATHSIG), and they drain and exit."""
    with Workers("--workers", "2", "--functions", "gradserve_test_functions") as server:
        yield server
        children = server.children()
        assert len(server.worker_pids()) == 2
        server.proc.kill()
        server.proc.wait(timeout=30)
        wait_until(lambda: not any(alive(pid) for pid in children), timeout_s=30)
        orphans = [pid for pid in children if alive(pid)]
        for pid in orphans:  # leave nothing running, even when failing
            os.kill(pid, signal.SIGKILL)
        assert not orphans, "workers outlived their parent"


def test_calls_reach_both_worker_processes(workers: Workers) -> None:
    with GradientClient(workers.target, timeout=30, connections=SPREAD) as client:
        pids = pids_of(client, SPREAD)
    assert len(pids) == 2
    assert pids == workers.worker_pids()


def test_the_async_client_spreads_its_connections_too(workers: Workers) -> None:
    async def pids() -> set[int]:
        async with AsyncGradientClient(workers.target, timeout=30, connections=SPREAD) as client:
            results = await asyncio.gather(
                *(client.forward_backward("worker_pid", X.clone().requires_grad_()) for _ in range(SPREAD))
            )
        for r in results:
            torch.testing.assert_close(r.grads[0], torch.full_like(X, 2.0))
        return {int((r.outputs - 2 * X)[0]) for r in results}

    assert asyncio.run(pids()) == workers.worker_pids()


def test_one_connection_stays_on_one_worker(workers: Workers) -> None:
    with GradientClient(workers.target, timeout=30) as client:
        assert len(pids_of(client, 6)) == 1


def test_handles_are_found_on_a_client_with_many_connections(workers: Workers) -> None:
    misses = workers.metric("gradserve_requests_total", function="worker_pid", method="Backward", code="NOT_FOUND")
    served = workers.metric("gradserve_requests_total", function="worker_pid", method="Backward", code="OK")
    pids = set()
    with GradientClient(workers.target, timeout=30, connections=SPREAD) as client:
        f = client.function("worker_pid")
        for _ in range(2 * SPREAD):
            x = X.clone().requires_grad_()
            y = f(x)
            (3 * y).sum().backward()
            torch.testing.assert_close(x.grad, torch.full_like(X, 6.0))
            pids.add(int((y - 2 * X)[0]))
    assert len(pids) == 2  # the forwards ran on both workers ...
    # ... and every backward found its handle: by handle on the forward's connection, no recompute.
    assert workers.metric("gradserve_requests_total", function="worker_pid", method="Backward", code="NOT_FOUND") == misses
    assert workers.metric("gradserve_requests_total", function="worker_pid", method="Backward", code="OK") == served + 2 * SPREAD


def test_metrics_are_summed_over_the_workers(workers: Workers) -> None:
    before = workers.metric("gradserve_requests_total", function="worker_pid", method="ForwardBackward", code="OK")
    with GradientClient(workers.target, timeout=30, connections=SPREAD) as client:
        assert len(pids_of(client, SPREAD)) == 2
        with pytest.raises(Exception, match="NOT_FOUND|no function"):
            client.forward_backward("evil_label\nname", X)
    after = workers.metric("gradserve_requests_total", function="worker_pid", method="ForwardBackward", code="OK")
    assert after - before == SPREAD
    assert "evil_label" not in workers.metrics_text  # label values are server-side names only
    assert 'pid="' not in workers.metrics_text  # summed, not one series per process


def test_lifecycle_health_waits_for_every_worker_and_sigterm_drains_them_all(tmp_path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    server = Workers(
        "--workers",
        "2",
        "--functions",
        "gradserve_gated_import",
        "--drain-delay-s",
        "2",
        "--grace-period-s",
        "20",
        port=port,
        env={"GRADSERVE_TEST_GATE": str(tmp_path)},
        wait=False,
    )
    probes = HealthProbes(target)
    with server, contextlib.closing(probes):
        # One worker loads, the other waits at the gate: the port answers, health is NOT_SERVING everywhere.
        assert wait_until(lambda: sum("ready on device" in line for line in server.log) == 1, timeout_s=90), server.log
        assert probes.statuses() == {NOT_SERVING}
        (tmp_path / "open").touch()
        assert server._announced_port(timeout_s=60) == port
        assert wait_until(lambda: probes.statuses() == {SERVING}, timeout_s=30)
        worker_pids = server.worker_pids()
        assert len(worker_pids) == 2

        with GradientClient(target, timeout=60, connections=SPREAD) as client, ThreadPoolExecutor(4) as pool:
            xs = [torch.tensor([float(i + 1)], requires_grad=True) for i in range(4)]
            calls = [pool.submit(client.forward_backward, "slow_square", x, 2.5) for x in xs]
            assert wait_until(lambda: server.metric("gradserve_calls_in_flight") == 4, timeout_s=30)
            server.proc.send_signal(signal.SIGTERM)
            # Drain: NOT_SERVING on every connection at once, while the calls in flight go on ...
            assert wait_until(lambda: probes.statuses() == {NOT_SERVING}, timeout_s=1.5)
            for x, call in zip(xs, calls):
                result = call.result(timeout=60)  # ... and finish with the right gradient
                torch.testing.assert_close(result.outputs, x.detach() ** 2)
                torch.testing.assert_close(result.grads[0], 2 * x.detach())
        assert server.proc.wait(timeout=60) == 0
        assert not any(alive(pid) for pid in worker_pids)


def test_a_worker_that_dies_stops_the_server_with_status_4() -> None:
    with Workers("--workers", "2", "--functions", "gradserve_test_functions") as server:
        first, second = sorted(server.worker_pids())
        os.kill(first, signal.SIGKILL)
        assert server.proc.wait(timeout=60) == 4
        assert not alive(second)
        assert "worker" in "".join(server.log) and "status -9" in "".join(server.log)


def test_a_worker_that_cannot_start_stops_the_server_with_its_reason() -> None:
    server = Workers("--workers", "2", "--functions", "no_such_module_xyz", wait=False)
    with server:
        assert server.proc.wait(timeout=90) == 2
        assert wait_until(lambda: "gradserve serve: error:" in "".join(server.log), timeout_s=10)
        log = "".join(server.log)
        assert "cannot import functions module 'no_such_module_xyz'" in log
        assert "Traceback" not in log


def test_device_lists_are_checked_against_the_workers() -> None:
    assert [ServerConfig(workers=3, device="cpu, cpu").worker_device(i) for i in range(3)] == ["cpu", "cpu", "cpu"]
    assert ServerConfig(workers=2, device="cuda:0,cuda:1").worker_device(1) == "cuda:1"
    assert ServerConfig(workers=2, device="cpu").worker_device(1) == "cpu"
    with pytest.raises(ValueError, match="2 devices for --workers 1"):
        ServerConfig(device="cpu,cpu")
    with pytest.raises(ValueError, match="empty entry"):
        ServerConfig(workers=2, device="cpu,")
    with pytest.raises(ValueError, match="unix socket cannot be shared"):
        ServerConfig(workers=2, host="unix:/tmp/x.sock")
    with pytest.raises(ValueError, match="--workers 0: must be at least 1"):
        ServerConfig(workers=0)


def test_worker_count_is_bounded_by_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twice the CPUs, at least 4: a typo such as --workers 100000 must not spawn processes until memory runs out."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert ServerConfig(workers=16).workers == 16
    with pytest.raises(ValueError, match=r"--workers 17: at most 16 here \(twice the 8 CPUs, at least 4\)"):
        ServerConfig(workers=17)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert ServerConfig(workers=4).workers == 4
    with pytest.raises(ValueError, match="--workers 5: at most 4 here"):
        ServerConfig(workers=5)


def test_an_unknown_device_in_the_list_stops_startup_before_any_worker() -> None:
    with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N, got 'tpu:3'"):
        supervise(ServerConfig(workers=2, port=0, device="cpu,tpu:3"))


def test_client_connections_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        GradientClient("127.0.0.1:1", connections=0)
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ValueError, match="not with channel"):
        GradientClient("127.0.0.1:1", channel=channel, connections=2)


def test_shared_memory_tokens_work_on_every_worker(workers: Workers) -> None:
    """One probe, then calls through shared memory on both workers: the parent gives every worker one
    token key, so a token from one is good on the other (no refusal, no network fallback)."""
    x = torch.linspace(-1.0, 1.0, 65536, dtype=torch.float64)  # 512 KiB: over the 256 KiB threshold
    probes = workers.metric("gradserve_requests_total", function="", method="SharedMemoryProbe", code="OK")
    wire = workers.metric("gradserve_request_bytes_total", method="ForwardBackward")
    pids = set()
    with GradientClient(workers.target, timeout=30, connections=SPREAD, shared_memory=True) as client:
        for _ in range(SPREAD):
            result = client.forward_backward("worker_pid", x.clone().requires_grad_(), grad_outputs=torch.full_like(x, 3.0))
            torch.testing.assert_close(result.grads[0], torch.full_like(x, 6.0))
            offset = result.outputs - 2 * x
            assert torch.all(offset == offset[0])
            pids.add(int(offset[0]))
        assert client.transport == "shared_memory"
    assert pids == workers.worker_pids()
    assert workers.metric("gradserve_requests_total", function="", method="SharedMemoryProbe", code="OK") == probes + 1
    # Only references crossed gRPC: far less than the 2 x 512 KiB each call moved through /dev/shm.
    assert workers.metric("gradserve_request_bytes_total", method="ForwardBackward") - wire < SPREAD * 4096


def test_a_port_another_starting_server_reserved_is_refused() -> None:
    """A --workers parent holds its port bound (SO_REUSEPORT, not listening) while its workers start, for seconds: a
    second server started then must not join it, or the kernel would deal connections to both servers."""
    with socket.socket() as reserved:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        with pytest.raises(ValueError, match=f"--port {port}: another process holds this port"):
            supervise(ServerConfig(workers=2, port=port, device="cpu"))
