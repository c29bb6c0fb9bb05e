"""The client never crashes, never runs a call twice, and waits for a starting server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from conftest import ServerProcess, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import (
    ArgumentError,
    AsyncGradientClient,
    CancelledError,
    DeadlineExceededError,
    FunctionNotFoundError,
    GradientClient,
    InternalError,
    UnavailableError,
)
from gradserve.server import RunningServer
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

LOADING = ("--functions", "gradserve.server.examples", "--functions", "gradserve_slow_check", "--check")


def test_streamed_calls_to_a_loading_server_never_abort_the_client() -> None:
    """The issue's crash: streamed calls refused with LOADING under gRPC's retry policy aborted the
    process (SIGABRT in gRPC core) in 2 of 3 runs. The client now runs in a child process, so a
    crash shows as its exit status."""
    with ServerProcess(*LOADING, wait=False) as server:
        script = textwrap.dedent(f"""
            import time, torch
            from gradserve.client import GradientClient, GradServeError
            ok = failed = 0
            with GradientClient("{server.target}") as client:
                end = time.monotonic() + 6
                while time.monotonic() < end or not ok:
                    try:
                        y = client.forward("square", torch.full((5 * 1024 * 1024 // 4 + 1,), 3.0), timeout=60)
                        ok += bool((y == 9).all())
                    except GradServeError:
                        failed += 1
            print(ok, failed)
        """)
        child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    ok, failed = map(int, child.stdout.split())
    assert ok >= 1 and failed == 0, (child.stdout, child.stderr[-2000:])  # every call waited, then got the right answer


def test_a_call_made_while_the_server_starts_waits_for_it() -> None:
    """``make serve`` and a script started together: the call waits for the port and the loading."""
    with ServerProcess(*LOADING, wait=False) as server:
        with GradientClient(server.target) as client:  # no deadline: waits up to wait_for_server_s
            started = time.monotonic()
            result = client.forward_backward(
                "cube_plus_square", torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
            )
            waited_s = time.monotonic() - started
        assert (result.outputs.item(), result.grads[0].item(), result.grads[1].item()) == (17.0, 12.0, 6.0)
        assert waited_s > 0.5  # it did wait: the checks take seconds


def test_a_starting_server_is_waited_for_only_within_the_deadline() -> None:
    with ServerProcess(*LOADING, wait=False) as server:
        with GradientClient(server.target) as client:
            started = time.monotonic()
            with pytest.raises((UnavailableError, DeadlineExceededError)):  # not up yet, or still loading
                client.forward("square", torch.ones(1), timeout=1.0)
            assert time.monotonic() - started < 3.0
        with GradientClient(server.target, wait_for_server_s=0.5) as client:
            with pytest.raises(UnavailableError):
                client.forward("square", torch.ones(1))


def test_keepalive_goaway_does_not_run_a_call_twice() -> None:
    """Pings every second: the server answers GOAWAY too_many_pings. The call fails once, UNAVAILABLE;
    before, gRPC's retry policy sent it again and the Function ran 4 times."""
    aggressive = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    with ServerProcess("--functions", "gradserve_test_functions") as server:
        with GradientClient(server.target, options=aggressive) as client:
            with pytest.raises(UnavailableError):
                client.forward("slow_square", torch.ones(1), 6.0, timeout=30)
        with GradientClient(server.target) as client:  # the default keepalive is within the policy
            assert client.forward("slow_square", torch.full((1,), 3.0), 0.1, timeout=30).item() == 9.0
        server.terminate()
        log = server.stderr_text()
    runs = [line for line in log.splitlines() if "function=slow_square" in line and "method=Forward" in line]
    assert len(runs) == 2, log[-3000:]  # one per client call: the first was not sent again


def test_a_server_process_that_logged_more_than_a_pipe_holds_still_answers() -> None:
    """A review's "async client hangs after a sync client" was the harness: the server's stderr was a
    pipe nobody read until exit, so once 64 KiB of call log lines filled it, a worker blocked in
    write() inside its logging lock and every later call ended DEADLINE_EXCEEDED. ServerProcess
    now reads the server's stderr as it comes."""
    unknown = "\x00" * 128  # logged escaped, about 660 bytes a line: 400 calls log about 4 pipes' worth
    with ServerProcess() as server:
        with GradientClient(server.target, timeout=10) as client:
            for _ in range(400):
                with pytest.raises(FunctionNotFoundError):
                    client.forward(unknown, torch.ones(1))
            assert client.forward("square", torch.full((3,), 3.0)).tolist() == [9.0, 9.0, 9.0]

        async def after() -> list[list[float]]:
            async with AsyncGradientClient(server.target, timeout=10, connections=3) as aclient:
                calls = [aclient.forward("square", torch.full((2,), float(k))) for k in range(20)]
                return [reply.tolist() for reply in await asyncio.gather(*calls)]

        assert asyncio.run(after()) == [[float(k * k)] * 2 for k in range(20)]
        server.terminate()
        assert server.stderr_text().count("code=NOT_FOUND") == 400


def test_async_streamed_calls_to_a_loading_server_wait_and_succeed() -> None:
    """grpc.aio saw "INTERNAL: Internal error from Core" when a refusal raced the streamed header."""

    async def run(target: str) -> list[float]:
        async with AsyncGradientClient(target, timeout=60) as client:
            replies = await asyncio.gather(*(client.forward("square", torch.full((400_000,), 3.0)) for _ in range(20)))
            return [float(r[0]) for r in replies]

    with ServerProcess(*LOADING, wait=False) as server:
        assert wait_until(lambda: _loading(server.target), timeout_s=60)  # bound and loading: the calls meet LOADING
        assert asyncio.run(run(server.target)) == [9.0] * 20


def _loading(target: str) -> bool:
    """Whether the server is bound and still loading: health answers NOT_SERVING."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


class _Malformed(pb_grpc.GradientServiceServicer):
    """A server that breaks the contract in its replies."""

    def Forward(self, request, context):  # noqa: N802
        return pb.ForwardResponse(outputs=[])  # no outputs at all

    def ForwardBackward(self, request, context):  # noqa: N802
        wrong = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[7], data=bytes(28))  # the argument has 4 elements
        out = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], data=bytes(16))
        return pb.ForwardBackwardResponse(outputs=[out], grads=[pb.MaybeTensor(tensor=wrong)])


def test_replies_that_break_the_contract_are_internal_errors() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_GradientServiceServicer_to_server(_Malformed(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with GradientClient(f"127.0.0.1:{port}", timeout=10) as client:
            with pytest.raises(InternalError, match="no outputs") as err:
                client.forward("square", torch.ones(4))
            assert err.value.reason == "MALFORMED_REPLY"
            with pytest.raises(InternalError, match=r"gradient 0 has shape \[7\], expected \[4\]"):
                client.forward_backward("square", torch.ones(4, requires_grad=True))
    finally:
        server.stop(0)


def test_bad_arguments_and_a_closed_client_raise_gradserve_errors(server: RunningServer) -> None:
    client = GradientClient(f"127.0.0.1:{server.port}", timeout=10)
    x = torch.ones(2, requires_grad=True)
    for bad in ("abc", 1.0, [np.ones(2)]):
        with pytest.raises(ArgumentError, match="grad_outputs"):
            client.forward_backward("square", x, grad_outputs=bad)
    client.close()
    with pytest.raises(CancelledError, match="the client is closed"):
        client.forward("square", x)
