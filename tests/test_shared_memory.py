"""Same-host shared memory: exact gradients through /dev/shm, fallback, refused references, and no segment left behind.

Other processes share /dev/shm: assertions on leftovers look only at names carrying a
pid this test knows (a killed client's, a killed server's, this process's).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import TESTS, ServerProcess, wait_until

from gradserve.client import AsyncGradientClient, GradientClient, GradServeError
from gradserve.server import RunningServer, ServerConfig, create_server, registry
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.v1 import shm, streaming

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs a writable /dev/shm (Linux)")

MiB = 1 << 20
BIG = 100_000  # float64 elements: 800 kB, over the 256 KiB threshold and under the 1 MiB stream threshold
Metadata = tuple[tuple[str, str], ...]


def segments_of(pid: int) -> list[str]:
    """Our segments created by process ``pid`` (names carry the creator's pid)."""
    return [n for n in os.listdir(shm.SHM_DIR) if n.startswith("gradserve-") and n.split("-")[3] == str(pid)]


def wire_bytes(server: RunningServer, method: str) -> tuple[float, float]:
    """Request and response bytes that crossed gRPC for ``method`` so far."""
    registry_ = server.metrics.registry
    sent = registry_.get_sample_value("gradserve_request_bytes_total", {"method": method}) or 0.0
    received = registry_.get_sample_value("gradserve_response_bytes_total", {"method": method}) or 0.0
    return sent, received


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, RunningServer]]:
    made = {
        "handle": create_server(ServerConfig(port=0, device="cpu", max_tensor_bytes=8 * MiB), registry),
        "recompute": create_server(ServerConfig(port=0, device="cpu", max_handle_bytes=0), registry),
    }
    yield made
    for s in made.values():
        s.stop(0)


@pytest.fixture(scope="module")
def server(servers: dict[str, RunningServer]) -> RunningServer:
    return servers["handle"]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[GradientClient]:
    with GradientClient(f"127.0.0.1:{server.port}", timeout=30, shared_memory=True) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.GradientServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.GradientServiceStub(channel)


# -- exact gradients through shared memory ------------------------------------------------------


def test_probe_switches_the_client_to_shared_memory(client: GradientClient) -> None:
    assert client.transport in ("pending", "shared_memory")
    client.list_functions()
    assert client.transport == "shared_memory"


@pytest.mark.parametrize("n", [BIG, 100], ids=["above-threshold", "below-threshold"])
def test_forward_backward_equals_local_autograd(client: GradientClient, server: RunningServer, n: int) -> None:
    x = torch.randn(n, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n, dtype=torch.float64)
    before = wire_bytes(server, "ForwardBackward")
    result = client.forward_backward("cube_plus_square", x, y, grad_outputs=g)
    after = wire_bytes(server, "ForwardBackward")
    xl, yl = x.detach().requires_grad_(), y.detach().requires_grad_()
    out = xl**3 + yl**2
    out.backward(g)
    assert torch.equal(result.outputs, out.detach())
    assert torch.equal(result.grads[0], xl.grad) and torch.equal(result.grads[1], yl.grad)
    assert client.transport == "shared_memory"
    request, response = after[0] - before[0], after[1] - before[1]
    if n == BIG:  # only references crossed gRPC, both ways
        assert request < 4096 and response < 4096, (request, response)
    else:  # small tensors stay inline
        assert request > 3 * 8 * n and response > 3 * 8 * n, (request, response)
    assert segments_of(os.getpid()) == []


@pytest.mark.parametrize("kind", ["handle", "recompute"])
def test_backward_by_handle_and_by_recompute(servers: dict[str, RunningServer], kind: str) -> None:
    x = torch.randn(BIG, dtype=torch.float64, requires_grad=True)
    y = torch.randn(BIG, dtype=torch.float64, requires_grad=True)
    w = torch.randn(BIG, dtype=torch.float64)
    with GradientClient(f"127.0.0.1:{servers[kind].port}", timeout=30, shared_memory=True) as c:
        out = c.function("cube_plus_square")(x, y)
        assert c.transport == "shared_memory"
        (out * w).sum().backward()
    xl, yl = x.detach().requires_grad_(), y.detach().requires_grad_()
    local = xl**3 + yl**2
    (local * w).sum().backward()
    assert torch.equal(out.detach(), local.detach())
    assert torch.equal(x.grad, xl.grad) and torch.equal(y.grad, yl.grad)
    assert segments_of(os.getpid()) == []


