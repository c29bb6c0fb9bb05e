"""Production features: health transitions, reflection, metrics, TLS, tokens, env config, bounded handles, versions."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import trustme
from conftest import free_port, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from gradserve.client import (
    FunctionNotFoundError,
    GradientClient,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from gradserve.server import Registry, RunningServer, ServerConfig, create_server, examples, registry
from gradserve.server._config import add_serve_arguments, config_from_args
from gradserve.server._logging import configure_logging
from gradserve.v1 import codec
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def health_status(target: str, credentials: grpc.ChannelCredentials | None = None) -> int | None:
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None


def test_health_loading_serving_draining() -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    config = ServerConfig(port=port, device="cpu", functions=("gradserve_slow_import",))
    started: list[RunningServer] = []
    loader = threading.Thread(target=lambda: started.append(create_server(config)))
    loader.start()
    assert wait_until(lambda: health_status(target) == NOT_SERVING, timeout_s=10)  # bound, still importing
    with GradientClient(target, timeout=5) as client:
        with pytest.raises(UnavailableError, match="functions are still loading"):
            client.list_functions(timeout=0.3)  # the import takes 1.5 s: still loading when the deadline passes
        loader.join(timeout=30)
        assert health_status(target) == SERVING
        assert "square" in {f.name for f in client.list_functions()}
        stopper = threading.Thread(target=lambda: started[0].stop(grace_period_s=5, drain_delay_s=1.0))
        stopper.start()
        assert wait_until(lambda: health_status(target) == NOT_SERVING, timeout_s=1)  # draining
        assert client.forward("square", torch.tensor([2.0])).tolist() == [4.0]  # still taking calls
        stopper.join(timeout=30)
        assert health_status(target) is None


def test_reflection_lists_the_service(server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"gradserve.v1.GradientService", "grpc.health.v1.Health"} <= services
        fd = db.FindFileContainingSymbol("gradserve.v1.GradientService")
        assert fd.package == "gradserve.v1"


def test_metrics_count_calls_by_code() -> None:
    running = create_server(ServerConfig(port=0, device="cpu", metrics_port=free_port()), registry)
    try:
        with GradientClient(f"127.0.0.1:{running.port}", timeout=10) as client:
            client.forward_backward("square", torch.tensor([1.0], requires_grad=True))
            with pytest.raises(FunctionNotFoundError):
                client.forward("nope", torch.ones(1))
            kept = client.function("square")(torch.ones(3, requires_grad=True))  # keeps a graph while alive
            body = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
            del kept
    finally:
        running.stop(0)
    assert 'gradserve_requests_total{code="OK",function="square",method="ForwardBackward"} 1.0' in body
    assert 'gradserve_requests_total{code="NOT_FOUND",function="",method="Forward"} 1.0' in body  # unknown names: no label
    assert 'gradserve_request_duration_seconds_count{function="square",method="ForwardBackward"} 1.0' in body
    assert "gradserve_handles 1.0" in body and "gradserve_handle_bytes 24.0" in body  # 3 floats in + 3 out
    assert "gradserve_calls_in_flight 0.0" in body and "gradserve_device_memory_bytes" in body


# -- TLS and tokens ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | bytes]:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client@example.com")
    d = tmp_path_factory.mktemp("pki")
    server_cert.private_key_pem.write_to_path(d / "server.key")
    server_cert.cert_chain_pems[0].write_to_path(d / "server.pem")
    ca.cert_pem.write_to_path(d / "ca.pem")
    return {
        "dir": d,
        "ca": ca.cert_pem.bytes(),
        "client_key": client_cert.private_key_pem.bytes(),
        "client_cert": client_cert.cert_chain_pems[0].bytes(),
    }


def tls_server(pki: dict, **extra: object) -> RunningServer:
    d = pki["dir"]
    return create_server(
        ServerConfig(port=0, device="cpu", tls_cert_file=str(d / "server.pem"), tls_key_file=str(d / "server.key"), **extra),
        registry,
    )


def test_tls(pki: dict) -> None:
    running = tls_server(pki)
    target = f"127.0.0.1:{running.port}"
    try:
        with GradientClient(target, timeout=10, root_certificates=pki["ca"]) as client:
            assert client.forward("square", torch.tensor([3.0])).tolist() == [9.0]
        with GradientClient(target, timeout=3) as plaintext:
            with pytest.raises(UnavailableError) as err:
                plaintext.forward("square", torch.tensor([3.0]))
            assert "the server may use TLS: pass tls=True" in err.value.message
    finally:
        running.stop(0)


def test_mutual_tls(pki: dict) -> None:
    running = tls_server(pki, tls_client_ca_file=str(pki["dir"] / "ca.pem"))
    target = f"127.0.0.1:{running.port}"
    try:
        with GradientClient(
            target, timeout=10, root_certificates=pki["ca"], private_key=pki["client_key"], certificate_chain=pki["client_cert"]
        ) as client:
            assert client.forward("square", torch.tensor([3.0])).tolist() == [9.0]
        with GradientClient(target, timeout=3, root_certificates=pki["ca"]) as anon:
            with pytest.raises(UnavailableError) as err:
                anon.forward("square", torch.tensor([3.0]))
            assert "may require a client certificate (private_key= and certificate_chain=)" in err.value.message
    finally:
        running.stop(0)


def test_bearer_tokens(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# team tokens\nsecret-from-file\n")
    running = create_server(
        ServerConfig(port=0, device="cpu", auth_tokens="secret-a", auth_tokens_file=str(tokens_file)), registry
    )
    target = f"127.0.0.1:{running.port}"
    try:
        for token in ("secret-a", "secret-from-file"):
            with GradientClient(target, timeout=10, token=token) as client:
                assert client.forward_backward("square", torch.tensor(1.0, requires_grad=True)).grads[0].item() == 2.0
        with GradientClient(target, timeout=10) as client, pytest.raises(UnauthenticatedError, match="missing bearer token"):
            client.list_functions()
        with GradientClient(target, timeout=10, token="wrong") as client, pytest.raises(PermissionDeniedError):
            client.forward("square", torch.ones(1))
        refused = running.metrics.requests.labels("", "Forward", "PERMISSION_DENIED")._value.get()
        assert refused == 1.0  # refusals are counted (and logged), not silent
        assert health_status(target) == SERVING  # probes need no token
    finally:
        running.stop(0)


# -- configuration and logs ---------------------------------------------------------------------


def parse_serve(argv: list[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> ServerConfig:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_every_flag_has_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "GRADSERVE_PORT": "6000",
        "GRADSERVE_MAX_REQUEST_BYTES": "1024",
        "GRADSERVE_CHECK": "true",
        "GRADSERVE_FUNCTIONS": "a.b,c.d",
        "GRADSERVE_HANDLE_TTL_S": "2.5",
        "GRADSERVE_LOG_FORMAT": "json",
    }
    config = parse_serve([], monkeypatch, env)
    assert (config.port, config.max_request_bytes, config.check, config.functions, config.handle_ttl_s, config.log_format) == (
        6000,
        1024,
        True,
        ("a.b", "c.d"),
        2.5,
        "json",
    )
    flagged = parse_serve(["--port", "7000", "--no-check", "--functions", "x"], monkeypatch, env)
    assert (flagged.port, flagged.check, flagged.functions) == (7000, False, ("x",))
    assert config.host == "127.0.0.1"  # loopback unless 0.0.0.0 is asked for


def test_json_log_lines_carry_the_call_fields(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """--log-format json as the server sets it up: one JSON object per call, with the call fields."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # configure_logging replaces the root handlers: undone after the test
    monkeypatch.setattr(root, "level", root.level)
    configure_logging("INFO", "json")
    running = create_server(ServerConfig(port=0, device="cpu"), registry)
    try:
        with GradientClient(f"127.0.0.1:{running.port}", timeout=10) as client:
            assert client.forward("square", torch.tensor([3.0])).tolist() == [9.0]
            with pytest.raises(FunctionNotFoundError):
                client.forward("no\nsuch", torch.tensor([3.0]))
    finally:
        running.stop(0)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    calls = {entry["function"]: entry for entry in lines if entry["logger"] == "gradserve.calls"}
    ok, missing = calls["square"], calls["'no\\nsuch'"]  # a caller's name is escaped: it cannot forge a line
    assert set(ok) == {"time", "level", "logger", "message", "request_id", "method", "function", "code", "duration_ms", "peer"}
    assert (ok["level"], ok["method"], ok["code"], missing["code"]) == ("INFO", "Forward", "OK", "NOT_FOUND")
    assert ok["time"].endswith("Z") and ok["peer"].startswith("ipv4:127.0.0.1:") and ok["duration_ms"] >= 0
    assert ok["message"].startswith(f"request={ok['request_id']} method=Forward function=square code=OK duration_ms=")


