"""Every bad input gets the right status code and a message naming what it should; the server stays up."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from conftest import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_table import BY_NUMBER, WIRE_DTYPES

from gradserve.client import GradientClient, HandleNotFoundError
from gradserve.client._core import Plan
from gradserve.client._errors import from_rpc_error
from gradserve.server import RunningServer, ServerConfig, create_server, registry
from gradserve.v1 import codec
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

MiB = 1 << 20
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def small_server() -> Iterator[RunningServer]:
    """4 MiB request limit, 1 MiB tensor limit, --check-finite."""
    config = ServerConfig(port=0, device="cpu", max_request_bytes=4 * MiB, max_tensor_bytes=MiB, check_finite=True)
    running = create_server(config, registry)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def stub(small_server: RunningServer) -> Iterator[pb_grpc.GradientServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{small_server.port}", options=[("grpc.max_send_message_length", -1)]) as ch:
        yield pb_grpc.GradientServiceStub(ch)


def tensor(
    dtype: int = pb.DTYPE_FLOAT32, shape: tuple[int, ...] = (1,), data: bytes | None = None, requires_grad: bool = False
) -> pb.Value:
    if data is None:
        data = b"\0" * (math.prod(shape) * 4)
    return pb.Value(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data, requires_grad=requires_grad))


def good_x() -> pb.Value:
    return codec.encode_value(torch.tensor([1.0, 2.0], requires_grad=True))


def fails(call, request, code: grpc.StatusCode, *needles: str, reason: str | None = None, timeout: float = 10):
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=timeout)
    assert err.value.code() is code, err.value.details()
    for needle in needles:
        assert needle in err.value.details(), (needle, err.value.details())
    if reason is not None:
        assert from_rpc_error(err.value).reason == reason
    return err.value


def still_serves(stub: pb_grpc.GradientServiceStub) -> None:
    reply = stub.ForwardBackward(pb.ForwardBackwardRequest(function="square", args=[good_x()]), timeout=10)
    assert codec.decode_maybe_tensor(reply.grads[0]).tolist() == [2.0, 4.0]


# -- request validation ------------------------------------------------------------------

MALFORMED = {
    "unknown function": (
        pb.ForwardRequest(function="nope", args=[good_x()]),
        grpc.StatusCode.NOT_FOUND,
        ["no function named 'nope'"],
    ),
    "too many arguments": (
        pb.ForwardRequest(function="square", args=[good_x(), good_x()]),
        INVALID,
        ["square takes 1 argument, got 2"],
    ),
    "too few arguments": (pb.ForwardRequest(function="cube_plus_square", args=[good_x()]), INVALID, ["takes 2 arguments, got 1"]),
    "empty value": (pb.ForwardRequest(function="square", args=[pb.Value()]), INVALID, ["square argument 0", "empty Value"]),
    "dtype unspecified": (
        pb.ForwardRequest(function="square", args=[tensor(pb.DTYPE_UNSPECIFIED)]),
        INVALID,
        ["DTYPE_UNSPECIFIED"],
    ),
    "dtype unknown": (pb.ForwardRequest(function="square", args=[tensor(42)]), INVALID, ["unknown value 42"]),
    "byte count": (
        pb.ForwardRequest(function="square", args=[tensor(shape=(1024, 64, 2), data=b"\0" * 8)]),
        INVALID,
        ["square argument 0", "shape [1024, 64, 2] needs 524288 bytes of data, got 8"],
    ),
    "negative dimension": (
        pb.ForwardRequest(function="square", args=[tensor(shape=(2, -3), data=b"")]),
        INVALID,
        ["negative dimension"],
    ),
    "int64 overflow": (
        pb.ForwardRequest(function="square", args=[tensor(shape=(2**40, 2**40), data=b"")]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        ["shape [1099511627776, 1099511627776]", "over the int64 limit"],
    ),
    "over tensor limit": (
        pb.ForwardRequest(function="square", args=[tensor(shape=(2**20, 2**20), data=b"")]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        ["4398046511104 bytes, over the limit of 1048576 bytes"],
    ),
    "requires_grad on int64": (
        pb.ForwardRequest(function="square", args=[tensor(pb.DTYPE_INT64, (1,), b"\0" * 8, True)]),
        INVALID,
        ["square argument 0", "requires_grad is set on a tensor of dtype int64"],
    ),
    "requires_grad on bool": (
        pb.ForwardRequest(function="square", args=[tensor(pb.DTYPE_BOOL, (1,), b"\1", True)]),
        INVALID,
        ["bool"],
    ),
    "bool byte not 0/1": (
        pb.ForwardRequest(function="square", args=[tensor(pb.DTYPE_BOOL, (2,), b"\1\5")]),
        INVALID,
        ["other than 0 or 1"],
    ),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_forward(stub: pb_grpc.GradientServiceStub, kind: str) -> None:
    request, code, needles = MALFORMED[kind]
    fails(stub.Forward, request, code, *needles)
    still_serves(stub)


def test_oversized_request_is_resource_exhausted_quickly(stub: pb_grpc.GradientServiceStub) -> None:
    big = codec.encode_value(torch.zeros(5 * MiB // 4))  # 5 MiB to a 4 MiB server
    start = time.monotonic()
    fails(stub.Forward, pb.ForwardRequest(function="square", args=[big]), grpc.StatusCode.RESOURCE_EXHAUSTED, timeout=10)
    assert time.monotonic() - start < 5
    still_serves(stub)


def test_bad_grad_outputs(stub: pb_grpc.GradientServiceStub) -> None:
    def fb(*grad_outputs: pb.MaybeTensor) -> pb.ForwardBackwardRequest:
        return pb.ForwardBackwardRequest(function="square", args=[good_x()], grad_outputs=grad_outputs)

    one = codec.encode_maybe_tensor(torch.ones(2))
    fails(stub.ForwardBackward, fb(one, one), INVALID, "square returned 1 output(s), got 2 grad_outputs")
    fails(
        stub.ForwardBackward,
        fb(codec.encode_maybe_tensor(torch.ones(3))),
        INVALID,
        "expected float32 of shape [2], got float32 of shape [3]",
    )
    fails(
        stub.ForwardBackward,
        fb(codec.encode_maybe_tensor(torch.ones(2, dtype=torch.float64))),
        INVALID,
        "got float64 of shape [2]",
    )
    fails(stub.ForwardBackward, fb(pb.MaybeTensor()), INVALID, "square grad_outputs[0]: empty MaybeTensor")
    still_serves(stub)


def test_unknown_handle_and_missing_graph(stub: pb_grpc.GradientServiceStub) -> None:
    fails(
        stub.Backward,
        pb.BackwardRequest(function="square", handle="no-such-handle"),
        grpc.StatusCode.NOT_FOUND,
        "unknown, expired, evicted or already used",
        reason="HANDLE_NOT_FOUND",
    )
    fails(stub.Backward, pb.BackwardRequest(function="square"), INVALID, "set either handle or recompute")
    fwd = stub.Forward(pb.ForwardRequest(function="square", args=[good_x()], keep_graph=True), timeout=10)
    fails(stub.Backward, pb.BackwardRequest(function="softplus", handle=fwd.handle), INVALID, "belongs to function 'square'")
    reply = stub.Backward(pb.BackwardRequest(function="square", handle=fwd.handle), timeout=10)  # handle survived
    assert codec.decode_maybe_tensor(reply.grads[0]).tolist() == [2.0, 4.0]


# -- failures inside a registered Function --------------------------------------------------

FAILED = grpc.StatusCode.FAILED_PRECONDITION


def fb_request(function: str, *args: object) -> pb.ForwardBackwardRequest:
    return pb.ForwardBackwardRequest(function=function, args=[codec.encode_value(a) for a in args])


def test_function_failures_name_the_function(stub: pb_grpc.GradientServiceStub) -> None:
    leaf = lambda *shape: torch.ones(*shape, requires_grad=True)  # noqa: E731
    fails(
        stub.ForwardBackward,
        fb_request("forward_raises", leaf(1)),
        FAILED,
        "forward_raises forward raised ValueError: x must be positive",
        reason="FUNCTION_ERROR",
    )
    fails(
        stub.ForwardBackward,
        fb_request("article_cube_plus_square", torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)),
        FAILED,
        "article_cube_plus_square backward returned 1 gradient for 2 inputs",
    )
    fails(
        stub.ForwardBackward,
        fb_request("bad_grad_shape", leaf(2, 3)),
        FAILED,
        "bad_grad_shape backward",
        "argument 0",
        "got shape [2, 5], expected [2, 3]",
    )
    fails(stub.ForwardBackward, fb_request("bad_grad_dtype", leaf(2)), FAILED, "argument 0", "got dtype int64, expected float32")
    fails(
        stub.ForwardBackward,
        fb_request("grad_for_scalar", leaf(2), 2.0),
        FAILED,
        "grad_for_scalar backward returned a gradient for argument 1, which is not a tensor",
    )
    fails(stub.ForwardBackward, fb_request("returns_string", leaf(1)), FAILED, "returns_string forward returned str")
    still_serves(stub)


def test_traceback_stays_in_the_server_log(stub: pb_grpc.GradientServiceStub, caplog: pytest.LogCaptureFixture) -> None:
    err = fails(stub.Forward, pb.ForwardRequest(function="forward_raises", args=[good_x()]), FAILED)
    assert "Traceback" not in err.details() and "File " not in err.details()
    assert any(r.exc_info for r in caplog.records if "forward_raises" in r.getMessage())


def test_check_finite_reports_nan(stub: pb_grpc.GradientServiceStub) -> None:
    fails(
        stub.ForwardBackward,
        fb_request("log", torch.tensor([-1.0, 1.0], requires_grad=True)),
        FAILED,
        "log output 0 holds 1 NaN or Inf value(s) of 2",
        reason="NON_FINITE",
    )
    still_serves(stub)


@pytest.mark.parametrize(("dtype", "finite", "nan"), [(pb.DTYPE_FLOAT8_E4M3FN, 0x38, 0x7F), (pb.DTYPE_FLOAT8_E5M2, 0x3C, 0x7E)])
def test_check_finite_handles_float8(stub: pb_grpc.GradientServiceStub, dtype: int, finite: int, nan: int) -> None:
    """torch has no isfinite for float8: --check-finite must still answer (was INTERNAL), 1.0 passes, NaN is refused."""
    ok = stub.Forward(pb.ForwardRequest(function="identity", args=[tensor(dtype, (2,), bytes([finite, finite]))]), timeout=10)
    assert ok.outputs[0].data == bytes([finite, finite])
    request = pb.ForwardRequest(function="identity", args=[tensor(dtype, (2,), bytes([finite, nan]))])
    fails(stub.Forward, request, FAILED, "identity output 0 holds 1 NaN or Inf value(s) of 2", reason="NON_FINITE")


def test_out_of_memory_is_resource_exhausted_and_recovers(stub: pb_grpc.GradientServiceStub) -> None:
    fails(
        stub.Forward,
        fb_request("allocate_huge", torch.ones(1)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "allocate_huge forward: out of memory",
    )
    still_serves(stub)


# -- deadlines, cancellation --------------------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[RunningServer]:
    """A server of the test's own: its handle count and metrics start from zero whatever ran before."""
    running = create_server(ServerConfig(port=0, device="cpu"), registry)
    yield running
    running.stop(0)