def test_forward_of_two_outputs_and_a_large_integer_output(client: GradientClient) -> None:
    x = torch.randn(300, 400)
    values, indices = client.forward("max_with_index", x)
    assert torch.equal(values, x.max(dim=-1).values) and torch.equal(indices, x.max(dim=-1).indices)
    a, b = client.forward("two_outputs", torch.arange(50_000.0))
    assert a.shape == b.shape == (50_000,)


def test_decoded_tensors_are_writable_and_independent(client: GradientClient) -> None:
    x = torch.randn(BIG, dtype=torch.float64)
    out = client.forward("identity", x)
    out.add_(1.0)  # the reply's mapping is the client's own now
    assert torch.equal(out, x + 1.0)


def test_async_client(server: RunningServer) -> None:
    async def main() -> tuple[torch.Tensor, torch.Tensor, str]:
        async with AsyncGradientClient(f"127.0.0.1:{server.port}", timeout=30, shared_memory=True) as c:
            x = torch.randn(BIG, dtype=torch.float64, requires_grad=True)
            result = await c.forward_backward("square", x)
            return x.detach(), result.grads[0], c.transport

    x, grad, transport = asyncio.run(main())
    assert transport == "shared_memory"
    assert torch.equal(grad, 2 * x)


# -- fallback ----------------------------------------------------------------------------------


def test_server_with_shared_memory_off_gets_the_network() -> None:
    running = create_server(ServerConfig(port=0, device="cpu", shared_memory=False), registry)
    try:
        with GradientClient(f"127.0.0.1:{running.port}", timeout=30, shared_memory=True) as c:
            x = torch.randn(BIG, dtype=torch.float64, requires_grad=True)
            result = c.forward_backward("square", x)
            assert c.transport == "network"
        assert torch.equal(result.grads[0], 2 * x.detach())
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            name, _ = shm.create_segment([b"n" * 32])
            try:
                with pytest.raises(grpc.RpcError) as info:
                    pb_grpc.GradientServiceStub(channel).SharedMemoryProbe(pb.SharedMemoryProbeRequest(name=name), timeout=10)
            finally:
                shm.unlink(name)
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "shared memory off" in info.value.details()
    finally:
        running.stop(0)


class _LoseSegments(grpc.UnaryUnaryClientInterceptor):
    """Unlinks every segment a request references before it leaves: as if the server were on another host."""

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201 - gRPC's signature
        for slot in streaming.tensor_slots(request) if details.method.endswith("/Forward") else ():
            if slot.HasField("shared_memory"):
                shm.unlink(slot.shared_memory.name)
        return continuation(details, request)


def test_segment_the_server_cannot_find_sends_the_call_again_over_the_network(server: RunningServer) -> None:
    channel = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{server.port}"), _LoseSegments())
    try:
        with GradientClient("unused", timeout=30, shared_memory=True, channel=channel) as c:
            c.list_functions()
            assert c.transport == "shared_memory"
            x = torch.randn(BIG, dtype=torch.float64)
            assert torch.equal(c.forward("square", x), x * x)  # refused (nothing ran), then sent inline
            assert c.transport == "pending"  # the next call probes again
            assert torch.equal(c.forward_backward("square", x).outputs, x * x)
            assert c.transport == "shared_memory"
    finally:
        channel.close()
    assert segments_of(os.getpid()) == []


def test_client_without_the_flag_never_probes(server: RunningServer) -> None:
    with GradientClient(f"127.0.0.1:{server.port}", timeout=30) as c:
        c.forward("square", torch.ones(BIG))
        assert c.transport == "network"


# -- references the server refuses -------------------------------------------------------------


