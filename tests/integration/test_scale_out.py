"""Three replicas on loopback and one client balancing round-robin over them.

The same shape as ``docker compose up --scale server=3`` with ``dns:///server:50051``, or
a Kubernetes headless Service: the client resolves several addresses and spreads calls.
ForwardBackward is stateless, so it must be right on every replica; a Forward and its
Backward landing on different replicas must still give the right gradient, because the
client sends the inputs again when the replica it reaches has no such graph.

The last two tests run against a ``dns:///`` GRADSERVE_TARGET (the compose ``tests``
service with ``--scale server=3``): they resolve every replica, and tell from each
replica's /metrics (port GRADSERVE_TARGET_METRICS_PORT, default 9464) that it served
calls. ``GRADSERVE_EXPECT_REPLICAS=N`` makes them fail unless the name resolves to N
replicas; without it they skip when it resolves to one.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from gradserve.client import GradientClient

from .conftest import ROUND_ROBIN, Endpoint, Server

REPLICAS = 3
FUNCTIONS = ("--functions", "gradserve.server.examples", "--functions", "integration.replica_functions")


def _distinct_free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[Server]]:
    with ExitStack() as stack, ThreadPoolExecutor(REPLICAS) as pool:
        futures = [pool.submit(Server, *FUNCTIONS, port=port) for port in _distinct_free_ports(REPLICAS)]
        servers, errors = [], []
        for future in futures:  # every one is waited for, so none is left running on a failure
            try:
                servers.append(stack.enter_context(future.result()))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:
            raise errors[0]
        yield servers


def _balanced_target(servers: list[Server]) -> str:
    return "ipv4:" + ",".join(s.target for s in servers)


def _square_and_pid(client: GradientClient, x: torch.Tensor) -> int:
    """One balanced ForwardBackward, checked; returns the pid of the replica that ran it."""
    result = client.forward_backward("square_and_pid", x)
    y, pid = result.outputs
    torch.testing.assert_close(y, x.detach() ** 2)
    torch.testing.assert_close(result.grads[0], 2 * x.detach())
    return int(pid)


def _until_every_replica_answered(client: GradientClient, servers: list[Server], max_calls: int = 60) -> list[int]:
    pids: list[int] = []
    expected = {s.proc.pid for s in servers}
    while set(pids) != expected and len(pids) < max_calls:
        pids.append(_square_and_pid(client, torch.randn(3, dtype=torch.float64, requires_grad=True)))
    assert set(pids) == expected, f"calls reached {sorted(set(pids))}, replicas are {sorted(expected)}"
    return pids


def test_forward_backward_is_right_on_every_replica(replicas: list[Server]) -> None:
    for server in replicas:  # each replica on its own
        with GradientClient(server.target, timeout=30) as direct:
            result = direct.forward_backward(
                "cube_plus_square", torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
            )
            assert result.outputs.item() == 17.0 and [g.item() for g in result.grads] == [12.0, 6.0]
            assert _square_and_pid(direct, torch.randn(4, dtype=torch.float64, requires_grad=True)) == server.proc.pid

    with GradientClient(_balanced_target(replicas), timeout=30, options=[ROUND_ROBIN]) as balanced:
        _until_every_replica_answered(balanced, replicas)
        # Once all are connected, round robin takes them in turn: 3 calls, 3 replicas.
        for _ in range(3):
            turn = [_square_and_pid(balanced, torch.randn(2, dtype=torch.float64, requires_grad=True)) for _ in range(REPLICAS)]
            assert sorted(turn) == sorted(s.proc.pid for s in replicas)
            f = balanced.forward_backward(
                "cube_plus_square", torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
            )
            assert f.outputs.item() == 17.0 and [g.item() for g in f.grads] == [12.0, 6.0]


class _Recorder(grpc.UnaryUnaryClientInterceptor):
    """Records (method, which graph a Backward names, status code) for every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, grpc.StatusCode]] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        method = details.method.rsplit("/", 1)[-1]
        graph = request.WhichOneof("graph") if method == "Backward" else ""
        self.calls.append((method, graph or "", outcome.code()))
        return outcome