def calls(server: RunningServer, function: str, code: str) -> float:
    """gradserve_requests_total for Forward calls of ``function`` that ended with ``code``."""
    labels = {"function": function, "method": "Forward", "code": code}
    return server.metrics.registry.get_sample_value("gradserve_requests_total", labels) or 0.0


def test_deadline_abandons_the_work_and_keeps_no_handle(own_server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    request = pb.ForwardRequest(
        function="slow_square",
        args=[codec.encode_value(torch.ones(2, requires_grad=True)), codec.encode_value(1.5)],
        keep_graph=True,
    )
    with grpc.insecure_channel(f"127.0.0.1:{own_server.port}") as channel, caplog.at_level(logging.INFO, "gradserve.calls"):
        stub = pb_grpc.GradientServiceStub(channel)
        start = time.monotonic()
        fails(stub.Forward, request, grpc.StatusCode.DEADLINE_EXCEEDED, timeout=1)
        assert time.monotonic() - start < 1.9  # the caller is not kept waiting for the work
        still_serves(stub)
        # The server finishes the sleep (Python cannot interrupt it), sees the deadline passed and keeps nothing;
        # metrics and log say DEADLINE_EXCEEDED (the caller's deadline), not CANCELLED.
        assert wait_until(lambda: calls(own_server, "slow_square", "DEADLINE_EXCEEDED") == 1, timeout_s=10)

        def lines() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "gradserve.calls" and getattr(r, "function", "") == "slow_square"]

        # The call's log line follows its metrics on the server's thread: wait for it too.
        assert wait_until(lambda: lines(), timeout_s=10)
    assert calls(own_server, "slow_square", "CANCELLED") == 0
    assert len(own_server.runtime.handles) == 0
    assert [r.code for r in lines()] == ["DEADLINE_EXCEEDED"]
    assert "function=slow_square code=DEADLINE_EXCEEDED" in lines()[0].getMessage()