def _request(ref: pb.SharedMemoryRef, shape: tuple[int, ...] = (1024,)) -> pb.ForwardRequest:
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, shared_memory=ref)
    return pb.ForwardRequest(function="square", args=[pb.Value(tensor=tensor)])


def _refusal(stub: pb_grpc.GradientServiceStub, request: pb.ForwardRequest, metadata: Metadata) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(request, timeout=10, metadata=metadata)
    return info.value


@pytest.fixture(scope="module")
def session(stub: pb_grpc.GradientServiceStub) -> Metadata:
    return probe(stub)


def probe(stub: pb_grpc.GradientServiceStub) -> Metadata:
    """Metadata of calls through shared memory: the probe, done by hand as protocol.md §11 describes."""
    name, _ = shm.create_segment([b"nonce" * 6])
    try:
        reply = stub.SharedMemoryProbe(pb.SharedMemoryProbeRequest(name=name), timeout=10)
    finally:
        shm.unlink(name)
    assert reply.nonce == shm.probe_digest(b"nonce" * 6)
    token = shm.read_probe(reply.segment.name)
    return ((shm.REPLY_KEY, "65536"), (shm.TOKEN_KEY, token.hex()))


def test_probe_never_hands_out_what_a_segment_holds(stub: pb_grpc.GradientServiceStub, segment: str) -> None:
    """Any local process that can connect sees segment names in /dev/shm. Probing the server's own token
    segment of another caller must not give that caller's token away (it would open every segment of the
    server's user to it), nor unlink it."""
    name, _ = shm.create_segment([b"n" * 32])
    try:
        victim = stub.SharedMemoryProbe(pb.SharedMemoryProbeRequest(name=name), timeout=10)
    finally:
        shm.unlink(name)
    with pytest.raises(grpc.RpcError) as info:
        stub.SharedMemoryProbe(pb.SharedMemoryProbeRequest(name=victim.segment.name), timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "created by this server" in info.value.details()
    token = shm.read_probe(victim.segment.name)  # still there for its caller
    # Even a segment the server did not create only ever comes back as a digest.
    small, _ = shm.create_segment([token])
    try:
        reply = stub.SharedMemoryProbe(pb.SharedMemoryProbeRequest(name=small), timeout=10)
    finally:
        shm.unlink(small)
    shm.unlink(reply.segment.name)
    seen = reply.nonce
    assert seen == shm.probe_digest(token) and token not in seen
    stolen = ((shm.REPLY_KEY, "65536"), (shm.TOKEN_KEY, seen.hex()))
    error = _refusal(stub, _request(pb.SharedMemoryRef(name=segment, offset=0, byte_size=4096)), stolen)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert (shm.SHM_DIR / segment).exists()  # never mapped


def test_calls_without_the_probes_token_are_refused(stub: pb_grpc.GradientServiceStub, session: Metadata, segment: str) -> None:
    """A process of another user can list /dev/shm and learn segment names, but not read the token."""
    ref = pb.SharedMemoryRef(name=segment, offset=0, byte_size=4096)
    forged = session[1][1][:-2] + ("00" if session[1][1][-2:] != "00" else "11")
    for metadata in (session[:1], (session[0], (shm.TOKEN_KEY, forged)), (session[0], (shm.TOKEN_KEY, "zz"))):
        error = _refusal(stub, _request(ref), metadata)
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert shm.TOKEN_KEY in error.details()
    assert (shm.SHM_DIR / segment).exists()  # never mapped


@pytest.fixture
def segment() -> Iterator[str]:
    """A 4096-byte segment of ours (1024 float32 twos); unlinked afterwards, as a client does."""
    name, _ = shm.create_segment([torch.full((1024,), 2.0).view(torch.uint8)])
    yield name
    shm.unlink(name)


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "/dev/shm/gradserve-0-1-2-" + "0" * 32,
        "gradserve-0-1-2-" + "0" * 31 + "/",
        "gradserve-\u0660-1-2-" + "0" * 32,  # an Arabic-Indic zero: a digit to a str pattern's \d, not to us
        "libpod_lock",
        "",
    ],
)
def test_names_that_are_not_ours_are_refused_before_opening(
    stub: pb_grpc.GradientServiceStub, session: Metadata, name: str
) -> None:
    error = _refusal(stub, _request(pb.SharedMemoryRef(name=name, offset=0, byte_size=4096)), session)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a gradserve segment name" in error.details()


