"""Issue 10: a server that hostile clients and broken Functions cannot take down.

Each test here failed on the main branch before the hardening. Raw stubs, not the SDK,
so each request is exactly the hostile one described.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import TESTS, ServerProcess, free_port, metric_value, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from gradserve.v1 import codec
from gradserve.server import Registry, RunningServer, ServerConfig, create_server
from gradserve.server import _servicer
from gradserve.server._config import add_serve_arguments, config_from_args
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

# -- Functions of these tests, in a registry of their own (the shared one stays as it is) ------------

hostile = Registry()


@hostile.register("square")
class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


@hostile.register("outer_sum")
def outer_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x of shape [N, 1] and y of shape [1, N] make an [N, N] output."""
    return x + y


@hostile.register("slow")
def slow(x: torch.Tensor, seconds: float) -> torch.Tensor:
    time.sleep(seconds)
    return x * 1


@hostile.register("raises_system_exit")
def raises_system_exit(x: torch.Tensor) -> torch.Tensor:
    raise SystemExit(3)


@hostile.register("raises_keyboard_interrupt")
def raises_keyboard_interrupt(x: torch.Tensor) -> torch.Tensor:
    raise KeyboardInterrupt


@hostile.register("backward_exits")
class BackwardExits(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        raise SystemExit("bye")


class _Flaky:
    failures_left = 0


@hostile.register("flaky_backward")
class FlakyBackward(torch.autograd.Function):
    """3x, whose backward fails while ``_Flaky.failures_left`` > 0."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 3

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        if _Flaky.failures_left > 0:
            _Flaky.failures_left -= 1
            raise RuntimeError("transient failure")
        return 3 * g


def start(**options: Any) -> RunningServer:
    return create_server(ServerConfig(port=0, device="cpu", **options), hostile)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = start(max_workers=4, max_tensor_bytes=1 << 20)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.GradientServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", -1)]) as channel:
        yield pb_grpc.GradientServiceStub(channel)


def value(t: torch.Tensor) -> pb.Value:
    return codec.encode_value(t)


def x1(requires_grad: bool = True) -> pb.Value:
    return value(torch.tensor([1.0, 2.0], requires_grad=requires_grad))


def reason(err: grpc.RpcError) -> str:
    from grpc_status import rpc_status
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def health_check(port: int, timeout_s: float = 1.0) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status


# -- Functions cannot stop the process or stall a call ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "exc_type"),
    [("raises_system_exit", "SystemExit"), ("raises_keyboard_interrupt", "KeyboardInterrupt")],
)
def test_base_exception_in_forward_is_failed_precondition(stub: pb_grpc.GradientServiceStub, name: str, exc_type: str) -> None:
    start_s = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.ForwardBackward(pb.ForwardBackwardRequest(function=name, args=[x1()]), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{name} forward raised {exc_type}" in info.value.details()
    assert time.monotonic() - start_s < 5  # answered, not left to the deadline
    assert stub.ForwardBackward(pb.ForwardBackwardRequest(function="square", args=[x1()]), timeout=10).grads


def test_base_exception_in_backward_is_failed_precondition(stub: pb_grpc.GradientServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ForwardBackward(pb.ForwardBackwardRequest(function="backward_exits", args=[x1()]), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "SystemExit" in info.value.details()


# -- auth fails closed ------------------------------------------------------------------------------


def test_token_file_with_only_comments_refuses_to_start(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# nobody yet\n\n   \n")
    with pytest.raises(ValueError, match=r"--auth-tokens-file .* holds no token"):
        start(auth_tokens_file=str(tokens))
    with pytest.raises(ValueError, match=r"--auth-tokens .* holds no token"):
        start(auth_tokens=" , ,")
    with pytest.raises(ValueError, match=r"--auth-tokens-file .*missing.*: cannot read"):
        start(auth_tokens_file=str(tmp_path / "missing"))


def test_tokens_over_plaintext_off_loopback_warn(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from gradserve.server import _server

    monkeypatch.setattr(_server, "_is_loopback", lambda host: False)  # bind loopback, act as if not
    with caplog.at_level(logging.WARNING, logger="gradserve.server"):
        running = start(auth_tokens="t")
        running.stop(0)
    assert any("plaintext" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert _server._is_loopback("127.0.0.1") and _server._is_loopback("::1") and not _server._is_loopback("0.0.0.0")


def test_refusals_are_logged_at_a_bounded_rate_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    running = start(auth_tokens="right")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            with caplog.at_level(logging.WARNING, logger="gradserve.server._auth"):
                for i in range(200):
                    with pytest.raises(grpc.RpcError) as info:
                        stub.ListFunctions(pb.ListFunctionsRequest(), metadata=[("authorization", f"Bearer wrong-{i}")], timeout=5)
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        logged = [r for r in caplog.records if r.name == "gradserve.server._auth"]
        assert 1 <= len(logged) <= 20  # a burst of 10, then about 1 a second
        assert running.metrics.auth_refusals.labels("PERMISSION_DENIED")._value.get() == 200
    finally:
        running.stop(0)


def test_reflection_needs_a_token_when_tokens_are_required() -> None:
    closed, opened = start(auth_tokens="t"), start(auth_tokens="t", open_reflection=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{closed.port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                ProtoReflectionDescriptorDatabase(channel).get_services()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(f"127.0.0.1:{opened.port}") as channel:
            assert "gradserve.v1.GradientService" in ProtoReflectionDescriptorDatabase(channel).get_services()
        assert health_check(closed.port) == SERVING  # probes still need no token
    finally:
        closed.stop(0)
        opened.stop(0)


# -- logs -------------------------------------------------------------------------------------------


class _FakeContext:
    """Just enough of grpc.ServicerContext to drive a servicer method directly.

    gRPC's own client refuses CR, LF and ESC in metadata, but a raw HTTP/2 client can
    send them, so the servicer is called as the server would call it.
    """

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata
        self.aborted: tuple[Any, str] | None = None

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def peer_identities(self) -> None:
        return None

    def time_remaining(self) -> float:
        return 10.0

    def is_active(self) -> bool:
        return True

    def abort_with_status(self, status: Any) -> None:
        self.aborted = (status.code, status.details)
        raise grpc.RpcError()


def test_request_id_cannot_forge_log_lines(server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    forged = "abc\r\n2026-01-01T00:00:00Z INFO gradserve.calls: request=x code=OK\x1b[2J"
    servicer = _servicer.GradientServicer()
    servicer.attach(server.runtime, server.metrics)
    with caplog.at_level(logging.INFO, logger="gradserve.calls"):
        servicer.ListFunctions(pb.ListFunctionsRequest(), _FakeContext([("x-request-id", forged)]))
        with pytest.raises(grpc.RpcError):
            servicer.Forward(pb.ForwardRequest(function="no\nsuch\x1b[0m", args=[x1()]), _FakeContext([("x-request-id", forged)]))
    lines = [logging.Formatter("%(message)s").format(r) for r in caplog.records if r.name == "gradserve.calls"]
    assert len(lines) == 2
    for line in lines:
        assert "\n" not in line and "\r" not in line and "\x1b" not in line
        assert "\\r\\n" in line  # shown escaped, not dropped


# -- CLI, config, health, metrics -----------------------------------------------------------------


def parse(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServerConfig:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(argv))


@pytest.mark.parametrize("port", [99999, -5, 65536])
def test_ports_are_validated(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=f"--port {port}: not a TCP port"):
        parse(["--port", str(port)], {}, monkeypatch)
    with pytest.raises(ValueError, match=f"--metrics-port {port}: not a TCP port"):
        ServerConfig(metrics_port=port)


def test_parse_errors_name_the_flag_or_variable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"GRADSERVE_PORT='abc': expected an integer"):
        parse([], {"GRADSERVE_PORT": "abc"}, monkeypatch)
    monkeypatch.delenv("GRADSERVE_PORT")
    with pytest.raises(ValueError, match=r"GRADSERVE_CHECK='maybe'"):
        parse([], {"GRADSERVE_CHECK": "maybe"}, monkeypatch)
    monkeypatch.delenv("GRADSERVE_CHECK")
    with pytest.raises(ValueError, match=r"GRADSERVE_HANDLE_TTL_S='soon': expected a number"):
        parse([], {"GRADSERVE_HANDLE_TTL_S": "soon"}, monkeypatch)
    monkeypatch.delenv("GRADSERVE_HANDLE_TTL_S")
    with pytest.raises(SystemExit):
        parse(["--max-workers", "many"], {}, monkeypatch)
    assert "argument --max-workers: expected an integer, got 'many'" in capsys.readouterr().err
    assert parse(["--port", "7"], {"GRADSERVE_PORT": "abc"}, monkeypatch).port == 7  # the flag wins; the variable is not read


def test_cli_bad_variable_is_one_line_and_health_ignores_it() -> None:
    env = dict(os.environ, GRADSERVE_PORT="abc")
    served = subprocess.run(
        [sys.executable, "-m", "gradserve.server._cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert served.returncode == 2
    assert served.stderr.strip() == "gradserve serve: error: GRADSERVE_PORT='abc': expected an integer"
    health = subprocess.run(
        [sys.executable, "-m", "gradserve.server._cli", "health", "--target", f"127.0.0.1:{free_port()}", "--timeout-s", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert health.returncode == 1 and "Traceback" not in health.stderr


def test_busy_metrics_port_names_the_flag() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"--metrics-port {port}: cannot serve metrics"):
            start(metrics_port=port)


def test_health_not_serving_when_no_function_serves() -> None:
    running = create_server(ServerConfig(port=0, device="cpu"), Registry())
    try:
        assert health_check(running.port) == NOT_SERVING
    finally:
        running.stop(0)


def test_counters_follow_prometheus_naming() -> None:
    running = start(metrics_port=free_port(), max_handles=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            for _ in range(3):  # one handle kept at most: two evictions
                assert stub.Forward(pb.ForwardRequest(function="square", args=[x1()], keep_graph=True), timeout=5).handle
        body = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        running.stop(0)
    assert "# TYPE gradserve_handle_evictions_total counter" in body or "# TYPE gradserve_handle_evictions counter" in body
    assert "gradserve_handle_evictions_total 2.0" in body
    assert "gauge" not in [line.split()[-1] for line in body.splitlines() if line.startswith("# TYPE gradserve_handle_evictions")]
    for line in body.splitlines():
        if line.startswith("# TYPE gradserve_") and line.endswith(" counter"):
            name = line.split()[2]
            assert f"{name.removesuffix('_total')}_total" in body


def test_stream_call_is_logged_with_its_real_final_code(caplog: pytest.LogCaptureFixture) -> None:
    running = start(max_tensor_bytes=128 << 20)
    n = 4096  # [n, 1] + [1, n]: a 64 MiB reply to a 32 KiB request, far more than flow control lets out unread
    payloads: list[torch.Tensor] = []
    args = [codec.encode_value(t, payloads=payloads) for t in (torch.ones(n, 1), torch.ones(1, n))]
    messages = [pb.StreamRequest(forward=pb.ForwardRequest(function="outer_sum", args=args))]
    messages += [pb.StreamRequest(data=bytes(c)) for c in codec_chunks(payloads)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel, caplog.at_level(logging.INFO, logger="gradserve.calls"):
            call = pb_grpc.GradientServiceStub(channel).StreamCall(iter(messages), timeout=30, metadata=[("x-request-id", "cancel-me")])
            first = next(call)  # the reply header has gone out, the data has not
            assert first.WhichOneof("part") == "forward"
            call.cancel()
            assert wait_until(lambda: any(getattr(r, "request_id", "") == "cancel-me" for r in caplog.records), timeout_s=10)
    finally:
        running.stop(0)
    record = next(r for r in caplog.records if getattr(r, "request_id", "") == "cancel-me")
    assert record.code == "CANCELLED"


def codec_chunks(payloads: list[torch.Tensor]) -> list[memoryview]:
    from gradserve.v1 import streaming

    return list(streaming.chunks(payloads, chunk_bytes=64 * 1024))


# -- concurrency ------------------------------------------------------------------------------------


def test_calls_over_the_cap_are_refused_fast_and_health_still_answers() -> None:
    running = start(max_workers=2, max_concurrent_rpcs=3)
    target = f"127.0.0.1:{running.port}"
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            request = pb.ForwardRequest(function="slow", args=[x1(False), pb.Value(float_value=1.5)])
            busy = [stub.Forward.future(request, timeout=30) for _ in range(3)]
            assert wait_until(lambda: running.limiter.in_progress() == 3, timeout_s=10)
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Forward(pb.ForwardRequest(function="square", args=[x1()]), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-concurrent-rpcs" in info.value.details()
            assert time.monotonic() - t0 < 1.0
            t0 = time.monotonic()
            assert health_check(running.port) == SERVING
            assert len(stub.ListFunctions(pb.ListFunctionsRequest(), timeout=1).functions) == len(hostile)
            assert time.monotonic() - t0 < 1.0
            for f in busy:
                assert f.result(timeout=30).outputs
        assert wait_until(lambda: running.limiter.in_progress() == 0, timeout_s=5)
    finally:
        running.stop(0)


def test_cancelled_unary_upload_frees_its_slot() -> None:
    running = start(max_workers=1, max_concurrent_rpcs=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=[("grpc.max_send_message_length", -1)]) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            big = pb.ForwardRequest(function="square", args=[value(torch.ones(8 << 20))])  # 32 MiB upload
            for _ in range(5):
                f = stub.Forward.future(big, timeout=10)
                f.cancel()

            def served() -> bool:  # a cancelled upload may still be arriving: then busy for a moment, never for good
                try:
                    return bool(stub.Forward(pb.ForwardRequest(function="square", args=[x1()]), timeout=10).outputs)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    return False

            assert wait_until(served, timeout_s=10, interval_s=0.05)
            assert wait_until(lambda: running.limiter.in_progress() == 0, timeout_s=10)
    finally:
        running.stop(0)


def test_idle_streams_are_cancelled_and_do_not_starve_health() -> None:
    running = start(idle_stream_timeout_s=0.5, max_concurrent_rpcs=40)
    port = running.port
    release = threading.Event()
    header = pb.StreamRequest(forward=pb.ForwardRequest(function="square", args=[pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4]))]))

    def header_then_nothing() -> Iterator[pb.StreamRequest]:
        yield header
        release.wait(30)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            streams = [stub.StreamCall(header_then_nothing(), timeout=20) for _ in range(60)]
            codes: list[grpc.StatusCode] = []
            lock = threading.Lock()

            def drain(s: Any) -> None:
                try:
                    for _ in s:
                        pass
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()
                with lock:
                    codes.append(code)

            readers = [threading.Thread(target=drain, args=(s,)) for s in streams]
            for t in readers:
                t.start()
            worst = 0.0
            t_end = time.monotonic() + 1.5
            while time.monotonic() < t_end:
                t0 = time.monotonic()
                assert health_check(port) == SERVING
                worst = max(worst, time.monotonic() - t0)
            for t in readers:
                t.join(timeout=10)
            release.set()
        assert worst < 1.0
        assert len(codes) == 60
        assert codes.count(grpc.StatusCode.CANCELLED) == 40  # the idle ones, cancelled after 0.5 s
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 20  # past --max-concurrent-rpcs
        assert running.metrics.idle_stream_cancels._value.get() == 40
        assert wait_until(lambda: running.limiter.in_progress() == 0, timeout_s=5)
    finally:
        release.set()
        running.stop(0)


# -- handles belong to their caller -----------------------------------------------------------------


def test_another_identity_cannot_use_or_release_a_handle() -> None:
    running = start(auth_tokens="alice,bob")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            alice, bob = [("authorization", "Bearer alice")], [("authorization", "Bearer bob")]
            handle = stub.Forward(pb.ForwardRequest(function="square", args=[x1()], keep_graph=True), metadata=alice, timeout=5).handle
            assert handle
            with pytest.raises(grpc.RpcError) as info:
                stub.Backward(pb.BackwardRequest(function="square", handle=handle), metadata=bob, timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND and reason(info.value) == "HANDLE_NOT_FOUND"
            assert stub.ReleaseHandles(pb.ReleaseHandlesRequest(handles=[handle]), metadata=bob, timeout=5).released == 0
            grads = stub.Backward(pb.BackwardRequest(function="square", handle=handle), metadata=alice, timeout=5).grads
            assert codec.decode_maybe_tensor(grads[0]).tolist() == [2.0, 4.0]  # intact for its owner
    finally:
        running.stop(0)


def test_anonymous_callers_share_one_identity(stub: pb_grpc.GradientServiceStub, server: RunningServer) -> None:
    handle = stub.Forward(pb.ForwardRequest(function="square", args=[x1()], keep_graph=True), timeout=5).handle
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as other:
        grads = pb_grpc.GradientServiceStub(other).Backward(pb.BackwardRequest(function="square", handle=handle), timeout=5).grads
    assert codec.decode_maybe_tensor(grads[0]).tolist() == [2.0, 4.0]


def test_failed_backward_keeps_the_handle(stub: pb_grpc.GradientServiceStub) -> None:
    handle = stub.Forward(pb.ForwardRequest(function="flaky_backward", args=[x1()], keep_graph=True), timeout=5).handle
    _Flaky.failures_left = 1
    with pytest.raises(grpc.RpcError) as info:
        stub.Backward(pb.BackwardRequest(function="flaky_backward", handle=handle), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    grads = stub.Backward(pb.BackwardRequest(function="flaky_backward", handle=handle), timeout=5).grads
    assert codec.decode_maybe_tensor(grads[0]).tolist() == [3.0, 3.0]
    with pytest.raises(grpc.RpcError) as info:  # a successful backward releases it
        stub.Backward(pb.BackwardRequest(function="flaky_backward", handle=handle), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_no_graph_kept_when_the_reply_is_refused(
    stub: pb_grpc.GradientServiceStub, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = server.runtime.handles.evictions
    n = 1000  # [1000, 1] + [1, 1000]: a 4 MB output from an 8 KB request, over the 1 MiB --max-tensor-bytes
    args = [value(torch.ones(n, 1, requires_grad=True)), value(torch.ones(1, n, requires_grad=True))]
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(pb.ForwardRequest(function="outer_sum", args=args, keep_graph=True), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(info.value) == "OUTPUT_TOO_LARGE"
    assert "--max-tensor-bytes" in info.value.details()
    monkeypatch.setattr(_servicer, "UNARY_RESPONSE_LIMIT_BYTES", 100)  # stands for protobuf's 2 GiB
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(pb.ForwardRequest(function="square", args=[value(torch.ones(100, requires_grad=True))], keep_graph=True), timeout=10)
    assert reason(info.value) == "RESPONSE_TOO_LARGE"
    assert len(server.runtime.handles) == 0 and server.runtime.handles.evictions == before


# -- admission before work --------------------------------------------------------------------------


def test_argument_count_is_checked_before_decoding(stub: pb_grpc.GradientServiceStub, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []
    real = codec.decode_value
    monkeypatch.setattr(codec, "decode_value", lambda *a, **k: decoded.append(1) or real(*a, **k))
    request = pb.ForwardRequest(function="square")
    request.args.extend([x1()] * 200_000)
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "square takes 1 argument, got 200000" in info.value.details()
    assert decoded == []


def test_declared_sizes_and_dtypes_checked_before_decoding(stub: pb_grpc.GradientServiceStub, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []
    real = codec.decode_value
    monkeypatch.setattr(codec, "decode_value", lambda *a, **k: decoded.append(1) or real(*a, **k))
    big = pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1 << 20]))  # 4 MiB declared, no data
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(pb.ForwardRequest(function="outer_sum", args=[x1(), big]), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    bad = pb.Value(tensor=pb.Tensor(dtype=42, shape=[1], data=b"\0" * 4))
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(pb.ForwardRequest(function="outer_sum", args=[x1(), bad]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert decoded == []  # argument 0 was well-formed, and still not decoded


def test_streamed_call_is_admitted_on_its_header_before_data() -> None:
    running = start(max_inflight_bytes=2 << 20, max_request_bytes=64 << 20, max_tensor_bytes=64 << 20)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            sent_data = threading.Event()

            def header_only() -> Iterator[pb.StreamRequest]:
                declared = pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1 << 20]))  # 4 MiB declared
                yield pb.StreamRequest(forward=pb.ForwardRequest(function="square", args=[declared]))
                sent_data.wait(10)  # never sends the data

            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                list(stub.StreamCall(header_only(), timeout=10))
            sent_data.set()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-inflight-bytes" in info.value.details()
            assert time.monotonic() - t0 < 2
    finally:
        running.stop(0)


def test_call_that_does_not_fit_waits_until_its_deadline() -> None:
    running = start(max_inflight_bytes=6 << 20, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=[("grpc.max_send_message_length", -1)]) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            big = value(torch.ones(500_000))  # 2 MB, counted three times (unary): two do not fit in 6 MiB
            holder = stub.Forward.future(pb.ForwardRequest(function="slow", args=[big, pb.Value(float_value=2.0)]), timeout=30)
            assert wait_until(lambda: running.servicer.budget.used >= 6_000_000, timeout_s=10)
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Forward(pb.ForwardRequest(function="square", args=[big]), timeout=0.8)
            waited = time.monotonic() - t0
            assert info.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert 0.6 < waited < 2.0  # it waited for room, up to its deadline
            patient = stub.Forward(pb.ForwardRequest(function="square", args=[big]), timeout=30)  # gets in once the first ends
            assert len(patient.outputs) == 1
            assert holder.result(timeout=30).outputs
        assert wait_until(lambda: running.servicer.budget.used == 0, timeout_s=5)
    finally:
        running.stop(0)


# -- start-up and shutdown (real processes) ---------------------------------------------------------


def _spawn(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **(env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradserve.server._cli", "serve", "--port", str(port), "--device", "cpu", *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, port


def _bound(port: int, proc: subprocess.Popen) -> bool:
    try:
        return health_check(port, timeout_s=0.5) == NOT_SERVING
    except grpc.RpcError:
        return proc.poll() is not None


@pytest.mark.parametrize("phase", ["loading", "checks"])
def test_sigterm_during_startup_exits_within_two_seconds(phase: str) -> None:
    if phase == "loading":
        proc, port = _spawn("--functions", "gradserve_hostile_functions", env={"GRADSERVE_TEST_IMPORT_SLEEP_S": "60"})
    else:
        proc, port = _spawn("--functions", "gradserve_hostile_functions", "--check")
    try:
        assert wait_until(lambda: _bound(port, proc), timeout_s=60) and proc.poll() is None
        time.sleep(0.5)  # well into the import or the minute-long check
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=10)
        assert time.monotonic() - t0 < 2.0
        assert status == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_check_over_its_budget_is_unavailable() -> None:
    with ServerProcess("--functions", "gradserve_hostile_functions", "--check", "--check-timeout-s", "1") as server:
        with grpc.insecure_channel(server.target) as channel:
            functions = pb_grpc.GradientServiceStub(channel).ListFunctions(pb.ListFunctionsRequest(), timeout=5).functions
    reasons = {f.name: f.unavailable_reason for f in functions}
    assert "check timed out after 1 s" in reasons["slow_check"]
    assert reasons["nap"] == ""


def test_function_cannot_stop_a_real_server_and_the_grace_period_ends_the_process() -> None:
    metrics_port = free_port()
    with ServerProcess(
        "--functions", "gradserve_hostile_functions", "--grace-period-s", "1", "--metrics-port", str(metrics_port)
    ) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:  # sys.exit in a Function: an answer, and the process lives on
                stub.Forward(pb.ForwardRequest(function="stop_the_process", args=[x1()]), timeout=10)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert health_check(server.port) == SERVING and server.proc.poll() is None
            stuck = stub.Forward.future(pb.ForwardRequest(function="nap", args=[x1(False), pb.Value(float_value=30.0)]), timeout=60)
            assert wait_until(lambda: metric_value(metrics_port, "gradserve_calls_in_flight") == 1, timeout_s=20)  # napping
            t0 = time.monotonic()
            status = server.terminate(timeout_s=20)
            took = time.monotonic() - t0
            with pytest.raises(grpc.RpcError):
                stuck.result(timeout=5)
    assert status == 3  # EXIT_FORCED, documented in the README
    assert took < 4.0  # 1 s grace, not the 30 s nap


def test_client_certificates_are_identities(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    server_cert.private_key_pem.write_to_path(tmp_path / "server.key")
    server_cert.cert_chain_pems[0].write_to_path(tmp_path / "server.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    running = start(
        tls_cert_file=str(tmp_path / "server.pem"), tls_key_file=str(tmp_path / "server.key"), tls_client_ca_file=str(tmp_path / "ca.pem")
    )

    def channel(who: str) -> grpc.Channel:
        cert = ca.issue_cert(f"{who}@example.com")
        credentials = grpc.ssl_channel_credentials(ca.cert_pem.bytes(), cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())
        return grpc.secure_channel(f"127.0.0.1:{running.port}", credentials)

    try:
        with channel("alice") as a, channel("bob") as b:
            alice, bob = pb_grpc.GradientServiceStub(a), pb_grpc.GradientServiceStub(b)
            handle = alice.Forward(pb.ForwardRequest(function="square", args=[x1()], keep_graph=True), timeout=10).handle
            with pytest.raises(grpc.RpcError) as info:
                bob.Backward(pb.BackwardRequest(function="square", handle=handle), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            grads = alice.Backward(pb.BackwardRequest(function="square", handle=handle), timeout=10).grads
            assert codec.decode_maybe_tensor(grads[0]).tolist() == [2.0, 4.0]
    finally:
        running.stop(0)


def test_concurrency_cap_defaults_follow_the_compute_slots() -> None:
    assert ServerConfig().concurrent_rpcs == 64
    assert ServerConfig(max_workers=100).concurrent_rpcs == 400  # more workers never fail to start
    assert ServerConfig(max_workers=2, max_concurrent_rpcs=3).concurrent_rpcs == 3
    with pytest.raises(ValueError, match="--max-concurrent-rpcs 3 is below --max-workers 4"):
        ServerConfig(max_workers=4, max_concurrent_rpcs=3)


def test_refused_calls_to_unknown_methods_grow_no_label_set() -> None:
    running = start(auth_tokens="t1")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            for method in ("/gradserve.v1.GradientService/Forward", "/evil.Service/Label\nInjection"):
                with pytest.raises(grpc.RpcError) as info:
                    channel.unary_unary(method)(b"", timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        samples = {
            s.labels["method"]: s.value
            for metric in running.metrics.registry.collect()
            if metric.name == "gradserve_requests"
            for s in metric.samples
            if s.name == "gradserve_requests_total"
        }
        assert samples == {"Forward": 1.0, "unknown": 1.0}  # the caller's path is no label value
    finally:
        running.stop(0)