def test_cancelled_call_keeps_no_handle(own_server: RunningServer) -> None:
    request = pb.ForwardRequest(
        function="slow_square",
        args=[codec.encode_value(torch.ones(2, requires_grad=True)), codec.encode_value(0.5)],
        keep_graph=True,
    )
    with grpc.insecure_channel(f"127.0.0.1:{own_server.port}") as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        future = stub.Forward.future(request, timeout=10)
        assert wait_until(lambda: own_server.metrics.registry.get_sample_value("gradserve_calls_in_flight") == 1, timeout_s=10)
        future.cancel()
        assert wait_until(lambda: calls(own_server, "slow_square", "CANCELLED") == 1, timeout_s=10)
        assert len(own_server.runtime.handles) == 0
        still_serves(stub)


def test_client_sdk_maps_handle_loss_to_recompute(small_server: RunningServer) -> None:
    with GradientClient(f"127.0.0.1:{small_server.port}", timeout=10) as client:
        with pytest.raises(HandleNotFoundError):
            client._run(Plan("backward", pb.BackwardRequest(function="square", handle="gone"), None, lambda r, _: r), None)


# -- fuzz ------------------------------------------------------------------------------------

DTYPE_NUMBERS = st.integers(-1, 19)
SHAPES = st.lists(st.one_of(st.integers(-3, 6), st.sampled_from([2**31, 2**40, 2**62])), max_size=4)