def test_segment_of_another_user_is_permission_denied(stub: pb_grpc.GradientServiceStub, session: Metadata, segment: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    os.chown(shm.SHM_DIR / segment, 12345, -1)
    error = _refusal(stub, _request(pb.SharedMemoryRef(name=segment, offset=0, byte_size=4096)), session)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "uid 12345" in error.details()
    assert (shm.SHM_DIR / segment).exists()  # refused before mapping: not unlinked by the server


def test_segment_others_may_open_is_permission_denied(stub: pb_grpc.GradientServiceStub, session: Metadata, segment: str) -> None:
    os.chmod(shm.SHM_DIR / segment, 0o644)
    error = _refusal(stub, _request(pb.SharedMemoryRef(name=segment, offset=0, byte_size=4096)), session)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("offset", "byte_size", "shape", "words"),
    [
        (0, 4000, (1024,), "needs 4096 bytes"),  # byte_size vs dtype and shape
        (0, 0, (0,), "empty tensors travel inline"),
        (32, 4096, (1024,), "not a multiple of 64"),
        (64, 4096, (1024,), "holds 4096 bytes, references need 4160"),  # past the segment's end
    ],
)
def test_sizes_and_offsets_are_checked(
    stub: pb_grpc.GradientServiceStub,
    session: Metadata,
    segment: str,
    offset: int,
    byte_size: int,
    shape: tuple[int, ...],
    words: str,
) -> None:
    error = _refusal(stub, _request(pb.SharedMemoryRef(name=segment, offset=offset, byte_size=byte_size), shape), session)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert words in error.details()


def test_overlapping_references_are_refused(stub: pb_grpc.GradientServiceStub, session: Metadata, segment: str) -> None:
    ref = pb.SharedMemoryRef(name=segment, offset=0, byte_size=4096)
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=(1024,), shared_memory=ref)
    request = pb.ForwardRequest(function="linear", args=[pb.Value(tensor=tensor)] * 2)
    error = _refusal(stub, request, session)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "overlap" in error.details()


def test_missing_segment_is_failed_precondition(stub: pb_grpc.GradientServiceStub, session: Metadata) -> None:
    error = _refusal(stub, _request(pb.SharedMemoryRef(name=shm.new_name(), offset=0, byte_size=4096)), session)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "does not exist" in error.details()


def test_limits_are_checked_from_the_header_before_mapping(stub: pb_grpc.GradientServiceStub, session: Metadata) -> None:
    # 16 MiB declared, over --max-tensor-bytes 8 MiB: refused before the (missing) segment is looked for.
    ref = pb.SharedMemoryRef(name=shm.new_name(), offset=0, byte_size=16 * MiB)
    error = _refusal(stub, _request(ref, (4 * MiB,)), session)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_shared_bytes_count_against_the_inflight_budget_before_mapping() -> None:
    running = create_server(ServerConfig(port=0, device="cpu", max_inflight_bytes=2 * MiB), registry)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            ref = pb.SharedMemoryRef(name=shm.new_name(), offset=0, byte_size=4 * MiB)  # missing: never looked for
            error = _refusal(stub, _request(ref, (MiB,)), probe(stub))
    finally:
        running.stop(0)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-inflight-bytes" in error.details()


def test_reference_without_the_metadata_is_invalid(stub: pb_grpc.GradientServiceStub, segment: str) -> None:
    error = _refusal(stub, _request(pb.SharedMemoryRef(name=segment, offset=0, byte_size=4096)), ())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "SharedMemoryProbe" in error.details()


