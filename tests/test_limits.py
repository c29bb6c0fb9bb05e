"""Exact bounds of every limit, at N-1, N and N+1: the component first, then one served call.

Each limit is documented as "at most N": exactly N is allowed, N + 1 is refused. The
handle TTL is tested with an injected clock (a graph kept at t is gone from t + ttl on),
never with sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import pytest
import torch

from gradserve.client._errors import from_rpc_error
from gradserve.server import RunningServer, ServerConfig, create_server, registry
from gradserve.server._admission import AdmissionExecutor, ByteBudget, ConcurrencyLimit
from gradserve.server._errors import HandleNotFound, ResourceExhausted
from gradserve.server._handles import Graph, HandleStore
from gradserve.server._registry import Registry
from gradserve.v1 import codec, streaming
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

SQUARE = registry.get("square")


class FakeClock:
    """A monotonic clock the test moves by hand, in seconds."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def graph(nbytes: int) -> Graph:
    """A kept graph of exactly ``nbytes`` bytes (uint8 input, no output)."""
    return Graph(SQUARE, [torch.zeros(nbytes, dtype=torch.uint8)], ())


def start(**config: object) -> RunningServer:
    return create_server(ServerConfig(port=0, device="cpu", **config), registry)


@pytest.fixture
def serve() -> Iterator:
    """Start servers with ``serve(**config)``; a stub each; all stopped after the test."""
    running: list[RunningServer] = []
    channels: list[grpc.Channel] = []

    def make(reg: Registry = registry, **config: object) -> tuple[RunningServer, pb_grpc.GradientServiceStub]:
        server = create_server(ServerConfig(port=0, device="cpu", **config), reg)
        running.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", -1)])
        channels.append(channel)
        return server, pb_grpc.GradientServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()
    for server in running:
        server.stop(0)


def uint8(n: int) -> pb.Value:
    return codec.encode_value(torch.full((n,), 7, dtype=torch.uint8))