def is_well_formed(dtype: int, shape: list[int], data: bytes) -> bool:
    """The oracle, from the hand-written table in tests/wire_table.py (never the codec's own)."""
    if dtype not in BY_NUMBER or any(d < 0 for d in shape):
        return False
    itemsize = BY_NUMBER[dtype].itemsize
    if math.prod(max(d, 1) for d in shape) * itemsize >= 2**63:
        return False  # strides overflow even when a zero dimension makes it empty
    nbytes = math.prod(shape) * itemsize
    if nbytes > MiB or len(data) != nbytes:
        return False
    return dtype != WIRE_DTYPES["DTYPE_BOOL"].number or all(b <= 1 for b in data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=DTYPE_NUMBERS, shape=SHAPES, data=st.binary(max_size=64), exact=st.booleans(), requires_grad=st.booleans())
def test_fuzz_request_path(
    stub: pb_grpc.GradientServiceStub, dtype: int, shape: list[int], data: bytes, exact: bool, requires_grad: bool
) -> None:
    if exact and dtype in BY_NUMBER and all(0 <= d <= 6 for d in shape):
        # Often send the right byte count, so well-formed tensors are fuzzed too.
        data = (data * 100)[: math.prod(shape) * BY_NUMBER[dtype].itemsize]
        if dtype == WIRE_DTYPES["DTYPE_BOOL"].number:
            data = bytes(b & 1 for b in data)
    msg = pb.Value(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data, requires_grad=requires_grad))
    well_formed = is_well_formed(dtype, shape, data) and (not requires_grad or BY_NUMBER[dtype].differentiable)
    try:
        stub.ForwardBackward(pb.ForwardBackwardRequest(function="identity", args=[msg]), timeout=10)
        assert well_formed, "a malformed tensor was accepted"
    except grpc.RpcError as err:
        if well_formed:  # the only refusal a well-formed tensor may get here: NaN/Inf under --check-finite
            assert from_rpc_error(err).reason == "NON_FINITE", err.details()
        else:
            assert err.code() in (INVALID, grpc.StatusCode.RESOURCE_EXHAUSTED), (err.code(), err.details())
    still_serves(stub)