# -- handles: bounded, released, versioned ---------------------------------------------------------


@pytest.fixture
def tight_server() -> Iterator[RunningServer]:
    running = create_server(ServerConfig(port=0, device="cpu", max_handle_bytes=1000), registry)
    yield running
    running.stop(0)


def test_store_evicts_under_its_byte_cap_and_backward_still_right(tight_server: RunningServer) -> None:
    with GradientClient(f"127.0.0.1:{tight_server.port}", timeout=10) as client:
        xs = [torch.full((50,), float(i), requires_grad=True) for i in range(4)]  # 400 bytes of graph each
        ys = [client.function("square")(x) for x in xs]
        entries, nbytes = tight_server.runtime.handles.stats()
        assert entries == 2 and nbytes == 800 and tight_server.runtime.handles.evictions == 2
        upstream = torch.arange(50.0) - 20.0  # non-uniform: a dropped or reordered cotangent shows
        for x, y in zip(xs, ys):
            y.backward(upstream)  # the first two recompute
            assert x.grad.tolist() == (upstream * 2 * x.detach()).tolist()


def test_handle_released_when_outputs_are_dropped(tight_server: RunningServer) -> None:
    with GradientClient(f"127.0.0.1:{tight_server.port}", timeout=10) as client:
        y = client.function("square")(torch.ones(2, requires_grad=True))
        assert len(tight_server.runtime.handles) == 1
        del y
        gc.collect()
        assert wait_until(lambda: len(tight_server.runtime.handles) == 0, timeout_s=5)