def test_forward_and_backward_on_different_replicas_give_the_right_gradient(replicas: list[Server]) -> None:
    recorder = _Recorder()
    channel = grpc.intercept_channel(grpc.insecure_channel(_balanced_target(replicas), options=[ROUND_ROBIN]), recorder)
    try:
        with GradientClient(_balanced_target(replicas), timeout=30, channel=channel) as client:
            _until_every_replica_answered(client, replicas)
            remote = client.function("square_and_pid")
            forward_pids = []
            for i in range(6):
                x = torch.randn(5, dtype=torch.float64, requires_grad=True)
                w = torch.randn(5, dtype=torch.float64)
                y, pid = remote(x)
                forward_pids.append(int(pid))
                ((y * w).sum() * (i + 1)).backward()
                torch.testing.assert_close(x.grad, 2 * x.detach() * w * (i + 1))
    finally:
        channel.close()

    assert set(forward_pids) <= {s.proc.pid for s in replicas}
    backwards = [(graph, code) for method, graph, code in recorder.calls if method == "Backward"]
    # Round robin sent each Backward to a replica that never saw its Forward: the handle
    # was NOT_FOUND there, and the client recomputed from the inputs it kept, so the
    # gradients checked above are the recomputes'.
    assert backwards.count(("handle", grpc.StatusCode.NOT_FOUND)) >= 1, backwards
    assert backwards.count(("recompute", grpc.StatusCode.OK)) == backwards.count(("handle", grpc.StatusCode.NOT_FOUND))
    assert all(code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND) for _, code in backwards), backwards


# -- replicas behind a dns:/// target (compose --scale) ---------------------------------------

_DNS_TARGET = os.environ.get("GRADSERVE_TARGET", "").startswith("dns:")
needs_dns_target = pytest.mark.skipif(not _DNS_TARGET, reason="needs GRADSERVE_TARGET=dns:///NAME:PORT (compose)")


def _dns_replicas() -> list[str]:
    """The addresses the dns:/// target's name resolves to; skips unless several (or as expected)."""
    host_port = os.environ["GRADSERVE_TARGET"].split("/")[-1]
    host, _, port = host_port.rpartition(":")
    addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)})
    expected = int(os.environ.get("GRADSERVE_EXPECT_REPLICAS", "0"))
    if expected:
        assert len(addresses) == expected, f"{host} resolves to {addresses}, expected {expected} replicas"
    elif len(addresses) < 2:
        pytest.skip(f"{host} resolves to one replica ({addresses})")
    return addresses


def _served(address: str) -> float:
    """Calls a replica has answered so far: the sum of its gradserve_requests_total."""
    port = os.environ.get("GRADSERVE_TARGET_METRICS_PORT", "9464")
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == "gradserve_requests_total"
    )


@needs_dns_target
def test_every_replica_behind_the_dns_name_serves(endpoint: Endpoint) -> None:
    replicas = _dns_replicas()
    before = {a: _served(a) for a in replicas}
    after = dict(before)
    with endpoint.client() as balanced:
        for _ in range(20 * len(replicas)):  # round robin reaches each once all are connected
            f = balanced.forward_backward(
                "cube_plus_square", torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
            )
            assert f.outputs.item() == 17.0 and [g.item() for g in f.grads] == [12.0, 6.0]
            after = {a: _served(a) for a in replicas}
            if all(after[a] > before[a] for a in replicas):
                break
    served = {a: after[a] - before[a] for a in replicas}
    assert all(n > 0 for n in served.values()), f"calls served per replica (from /metrics): {served}"


@needs_dns_target
def test_forward_and_backward_on_different_dns_replicas_give_the_right_gradient(endpoint: Endpoint) -> None:
    _dns_replicas()
    recorder = _Recorder()
    channel = endpoint.channel(interceptors=(recorder,))
    try:
        with GradientClient(endpoint.target, timeout=30, channel=channel) as client:
            for _ in range(10):  # until round robin has every replica connected
                client.forward_backward("cube_plus_square", torch.tensor(2.0, requires_grad=True), torch.tensor(3.0))
            remote = client.function("cube_plus_square")
            for i in range(6):
                x = torch.randn(4, dtype=torch.float64, requires_grad=True)
                y = torch.randn(4, dtype=torch.float64, requires_grad=True)
                w = torch.randn(4, dtype=torch.float64)
                ((remote(x, y) * w).sum() * (i + 1)).backward()
                torch.testing.assert_close(x.grad, 3 * x.detach() ** 2 * w * (i + 1))
                torch.testing.assert_close(y.grad, 2 * y.detach() * w * (i + 1))
    finally:
        channel.close()
    backwards = [(graph, code) for method, graph, code in recorder.calls if method == "Backward"]
    # With the forward's replica and the backward's taken in turn, some backward reached a
    # replica without the graph: NOT_FOUND there, then the client recomputed.
    assert backwards.count(("handle", grpc.StatusCode.NOT_FOUND)) >= 1, backwards
    assert backwards.count(("recompute", grpc.StatusCode.OK)) == backwards.count(("handle", grpc.StatusCode.NOT_FOUND))