def test_good_callers_unaffected_by_a_hostile_one(stub: pb_grpc.GradientServiceStub, small_server: RunningServer) -> None:
    stop = threading.Event()
    bad_requests = [MALFORMED[k][0] for k in sorted(MALFORMED)]
    errors: list[BaseException] = []

    def hammer() -> None:
        i = 0
        while not stop.is_set():
            try:
                stub.Forward(bad_requests[i % len(bad_requests)], timeout=10)
            except grpc.RpcError:
                pass
            i += 1

    def good(seed: int) -> None:
        try:
            with GradientClient(f"127.0.0.1:{small_server.port}", timeout=10) as client:
                for i in range(25):
                    x = torch.randn(8, generator=torch.Generator().manual_seed(seed * 100 + i)).requires_grad_()
                    grads = client.forward_backward("cube_plus_square", x, x.detach()).grads
                    torch.testing.assert_close(grads[0], 3 * x.detach() ** 2)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    hammers = [threading.Thread(target=hammer) for _ in range(2)]
    goods = [threading.Thread(target=good, args=(s,)) for s in range(4)]
    for t in hammers + goods:
        t.start()
    for t in goods:
        t.join(timeout=60)
    stop.set()
    for t in hammers:
        t.join(timeout=10)
    assert not errors, errors[0]


# -- found by the hostile-user pass ---------------------------------------------------------------


def test_concurrent_backwards_on_one_handle(stub: pb_grpc.GradientServiceStub) -> None:
    fwd = stub.Forward(pb.ForwardRequest(function="square", args=[good_x()], keep_graph=True), timeout=10)
    codes: list[grpc.StatusCode] = []

    def backward() -> None:
        try:
            stub.Backward(pb.BackwardRequest(function="square", handle=fwd.handle), timeout=10)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())

    threads = [threading.Thread(target=backward) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(c.name for c in codes) == ["NOT_FOUND"] * 7 + ["OK"]  # never FAILED_PRECONDITION


def test_hostile_sizes_are_cut_short_in_errors(stub: pb_grpc.GradientServiceStub) -> None:
    err = fails(
        stub.Forward, pb.ForwardRequest(function="f" * 20000, args=[good_x()]), grpc.StatusCode.NOT_FOUND, "(20000 characters)"
    )
    assert len(err.details()) < 3000
    deep = pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 100000))
    fails(stub.Forward, pb.ForwardRequest(function="square", args=[deep]), INVALID, "100000 dimensions; at most 64")
    wide = pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 60 + [-1]))
    err = fails(stub.Forward, pb.ForwardRequest(function="square", args=[wide]), INVALID, "(61 dimensions)", "negative dimension")
    still_serves(stub)


def test_unknown_names_do_not_become_metric_labels(stub: pb_grpc.GradientServiceStub, small_server: RunningServer) -> None:
    for i in range(3):
        fails(stub.Forward, pb.ForwardRequest(function=f"nope-{i}\nforged", args=[good_x()]), grpc.StatusCode.NOT_FOUND)
    labels = {sample.labels.get("function") for metric in small_server.metrics.registry.collect() for sample in metric.samples}
    assert not any(str(label).startswith("nope") for label in labels)