def test_version_mismatch_is_failed_precondition() -> None:
    old, new = Registry(), Registry()
    old.add(examples.Square, name="square", version="1")
    new.add(examples.Square, name="square", version="2")
    server_old = create_server(ServerConfig(port=0, device="cpu"), old)
    server_new = create_server(ServerConfig(port=0, device="cpu"), new)
    try:
        x = codec.encode_value(torch.tensor([3.0], requires_grad=True))
        with (
            grpc.insecure_channel(f"127.0.0.1:{server_old.port}") as a,
            grpc.insecure_channel(f"127.0.0.1:{server_new.port}") as b,
        ):
            fwd = pb_grpc.GradientServiceStub(a).Forward(
                pb.ForwardRequest(function="square", args=[x], keep_graph=True), timeout=10
            )
            assert fwd.version == "1"
            recompute = pb.BackwardRequest(function="square", recompute=pb.Arguments(values=[x]), version=fwd.version)
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GradientServiceStub(b).Backward(recompute, timeout=10)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "forward ran version 1, this server serves version 2" in err.value.details()
        with GradientClient(f"127.0.0.1:{server_new.port}", timeout=10) as client:  # same version: fine
            assert client.forward_backward("square", torch.tensor(3.0, requires_grad=True)).grads[0].item() == 6.0
    finally:
        server_old.stop(0)
        server_new.stop(0)


def test_health_and_list_answer_while_compute_is_saturated() -> None:
    running = create_server(ServerConfig(port=0, device="cpu", max_workers=2), registry)
    target = f"127.0.0.1:{running.port}"
    try:
        with GradientClient(target, timeout=30) as client:
            busy = [threading.Thread(target=client.forward, args=("slow_square", torch.ones(1), 1.0)) for _ in range(4)]
            for t in busy:
                t.start()
            assert wait_until(lambda: running.limiter.in_progress() == 4, timeout_s=10)  # both compute slots taken, two queued
            start = time.monotonic()
            assert health_status(target) == SERVING
            assert "square" in {f.name for f in client.list_functions(timeout=2)}
            assert time.monotonic() - start < 1.0
            for t in busy:
                t.join(timeout=30)
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # v2: 1.5 CPUs round up
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, 64),  # no quota: the affinity mask
        ({"cpu.max": "garbage\n", "cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 64),  # v1 without a quota
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
        ({"cpu.max": "1000000 10000\n"}, 64),  # a quota above the affinity: the affinity wins
        ({}, 64),  # no cgroup files
    ],
)
def test_cpu_quota_reads_the_cgroup_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str], expected: int
) -> None:
    from gradserve.server._server import cpu_quota

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == expected


def test_cpu_quota_here_is_at_least_one_and_at_most_the_affinity() -> None:
    from gradserve.server._server import cpu_quota

    assert 1 <= cpu_quota() <= len(os.sched_getaffinity(0))


def test_cli_health_and_list_over_tls_with_a_token(pki: dict) -> None:
    from gradserve.server._cli import main

    running = tls_server(pki, auth_tokens="s3cret")
    target = f"127.0.0.1:{running.port}"
    ca = str(pki["dir"] / "ca.pem")
    try:
        assert main(["health", "--target", target, "--tls-ca-file", ca]) == 0  # no token needed for probes
        assert main(["health", "--target", target, "--timeout-s", "3"]) == 1  # plaintext against TLS
        assert main(["list", "--target", target, "--tls-ca-file", ca, "--token", "s3cret"]) == 0
        assert main(["list", "--target", target, "--tls-ca-file", ca, "--token", "wrong"]) == 1
    finally:
        running.stop(0)
