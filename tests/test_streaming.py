"""Large tensors: chunked StreamCall, bit-exact with checksums; malformed streams; the async client."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
import torch

from gradserve.client import AsyncGradientClient, GradientClient, InvalidArgumentError, ResourceExhaustedError
from gradserve.server import RunningServer, ServerConfig, create_server, registry
from gradserve.v1 import codec, streaming
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

MiB = 1 << 20


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(codec.wire_bytes(t).numpy().tobytes()).hexdigest()


def random_bits(nbytes: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g).view(dtype)


@pytest.fixture(scope="module")
def target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64, torch.int64])
def test_large_tensors_round_trip_bit_exactly(target: str, dtype: torch.dtype) -> None:
    x = random_bits(6 * MiB, dtype).reshape(-1, 4)  # over 4 MiB and over the 1 MiB streaming threshold
    with GradientClient(target, timeout=60) as client:
        y = client.forward("identity", x)
    assert y.dtype == dtype and y.shape == x.shape and digest(y) == digest(x)


def test_streamed_forward_backward_equals_local(target: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 256, generator=g, requires_grad=True)  # 4 MiB
    w = torch.randn(64, 256, generator=g, requires_grad=True)
    b = torch.randn(64, generator=g, requires_grad=True)
    upstream = torch.randn(4096, 64, generator=g)
    with GradientClient(target, timeout=60) as client:
        result = client.forward_backward("linear", x, w, b, grad_outputs=upstream)
        y = client.function("linear")(x, w, b)  # streamed forward, streamed backward by handle
        y.backward(upstream)
    local = torch.nn.functional.linear(x.detach(), w.detach(), b.detach())
    torch.testing.assert_close(result.outputs, local)
    torch.testing.assert_close(result.grads[0], upstream @ w.detach())
    torch.testing.assert_close(result.grads[1], upstream.T @ x.detach())
    torch.testing.assert_close(x.grad, result.grads[0])
    torch.testing.assert_close(w.grad, result.grads[1])


def test_streamed_backward_recomputes_when_the_handle_is_gone() -> None:
    one_handle = create_server(ServerConfig(port=0, device="cpu", max_handles=1), registry)
    x = torch.randn(512 * 1024, requires_grad=True)  # 2 MiB
    upstream = torch.randn(512 * 1024, generator=torch.Generator().manual_seed(1))  # not all ones
    try:
        with GradientClient(f"127.0.0.1:{one_handle.port}", timeout=60) as client:
            y = client.function("square")(x)
            client.function("square")(torch.ones(1, requires_grad=True))  # evicts y's graph (--max-handles 1)
            y.backward(upstream)
    finally:
        one_handle.stop(0)
    assert torch.equal(x.grad, upstream * (2 * x.detach()))


def test_every_kind_of_value_streams(target: str) -> None:
    with GradientClient(target, timeout=30, stream_threshold_bytes=0) as streamed, GradientClient(target, timeout=30) as unary:
        args = (torch.tensor([1.0, -2.0], requires_grad=True), 2.5)
        assert streamed.forward_backward("scale", *args).grads[0].tolist() == [2.5, 2.5]
        values, indices = streamed.forward("max_with_index", torch.tensor([[1.0, 7.0, 3.0]]))
        assert values.tolist() == [7.0] and indices.tolist() == [1]
        for shape in [(), (0,), (3, 0, 2)]:
            x = torch.ones(shape)
            assert streamed.forward("identity", x).shape == x.shape == unary.forward("identity", x).shape
        fb = streamed.forward_backward(
            "two_outputs", torch.tensor([1.0, 2.0], requires_grad=True), grad_outputs=[None, torch.ones(2)]
        )
        assert fb.grads[0].tolist() == [1.0, 1.0]


def test_streamed_request_over_the_limit() -> None:
    small = create_server(ServerConfig(port=0, device="cpu", max_request_bytes=4 * MiB), registry)
    try:
        with GradientClient(f"127.0.0.1:{small.port}", timeout=10) as client:
            with pytest.raises(ResourceExhaustedError, match="5242880 bytes, over the request limit of 4194304 bytes"):
                client.forward("square", torch.zeros(5 * MiB // 4))
            assert client.forward("square", torch.full((2 * MiB // 4,), 3.0))[0].item() == 9.0  # streamed, within
    finally:
        small.stop(0)


def raw_stream(target: str, messages: list[pb.StreamRequest]) -> list[pb.StreamResponse]:
    with grpc.insecure_channel(target) as channel:
        return list(pb_grpc.GradientServiceStub(channel).StreamCall(iter(messages), timeout=10))


def header(shape: tuple[int, ...], data: bytes = b"") -> pb.StreamRequest:
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, data=data)
    return pb.StreamRequest(forward=pb.ForwardRequest(function="identity", args=[pb.Value(tensor=tensor)]))


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([pb.StreamRequest(data=b"\0" * 4)], "first message must be a header"),
        ([header((1,), b"\0" * 4)], "carries data in the header"),
        ([header((4,)), pb.StreamRequest(data=b"\0" * 8)], "stream ended after 8 of the 16 bytes"),
        ([header((1,)), pb.StreamRequest(data=b"\0" * 8)], "more data than the 4 bytes"),
        ([header((1,)), header((1,))], "only data chunks may follow the header"),
        ([header((-1,))], "negative dimension"),
    ],
)
def test_malformed_streams(target: str, messages: list[pb.StreamRequest], needle: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        raw_stream(target, messages)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    with GradientClient(target, timeout=10) as client:  # still serving
        assert client.forward("square", torch.tensor([2.0])).tolist() == [4.0]


def test_chunks_and_assembler_agree_on_any_split() -> None:
    payloads = [
        codec.wire_bytes(torch.arange(10, dtype=torch.float32)),
        codec.wire_bytes(torch.empty(0)),
        codec.wire_bytes(torch.arange(3, dtype=torch.int16)),
    ]
    msg = pb.ForwardRequest(
        args=[
            pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[10])),
            pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0])),
            pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_INT16, shape=[3])),
        ]
    )
    for chunk_bytes in (1, 3, 7, 46, 1000):
        assembler = streaming.Assembler(msg)
        for chunk in streaming.chunks(payloads, chunk_bytes):
            assembler.feed(chunk)
        got = [p.clone() for p in assembler.payloads()]
        assert [g.tolist() for g in got] == [p.tolist() for p in payloads]


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, (1 << 20) + 3])
def test_data_messages_are_the_bytes_protobuf_writes_and_reads(size: int) -> None:
    chunk = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    wire = streaming.data_message(memoryview(chunk))
    assert wire == pb.StreamRequest(data=chunk).SerializeToString() == pb.StreamResponse(data=chunk).SerializeToString()
    for message_type in (pb.StreamRequest, pb.StreamResponse):
        parsed = streaming.parser(message_type)(wire)
        assert streaming.part(parsed) == "data" and bytes(parsed.data) == chunk
        assert streaming.serialize(wire) is wire  # sent as it is


def test_the_parser_leaves_everything_but_a_lone_data_field_to_protobuf() -> None:
    parse = streaming.parser(pb.StreamRequest)
    header = pb.StreamRequest(forward=pb.ForwardRequest(function="square"))
    assert streaming.part(parse(header.SerializeToString())) == "forward"
    # data, then a header: protobuf's last-one-wins for a oneof, not a data chunk
    both = streaming.data_message(b"abc") + header.SerializeToString()
    assert streaming.part(parse(both)) == "forward"
    # a length running past the end, or a truncated varint: protobuf's own error
    for garbage in (b"\x22\x05ab", b"\x22\xff\xff"):
        with pytest.raises(Exception, match="(?i)error|truncated|parse"):
            parse(garbage)


def test_chunks_are_views_and_data_messages_cover_every_byte() -> None:
    payloads = [codec.wire_bytes(torch.arange(10, dtype=torch.float32)), codec.wire_bytes(torch.arange(3, dtype=torch.int16))]
    views = list(streaming.chunks(payloads, 16))
    assert all(isinstance(v, memoryview) and v.readonly for v in views)
    assert b"".join(views) == b"".join(p.numpy().tobytes() for p in payloads)
    parse = streaming.parser(pb.StreamResponse)
    assert b"".join(bytes(parse(m).data) for m in streaming.data_messages(payloads, 16)) == b"".join(views)


# -- async client parity ------------------------------------------------------------------------


def test_async_client_matches_the_sync_client(target: str) -> None:
    x = torch.tensor(2.0, requires_grad=True)
    y = torch.tensor(3.0, requires_grad=True)
    big = torch.randn(3 * MiB // 4, generator=torch.Generator().manual_seed(3), requires_grad=True)

    async def run() -> tuple:
        async with AsyncGradientClient(target, timeout=30) as client:
            names = [f.name for f in await client.list_functions()]
            small = await client.forward_backward("cube_plus_square", x, y)
            streamed = await client.forward_backward("square", big)
            out = await client.forward("two_outputs", torch.tensor([1.0]))
            many = await asyncio.gather(*(client.forward("square", torch.tensor([float(i)])) for i in range(20)))
            with pytest.raises(InvalidArgumentError, match="square takes 1 argument, got 2"):
                await client.forward("square", x, y)
            return names, small, streamed, out, many

    names, small, streamed, out, many = asyncio.run(run())
    with GradientClient(target, timeout=30) as sync:
        assert names == [f.name for f in sync.list_functions()]
        expected = sync.forward_backward("cube_plus_square", x, y)
    assert (small.outputs.item(), small.grads[0].item(), small.grads[1].item()) == (17.0, 12.0, 6.0)
    assert small.outputs.item() == expected.outputs.item()
    assert torch.equal(streamed.grads[0], 2 * big.detach())
    assert isinstance(out, tuple) and [o.tolist() for o in out] == [[2.0], [2.0]]
    assert [t.item() for t in many] == [float(i * i) for i in range(20)]


@pytest.mark.slow
def test_tensor_over_2_gib_round_trips() -> None:
    """Over protobuf's 2 GiB ceiling: only a streamed call can carry it. Needs ~10 GiB of RAM."""
    big = create_server(ServerConfig(port=0, device="cpu", max_request_bytes=3 << 30, max_tensor_bytes=3 << 30), registry)
    try:
        x = torch.ones((2 << 30) // 4 + 1024)  # 2 GiB + 4 KiB of float32
        with GradientClient(f"127.0.0.1:{big.port}", timeout=600) as client:
            y = client.forward("identity", x)
        assert y.shape == x.shape and bool((y == 1).all())
    finally:
        big.stop(0)


def test_reply_too_large_for_one_message_is_refused_not_run_again(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small request whose reply is over protobuf's 2 GiB: the Function ran, so the client must
    not send it again on its own (at most once); the error says how to stream it instead."""
    from gradserve.server import _servicer

    monkeypatch.setattr(_servicer, "UNARY_RESPONSE_LIMIT_BYTES", 1000)  # stands for protobuf's 2 GiB
    x = torch.ones(64, 1, requires_grad=True)  # 256 bytes in; a 16 KiB [64, 64] output
    w = torch.full((64, 1), 2.0, requires_grad=True)

    async def run_async() -> None:
        async with AsyncGradientClient(target, timeout=30) as client:
            await client.forward("linear", x, w, None)

    with GradientClient(target, timeout=30) as client:
        with pytest.raises(ResourceExhaustedError, match="stream_threshold_bytes=0") as err:
            client.forward_backward("linear", x, w, None)
        assert err.value.reason == "RESPONSE_TOO_LARGE"
    with pytest.raises(ResourceExhaustedError, match="one message can carry"):
        asyncio.run(run_async())
    with GradientClient(target, timeout=30, stream_threshold_bytes=0) as streaming_client:
        result = streaming_client.forward_backward("linear", x, w, None)
    assert torch.equal(result.outputs, torch.full((64, 64), 2.0))
    assert torch.equal(result.grads[0], torch.full((64, 1), 128.0))


def test_async_streamed_refusals_keep_their_code() -> None:
    small = create_server(ServerConfig(port=0, device="cpu", max_request_bytes=2 * MiB), registry)

    async def run() -> list[str]:
        async with AsyncGradientClient(f"127.0.0.1:{small.port}", timeout=10) as client:
            codes = []
            for _ in range(10):
                try:
                    await client.forward("square", torch.zeros(4 * MiB // 4))
                except ResourceExhaustedError as err:
                    codes.append(err.code.name)
            return codes

    try:
        assert asyncio.run(run()) == ["RESOURCE_EXHAUSTED"] * 10
    finally:
        small.stop(0)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 129, 16_383, 16_384, (1 << 20) + 3, (1 << 21) + 5])
def test_a_lone_data_field_is_parsed_without_protobuf_as_a_view_of_the_buffer(size: int) -> None:
    chunk = memoryview(bytearray(size))
    chunk[-1:] = b"\x07"[: min(size, 1)]
    wire = streaming.data_message(chunk)
    for message_type in (pb.StreamRequest, pb.StreamResponse):
        parsed = streaming.parser(message_type)(wire)
        assert type(parsed) is streaming.Data
        assert parsed.data.obj is wire and parsed.data.nbytes == size and parsed.data == chunk


def test_the_parser_takes_a_padded_length_exactly_where_protobuf_does() -> None:
    parse = streaming.parser(pb.StreamRequest)
    # The length 3 written in n varint bytes (padded): protobuf (upb) reads at most 5; the parser must
    # neither take a message protobuf refuses nor refuse one it takes.
    for n in range(1, 12):
        wire = b"\x22" + (b"\x83" + b"\x80" * (n - 2) + b"\x00" if n > 1 else b"\x03") + b"abc"
        try:
            expected = pb.StreamRequest.FromString(wire).data
        except Exception:  # noqa: BLE001  (protobuf's DecodeError, whatever its module)
            expected = None
        if expected is None:
            with pytest.raises(Exception, match="(?i)error|parse"):
                parse(wire)
        else:
            parsed = parse(wire)
            assert type(parsed) is streaming.Data and bytes(parsed.data) == expected == b"abc"


def test_data_messages_are_one_message_per_chunk_of_the_given_size() -> None:
    payloads = [codec.wire_bytes(torch.arange(10, dtype=torch.float32))]  # 40 bytes
    messages = list(streaming.data_messages(payloads, 16))
    assert messages == [streaming.data_message(payloads[0].numpy().tobytes()[i : i + 16]) for i in (0, 16, 32)]
    assert [len(m) for m in messages] == [18, 18, 10]


def test_framed_handler_parses_requests_and_passes_serialized_replies() -> None:
    handler = grpc.stream_stream_rpc_method_handler(
        lambda requests, context: iter(()),
        request_deserializer=pb.StreamRequest.FromString,
        response_serializer=pb.StreamResponse.SerializeToString,
    )
    framed = streaming.framed_handler(handler)
    parsed = framed.request_deserializer(streaming.data_message(b"abc"))
    assert type(parsed) is streaming.Data and bytes(parsed.data) == b"abc"
    header = pb.StreamRequest(forward=pb.ForwardRequest(function="square"))
    assert framed.request_deserializer(header.SerializeToString()) == header
    wire = streaming.data_message(b"xyz")
    assert framed.response_serializer(wire) is wire
    assert framed.stream_stream is handler.stream_stream