def test_a_good_reference_is_mapped_and_unlinked(stub: pb_grpc.GradientServiceStub, session: Metadata, segment: str) -> None:
    reply = stub.Forward(_request(pb.SharedMemoryRef(name=segment, offset=0, byte_size=4096)), timeout=10, metadata=session)
    assert not (shm.SHM_DIR / segment).exists()  # unlinked once mapped
    assert reply.outputs[0].data == torch.full((1024,), 4.0).numpy().tobytes()  # under the reply threshold: inline


# -- nothing left behind -----------------------------------------------------------------------

_KILLED_CLIENT = """
import sys, torch
from gradserve.client import GradientClient
with GradientClient(sys.argv[1], timeout=60, shared_memory=True) as c:
    c.list_functions()
    assert c.transport == "shared_memory", c.transport
    c.forward("square_after_signal", torch.ones(1 << 20), sys.argv[2], 3.0)
"""


def test_client_killed_mid_call_leaves_no_segment(server: RunningServer, tmp_path: Path) -> None:
    started = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CLIENT, f"127.0.0.1:{server.port}", str(started)],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])),
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_until(lambda: started.exists() or proc.poll() is not None, timeout_s=60), "the call never started"
        assert proc.poll() is None, proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)  # the Function is running: its argument is mapped, the reply not made yet
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # The server finishes the Function, finds the caller gone and makes no reply segment.
    in_flight = server.metrics.registry
    assert wait_until(lambda: (in_flight.get_sample_value("gradserve_calls_in_flight") or 0) == 0, timeout_s=30)
    assert segments_of(proc.pid) == []
    assert segments_of(os.getpid()) == []  # the in-process server's


def test_server_killed_mid_call_leaves_no_segment(tmp_path: Path) -> None:
    started = tmp_path / "started"
    errors: list[BaseException] = []
    with ServerProcess("--functions", "gradserve_test_functions") as proc:
        client = GradientClient(proc.target, timeout=60, shared_memory=True)

        def call() -> None:
            try:
                client.forward("square_after_signal", torch.ones(1 << 20), str(started), 30.0)
            except GradServeError as exc:
                errors.append(exc)

        worker = threading.Thread(target=call)
        worker.start()
        assert wait_until(started.exists, timeout_s=60), "the call never started"
        proc.proc.send_signal(signal.SIGKILL)
        worker.join(timeout=60)
        client.close()
    assert errors and errors[0].code is grpc.StatusCode.UNAVAILABLE
    assert client.transport == "shared_memory"
    assert segments_of(proc.proc.pid) == [] and segments_of(os.getpid()) == []


_DIES_HOLDING_A_SEGMENT = """
import os, signal
from gradserve.v1 import shm, streaming
print(shm.create_segment([b"x" * 100])[0], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sweeper_removes_segments_of_dead_processes_only() -> None:
    dead = subprocess.run([sys.executable, "-c", _DIES_HOLDING_A_SEGMENT], capture_output=True, text=True, timeout=60)
    name = dead.stdout.strip()
    assert dead.returncode == -signal.SIGKILL and (shm.SHM_DIR / name).exists()
    alive, _ = shm.create_segment([b"y"])
    try:
        running = create_server(ServerConfig(port=0, device="cpu"), registry)  # sweeps on start-up
        running.stop(0)
        assert not (shm.SHM_DIR / name).exists()
        assert (shm.SHM_DIR / alive).exists()  # its creator (this process) is alive
    finally:
        shm.unlink(alive)
        shm.unlink(name)


def test_unread_reply_segment_is_unlinked_after_its_ttl() -> None:
    from gradserve.server._shm import SharedMemoryService

    class Active:
        def is_active(self) -> bool:
            return True

    service = SharedMemoryService(True, reply_ttl_s=0.0)
    response = pb.ForwardResponse(outputs=[pb.Tensor(dtype=pb.DTYPE_UINT8, shape=(4096,))])
    name = service.send(response, [torch.zeros(4096, dtype=torch.uint8)], 1024, Active())
    assert name is not None and (shm.SHM_DIR / name).exists()
    service.sweep()  # the reply's time is up and no client unlinked it
    assert not (shm.SHM_DIR / name).exists()