def refused(call, request: object, code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED) -> tuple[str, str]:
    """The (message, ErrorInfo reason) of a call that must fail with ``code``."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    return info.value.details(), from_rpc_error(info.value).reason


# -- handle count (--max-handles) -------------------------------------------------------------


def test_handle_store_keeps_exactly_max_handles() -> None:
    store = HandleStore(max_handles=3, max_bytes=10**6, ttl_s=60)
    handles = [store.put(graph(1)) for _ in range(2)]
    assert len(store) == 2 and store.evictions == 0  # N - 1
    handles.append(store.put(graph(1)))
    assert len(store) == 3 and store.evictions == 0  # N: all kept
    handles.append(store.put(graph(1)))
    assert len(store) == 3 and store.evictions == 1  # N + 1: the least recently used goes
    with pytest.raises(HandleNotFound):
        store.take(handles[0])
    assert [store.take(h).nbytes for h in handles[1:]] == [1, 1, 1]


def test_served_max_handles_keeps_two_of_three(serve) -> None:
    _, stub = serve(max_handles=2)
    x = codec.encode_value(torch.tensor([3.0], requires_grad=True))

    def forward() -> str:
        return stub.Forward(pb.ForwardRequest(function="square", args=[x], keep_graph=True), timeout=10).handle

    def backward(handle: str) -> list[float]:
        reply = stub.Backward(pb.BackwardRequest(function="square", handle=handle), timeout=10)
        return codec.decode_tensor(reply.grads[0].tensor).tolist()

    first, second = forward(), forward()  # N: both kept
    assert (backward(first), backward(second)) == ([6.0], [6.0])
    first, second, third = forward(), forward(), forward()  # N + 1: the oldest is evicted
    message, reason = refused(stub.Backward, pb.BackwardRequest(function="square", handle=first), grpc.StatusCode.NOT_FOUND)
    assert reason == "HANDLE_NOT_FOUND"
    assert (backward(second), backward(third)) == ([6.0], [6.0])


# -- handle bytes (--max-handle-bytes) --------------------------------------------------------


def test_handle_store_byte_cap_is_inclusive() -> None:
    store = HandleStore(max_handles=100, max_bytes=100, ttl_s=60)
    assert store.put(graph(101)) is None and len(store) == 0  # one graph over the cap: not kept
    big = store.put(graph(100))  # exactly the cap: kept
    assert store.stats() == (1, 100)
    store.take(big)
    a, b = store.put(graph(60)), store.put(graph(39))
    assert store.stats() == (2, 99) and store.evictions == 0  # N - 1
    c = store.put(graph(1))
    assert store.stats() == (3, 100) and store.evictions == 0  # N
    store.put(graph(1))
    assert store.stats() == (3, 41) and store.evictions == 1  # N + 1: the oldest (60 bytes) goes
    with pytest.raises(HandleNotFound):
        store.take(a)
    assert (store.take(b).nbytes, store.take(c).nbytes) == (39, 1)


def test_served_max_handle_bytes(serve) -> None:
    # square keeps its input and its output: a float32 [n] graph holds 8n bytes.
    _, stub = serve(max_handle_bytes=400)

    def handle(n: int) -> str:
        x = codec.encode_value(torch.ones(n, requires_grad=True))
        return stub.Forward(pb.ForwardRequest(function="square", args=[x], keep_graph=True), timeout=10).handle

    assert handle(49) and handle(50)  # 392 and 400 bytes: kept
    assert handle(51) == ""  # 408 bytes: over the cap, no handle (the caller recomputes)


# -- handle lifetime (--handle-ttl-s), with an injected clock ------------------------------------


def test_handle_store_ttl_with_an_injected_clock() -> None:
    clock = FakeClock()
    store = HandleStore(max_handles=10, max_bytes=10**6, ttl_s=10.0, clock=clock)
    h = store.put(graph(4))
    clock.now += 9.999  # just before t + ttl: alive
    assert store.stats() == (1, 4)
    clock.now += 0.001  # exactly t + ttl: gone
    assert store.stats() == (0, 0) and store.evictions == 1
    with pytest.raises(HandleNotFound):
        store.take(h)
    h = store.put(graph(4))  # a backward just in time gets the graph
    clock.now += 9.5
    assert store.take(h).nbytes == 4


def test_served_handle_ttl(serve) -> None:
    server, stub = serve(handle_ttl_s=30.0)
    clock = FakeClock()
    server.runtime.handles.clock = clock
    x = codec.encode_value(torch.tensor([3.0], requires_grad=True))

    def forward() -> pb.ForwardResponse:
        return stub.Forward(pb.ForwardRequest(function="square", args=[x], keep_graph=True), timeout=10)

    kept = forward()
    assert kept.handle_ttl_ms == 30_000
    clock.now += 29.0  # N - 1 s
    reply = stub.Backward(pb.BackwardRequest(function="square", handle=kept.handle), timeout=10)
    assert codec.decode_tensor(reply.grads[0].tensor).tolist() == [6.0]
    at_ttl, past_ttl = forward().handle, None
    clock.now += 30.0  # N: expired
    _, reason = refused(stub.Backward, pb.BackwardRequest(function="square", handle=at_ttl), grpc.StatusCode.NOT_FOUND)
    assert reason == "HANDLE_NOT_FOUND"
    past_ttl = forward().handle
    clock.now += 31.0  # N + 1
    _, reason = refused(stub.Backward, pb.BackwardRequest(function="square", handle=past_ttl), grpc.StatusCode.NOT_FOUND)
    assert reason == "HANDLE_NOT_FOUND"


# -- tensor bytes (--max-tensor-bytes) ------------------------------------------------------------


def test_codec_tensor_byte_limit_is_inclusive() -> None:
    for n in (99, 100):
        assert codec.decode_tensor(codec.encode_tensor(torch.ones(n, dtype=torch.uint8)), max_bytes=100).numel() == n
    with pytest.raises(
        codec.TensorTooLarge, match=r"^t: uint8 tensor of shape \[101\] is 101 bytes, over the limit of 100 bytes$"
    ):
        codec.decode_tensor(codec.encode_tensor(torch.ones(101, dtype=torch.uint8)), max_bytes=100, what="t")


def test_served_max_tensor_bytes(serve) -> None:
    _, stub = serve(max_tensor_bytes=1000)
    for n in (999, 1000):
        (out,) = stub.Forward(pb.ForwardRequest(function="identity", args=[uint8(n)]), timeout=10).outputs
        assert out.data == bytes([7]) * n
    message, reason = refused(stub.Forward, pb.ForwardRequest(function="identity", args=[uint8(1001)]))
    assert (message, reason) == (
        "identity argument 0: tensor of shape [1001] is 1001 bytes, over the limit of 1000 bytes",
        "TENSOR_TOO_LARGE",
    )


# -- request bytes (--max-request-bytes) ----------------------------------------------------------


def test_stream_assembler_request_limit_is_inclusive() -> None:
    def header(n: int) -> pb.ForwardRequest:
        return pb.ForwardRequest(function="identity", args=[pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[n]))])

    for n in (99, 100):
        assert streaming.Assembler(header(n), max_total_bytes=100).sizes == [n]
    with pytest.raises(codec.TensorTooLarge, match=r"^f: streamed tensors total 101 bytes, over the request limit of 100 bytes$"):
        streaming.Assembler(header(101), max_total_bytes=100, what="f")


def _request_of(nbytes: int) -> pb.ForwardRequest:
    """An identity Forward whose serialised message is exactly ``nbytes`` long."""
    for n in range(nbytes, 0, -1):
        request = pb.ForwardRequest(function="identity", args=[uint8(n)])
        if request.ByteSize() == nbytes:
            return request
    raise AssertionError(f"no request of {nbytes} bytes")


def test_served_max_request_bytes_unary_and_streamed(serve) -> None:
    _, stub = serve(max_request_bytes=4096, max_tensor_bytes=1 << 20)
    for size in (4095, 4096):  # the whole message, as gRPC counts it
        assert len(stub.Forward(_request_of(size), timeout=10).outputs) == 1
    message, _ = refused(stub.Forward, _request_of(4097))
    assert message == "SERVER: Received message larger than max (4097 vs. 4096)"  # gRPC's own refusal

    def stream(n: int) -> Iterator[pb.StreamRequest]:  # the tensors' total, declared in the header
        yield pb.StreamRequest(
            forward=pb.ForwardRequest(function="identity", args=[pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[n]))])
        )
        data = bytes([7]) * n
        for i in range(0, n, 1024):  # chunks well under the per-message limit
            yield pb.StreamRequest(data=data[i : i + 1024])

    for n in (4095, 4096):
        replies = list(stub.StreamCall(stream(n), timeout=10))
        assert b"".join(r.data for r in replies) == bytes([7]) * n
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamCall(stream(4097), timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "identity: the request's tensors total 4097 bytes, over the request limit of 4096 bytes"


# -- sparse numel (codec.MAX_SPARSE_NUMEL) --------------------------------------------------------


def sparse(n: int) -> pb.Value:
    """An empty (nnz 0) sparse COO vector of ``n`` elements: cheap whatever ``n``."""
    return pb.Value(
        sparse_tensor=pb.SparseTensor(
            shape=[n], indices=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[1, 0]), values=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0])
        )
    )


def test_codec_sparse_numel_limit_is_inclusive() -> None:
    for n in (11, 12):
        assert codec.decode_sparse(sparse(n).sparse_tensor, max_numel=12).shape == (n,)
    with pytest.raises(codec.TensorTooLarge, match=r"has 13 elements; at most 12 are accepted"):
        codec.decode_sparse(sparse(13).sparse_tensor, max_numel=12)


def test_served_sparse_numel_limit(serve) -> None:
    reg = Registry()
    reg.add(lambda x: torch.tensor(float(x.shape[0]), dtype=torch.float64), name="length")
    _, stub = serve(reg)
    n = codec.MAX_SPARSE_NUMEL
    assert n == 2**31 - 1
    for size in (n - 1, n):
        (out,) = stub.Forward(pb.ForwardRequest(function="length", args=[sparse(size)]), timeout=10).outputs
        assert codec.decode_tensor(out).item() == size
    message, reason = refused(stub.Forward, pb.ForwardRequest(function="length", args=[sparse(n + 1)]))
    assert reason == "TENSOR_TOO_LARGE"
    assert message == (
        "length argument 0: sparse tensor of shape [2147483648] has 2147483648 elements; at most 2147483647 are accepted "
        "(torch's sparse kernels overflow on larger shapes)"
    )


# -- argument count (4096 for a Function taking *args) -------------------------------------------


def test_served_argument_count_limit(serve) -> None:
    reg = Registry()
    reg.add(lambda *xs: torch.tensor(float(len(xs))), name="count")
    _, stub = serve(reg)

    def call(n: int) -> pb.ForwardRequest:
        return pb.ForwardRequest(function="count", args=[pb.Value(float_value=1.0)] * n)

    for n in (4095, 4096):
        (out,) = stub.Forward(call(n), timeout=10).outputs
        assert codec.decode_tensor(out).item() == n
    message, reason = refused(stub.Forward, call(4097), grpc.StatusCode.INVALID_ARGUMENT)
    assert message == "count: 4097 positional and 0 keyword arguments; at most 4096 each"


# -- bytes in flight (--max-inflight-bytes) -------------------------------------------------------


def test_byte_budget_is_inclusive() -> None:
    budget = ByteBudget(100)
    with budget.acquire(100, what="f", timeout_s=0):  # exactly the limit, alone: admitted
        assert budget.used == 100
    with pytest.raises(ResourceExhausted, match=r"^f: 101 bytes in flight, over the server's --max-inflight-bytes of 100 bytes$"):
        budget.acquire(101, what="f", timeout_s=0)
    held = budget.acquire(1, what="g", timeout_s=0)
    second = budget.acquire(99, what="f", timeout_s=0)  # 1 + 99 = N
    assert budget.used == 100
    with pytest.raises(ResourceExhausted, match="no room for 1 bytes within the deadline: 100 of --max-inflight-bytes 100"):
        budget.acquire(1, what="f", timeout_s=0)  # N + 1
    second.release()
    held.release()
    second.release()  # idempotent
    assert budget.used == 0


def test_served_max_inflight_bytes(serve) -> None:
    # A unary call holds three copies of its request message while it runs.
    request = pb.ForwardRequest(function="identity", args=[uint8(1000)])
    need = 3 * request.ByteSize()
    for limit in (need + 1, need):
        _, stub = serve(max_inflight_bytes=limit)
        assert stub.Forward(request, timeout=10).outputs[0].data == bytes([7]) * 1000
    _, stub = serve(max_inflight_bytes=need - 1)
    message, reason = refused(stub.Forward, request)
    assert message == f"identity: {need} bytes in flight, over the server's --max-inflight-bytes of {need - 1} bytes"


# -- calls in progress (--max-concurrent-rpcs) ----------------------------------------------------


def test_concurrency_limit_admits_exactly_max_calls() -> None:
    executor = AdmissionExecutor(max_workers=4)
    refusals: list[str] = []
    limit = ConcurrencyLimit(executor, 2, on_refused=refusals.append)
    handler = SimpleNamespace(request_streaming=False, response_streaming=False)
    details = SimpleNamespace(method="/gradserve.v1.GradientService/Forward")
    release = threading.Event()
    try:

        def admit() -> object:
            chosen = limit.intercept_service(lambda _d: handler, details)
            if chosen is handler:
                executor.submit(release.wait, 10)  # gRPC runs the admitted call as one task of the pool
            return chosen

        assert admit() is handler and limit.in_progress() == 1  # N - 1
        assert admit() is handler and limit.in_progress() == 2  # N
        assert admit() is not handler and refusals == [details.method]  # N + 1: refused
        assert limit.in_progress() == 2
        release.set()  # the calls end: their slots come back
        executor.shutdown(wait=True)
        assert limit.in_progress() == 0
    finally:
        release.set()
        executor.shutdown(wait=False)
