"""Shared fixtures: an in-process server on 127.0.0.1:<ephemeral>, torn down after the module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import gradserve_broken_functions  # noqa: F401  (registers the broken Functions)
import gradserve_test_functions  # noqa: F401  (registers the test Functions)
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve.server.examples  # noqa: F401  (registers the examples)
from gradserve.client import GradientClient
from gradserve.server import RunningServer, ServerConfig, create_server, registry

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = create_server(ServerConfig(port=0, device="cpu", max_workers=8), registry)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[GradientClient]:
    with GradientClient(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``gradserve serve`` as a real subprocess on a free loopback port."""

    def __init__(self, *extra: str, port: int | None = None, wait: bool = True) -> None:
        self.port = port or free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        self._start(
            [sys.executable, "-m", "gradserve.server._cli", "serve", "--port", str(self.port), "--device", "cpu", *extra], env
        )
        self.target = f"127.0.0.1:{self.port}"
        if wait:
            self._wait_ready(timeout_s=60)

    def _start(self, argv: list[str], env: dict[str, str]) -> None:
        """Start the server; a thread reads its stderr as it comes. Left unread, the pipe fills after
        64 KiB of log lines (one per call) and the server's next log write blocks every call."""
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def stderr_text(self) -> str:
        """What the server has written to stderr so far; all of it once it has exited."""
        if self.proc.poll() is not None:
            self._reader.join(timeout=30)  # workers of --workers may hold the pipe a moment longer
        return "".join(self.log)

    def _wait_ready(self, timeout_s: float) -> None:
        """Until health says SERVING (functions loaded and checked), or fail with the server's stderr."""
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True)
                    return reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    return self.proc.poll() is not None  # exited: stop waiting

            if not wait_until(serving, timeout_s=timeout_s, interval_s=0.05) or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"server did not start: {self.stderr_text()}")

    def terminate(self, timeout_s: float = 30) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.01) -> bool:
    """Poll ``predicate`` until true or the timeout passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def metric_value(metrics_port: int, name: str) -> float | None:
    """A sample's value scraped from a server's /metrics endpoint (``name`` with its labels, if any);
    None when the endpoint does not answer yet or has no such sample."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.rsplit(" ", 1)[0] == name), None)
