"""Codec, exactly: whole error messages, limits at N and N+1, sparse tensors and flags (found by mutation testing).

Each test pins a value a wrong codec would change: the full text of an error (what a
client reads), the byte counts, and each flag as it goes on the wire.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from gradserve.v1 import codec, streaming
from gradserve.v1 import gradserve_pb2 as pb

F32 = pb.DTYPE_FLOAT32


def exactly(message: str) -> str:
    """A pytest ``match`` pattern for the whole message."""
    return "^" + re.escape(message) + "$"


def sparse() -> torch.Tensor:
    """2x3 float32 with two entries: indices int64 [2, 2] (32 bytes) and values float32 [2] (8 bytes)."""
    return torch.sparse_coo_tensor(torch.tensor([[0, 1], [2, 0]]), torch.tensor([5.0, -1.0]), (2, 3), check_invariants=True)


def sparse_msg(shape: list[int] | None = None, **kinds: pb.Tensor) -> pb.SparseTensor:
    msg = codec.encode_sparse(sparse())
    if shape is not None:
        del msg.shape[:]
        msg.shape.extend(shape)
    for name, tensor in kinds.items():
        getattr(msg, name).CopyFrom(tensor)
    return msg


# -- shapes in messages --------------------------------------------------------------------


def test_shapes_of_up_to_eight_dimensions_are_written_out_longer_ones_cut() -> None:
    eight = pb.Tensor(dtype=F32, shape=[1] * 7 + [-1])
    with pytest.raises(codec.CodecError, match=exactly("tensor: shape [1, 1, 1, 1, 1, 1, 1, -1] has a negative dimension")):
        codec.decode_tensor(eight)
    nine = pb.Tensor(dtype=F32, shape=[1, 2, 3, 4, 5, 6, 7, 8, -1])
    with pytest.raises(
        codec.CodecError, match=exactly("t: shape [1, 2, 3, 4, 5, 6, 7, 8, ... (9 dimensions)] has a negative dimension")
    ):
        codec.decode_tensor(nine, what="t")


# -- dense limits --------------------------------------------------------------------------


def test_dense_size_limit_at_n_and_n_plus_one() -> None:
    msg = codec.encode_tensor(torch.arange(4.0))  # 16 bytes
    assert codec.decode_tensor(msg, max_bytes=16).tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(
        codec.TensorTooLarge, match=exactly("tensor: float32 tensor of shape [4] is 16 bytes, over the limit of 15 bytes")
    ):
        codec.decode_tensor(msg, max_bytes=15)


def test_dimension_limit_at_64_and_65() -> None:
    assert codec.tensor_nbytes(pb.Tensor(dtype=F32, shape=[1] * 64)) == 4
    with pytest.raises(codec.CodecError, match=exactly("x: tensor has 65 dimensions; at most 64 are accepted")):
        codec.tensor_nbytes(pb.Tensor(dtype=F32, shape=[1] * 65), what="x")


def test_what_names_the_tensor_in_every_decoder() -> None:
    bad = pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1])
    expected = ", ".join(pb.DType.Name(v) for v in sorted(codec.WIRE_TO_DTYPE))
    tail = f"dtype is DTYPE_UNSPECIFIED; expected one of {expected}"
    with pytest.raises(codec.CodecError, match=exactly(f"tensor: {tail}")):
        codec.decode_tensor(bad)
    with pytest.raises(codec.CodecError, match=exactly(f"g: {tail}")):
        codec.decode_tensor(bad, what="g")
    with pytest.raises(codec.CodecError, match=exactly(f"argument: {tail}")):
        codec.decode_value(pb.Value(tensor=bad))
    with pytest.raises(codec.CodecError, match=exactly(f"tensor: {tail}")):
        codec.decode_maybe_tensor(pb.MaybeTensor(tensor=bad))
    with pytest.raises(codec.CodecError, match=exactly(f"grad 1: {tail}")):
        codec.decode_maybe_tensor(pb.MaybeTensor(tensor=bad), what="grad 1")


def test_value_and_maybe_tensor_pass_the_size_limit_on() -> None:
    value = codec.encode_value(torch.arange(4.0))
    assert codec.decode_value(value, max_tensor_bytes=16).tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(
        codec.TensorTooLarge, match=exactly("a 0: float32 tensor of shape [4] is 16 bytes, over the limit of 15 bytes")
    ):
        codec.decode_value(value, max_tensor_bytes=15, what="a 0")
    maybe = codec.encode_maybe_tensor(torch.arange(4.0))
    with pytest.raises(
        codec.TensorTooLarge, match=exactly("tensor: float32 tensor of shape [4] is 16 bytes, over the limit of 15 bytes")
    ):
        codec.decode_maybe_tensor(maybe, max_bytes=15)


# -- flags on the wire ---------------------------------------------------------------------


def test_requires_grad_flags_on_the_wire() -> None:
    leaf = torch.ones(2, requires_grad=True)
    assert codec.encode_value(leaf).tensor.requires_grad is True
    assert codec.encode_value(leaf, requires_grad=False).tensor.requires_grad is False
    assert codec.encode_value(torch.ones(2), requires_grad=True).tensor.requires_grad is True
    assert codec.encode_maybe_tensor(leaf).tensor.requires_grad is False  # cotangents and gradients: off by default
    assert codec.encode_maybe_tensor(torch.ones(2), requires_grad=True).tensor.requires_grad is True
    s = sparse()
    assert codec.encode_maybe_tensor(s).sparse.requires_grad is False
    assert codec.encode_maybe_tensor(s, requires_grad=True).sparse.requires_grad is True
    assert codec.encode_value(s, requires_grad=True).sparse_tensor.requires_grad is True
    assert codec.encode_value(s.requires_grad_(True)).sparse_tensor.requires_grad is True
    assert codec.encode_value(s, requires_grad=False).sparse_tensor.requires_grad is False


def test_sparse_parts_never_require_grad_and_sparse_flag_defaults_to_the_tensor() -> None:
    plain = codec.encode_sparse(sparse())
    assert (plain.requires_grad, plain.indices.requires_grad, plain.values.requires_grad) == (False, False, False)
    leaf = codec.encode_sparse(sparse().requires_grad_(True))
    assert (leaf.requires_grad, leaf.indices.requires_grad, leaf.values.requires_grad) == (True, False, False)
    assert codec.encode_sparse(sparse(), requires_grad=True).requires_grad is True
    assert codec.encode_sparse(sparse().requires_grad_(True), requires_grad=False).requires_grad is False
    with pytest.raises(codec.CodecError, match=exactly("expected a sparse COO tensor, got layout torch.strided")):
        codec.encode_sparse(torch.ones(2))


# -- wire sizes ----------------------------------------------------------------------------


def test_nbytes_counts_what_goes_on_the_wire() -> None:
    assert codec.nbytes(sparse()) == 32 + 8  # int64 indices [2, 2] and float32 values [2]
    assert codec.nbytes(torch.ones(3, dtype=torch.float16)) == 6
    assert codec.nbytes(np.ones((2, 3), dtype=np.float64)) == 48
    assert codec.nbytes(2.5) == 0 and codec.nbytes(None) == 0


# -- sparse decoding -----------------------------------------------------------------------


def test_sparse_round_trip_through_every_decoder() -> None:
    dense = sparse().to_dense()
    assert torch.equal(codec.decode_sparse(codec.encode_sparse(sparse())).to_dense(), dense)
    value = codec.decode_value(codec.encode_value(sparse(), requires_grad=True))
    assert value.layout == torch.sparse_coo and value.requires_grad and torch.equal(value.detach().to_dense(), dense)
    assert torch.equal(codec.decode_maybe_tensor(codec.encode_maybe_tensor(sparse())).to_dense(), dense)


def test_streamed_sparse_value_uses_the_payloads() -> None:
    payloads: list[torch.Tensor] = []
    msg = codec.encode_value(sparse(), payloads=payloads)
    assert [p.numel() for p in payloads] == [32, 8] and not msg.sparse_tensor.indices.data
    back = codec.decode_value(msg, payloads=iter(payloads))
    assert torch.equal(back.to_dense(), sparse().to_dense())
    payloads = []
    maybe = codec.encode_maybe_tensor(sparse(), payloads=payloads)
    assert torch.equal(codec.decode_maybe_tensor(maybe, payloads=iter(payloads)).to_dense(), sparse().to_dense())


def test_sparse_limits_at_n_and_n_plus_one() -> None:
    msg = codec.encode_sparse(sparse())  # 6 elements, 40 bytes of indices and values
    assert codec.decode_sparse(msg, max_bytes=40, max_numel=6).shape == (2, 3)
    with pytest.raises(
        codec.TensorTooLarge,
        match=exactly("s: sparse tensor's indices and values are 40 bytes, over the limit of 39 bytes"),
    ):
        codec.decode_sparse(msg, max_bytes=39, what="s")
    with pytest.raises(
        codec.TensorTooLarge,
        match=exactly(
            "tensor: sparse tensor of shape [2, 3] has 6 elements; at most 5 are accepted "
            "(torch's sparse kernels overflow on larger shapes)"
        ),
    ):
        codec.decode_sparse(msg, max_numel=5)
    value = pb.Value(sparse_tensor=msg)
    assert codec.decode_value(value, max_tensor_bytes=40, max_sparse_numel=6).shape == (2, 3)
    with pytest.raises(codec.TensorTooLarge, match="^argument: sparse tensor's indices and values are 40 bytes"):
        codec.decode_value(value, max_tensor_bytes=39)
    with pytest.raises(codec.TensorTooLarge, match="^v: sparse tensor of shape \\[2, 3\\] has 6 elements; at most 5"):
        codec.decode_value(value, max_sparse_numel=5, what="v")
    maybe = pb.MaybeTensor(sparse=msg)
    with pytest.raises(codec.TensorTooLarge, match="^tensor: sparse tensor's indices and values are 40 bytes"):
        codec.decode_maybe_tensor(maybe, max_bytes=39)
    with pytest.raises(codec.TensorTooLarge, match="^m: sparse tensor of shape \\[2, 3\\] has 6 elements; at most 5"):
        codec.decode_maybe_tensor(maybe, max_sparse_numel=5, what="m")


def test_sparse_dimension_limit_at_64_and_65() -> None:
    indices = codec.encode_tensor(torch.zeros(64, 1, dtype=torch.int64))
    ok = pb.SparseTensor(shape=[1] * 64, indices=indices, values=codec.encode_tensor(torch.ones(1)))
    assert codec.decode_sparse(ok).shape == (1,) * 64
    too_many = pb.SparseTensor(shape=[1] * 65)
    with pytest.raises(codec.CodecError, match=exactly("tensor: sparse tensor has 65 dimensions; at most 64 are accepted")):
        codec.decode_sparse(too_many)


def test_sparse_parts_are_named_in_errors() -> None:
    bad = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1])
    with pytest.raises(codec.CodecError, match=exactly("w indices: shape [-1] has a negative dimension")):
        codec.decode_sparse(sparse_msg(indices=bad), what="w")
    with pytest.raises(codec.CodecError, match=exactly("tensor values: shape [-1] has a negative dimension")):
        codec.decode_sparse(sparse_msg(values=bad))
    short = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2, 2], data=b"\0" * 8)
    with pytest.raises(codec.CodecError, match=exactly("w indices: int64 tensor of shape [2, 2] needs 32 bytes of data, got 8")):
        codec.decode_sparse(sparse_msg(indices=short), what="w")
    short = pb.Tensor(dtype=F32, shape=[2], data=b"\0" * 4)
    with pytest.raises(codec.CodecError, match=exactly("w values: float32 tensor of shape [2] needs 8 bytes of data, got 4")):
        codec.decode_sparse(sparse_msg(values=short), what="w")


@pytest.mark.parametrize(
    ("indices", "values", "shape", "message"),
    [
        (
            torch.zeros(2, 2, dtype=torch.int32),
            torch.ones(2),
            [2, 3],
            "sparse indices must be int64 of shape [sparse_dim, nnz] with nnz = values.shape[0]; got int32 [2, 2] and values [2]",
        ),
        (
            torch.zeros(4, dtype=torch.int64),
            torch.ones(2),
            [2, 3],
            "sparse indices must be int64 of shape [sparse_dim, nnz] with nnz = values.shape[0]; got int64 [4] and values [2]",
        ),
        (
            torch.zeros(2, 3, dtype=torch.int64),
            torch.ones(2),
            [2, 3],
            "sparse indices must be int64 of shape [sparse_dim, nnz] with nnz = values.shape[0]; got int64 [2, 3] and values [2]",
        ),
        (
            torch.zeros(2, 1, dtype=torch.int64),
            torch.tensor(1.0),
            [2, 3],
            "sparse indices must be int64 of shape [sparse_dim, nnz] with nnz = values.shape[0]; got int64 [2, 1] and values []",
        ),
        (
            torch.zeros(1, 2, dtype=torch.int64),
            torch.ones(2),
            [2, 3],
            "sparse tensor of shape [2, 3] does not match indices [1, 2] and values [2]",
        ),
        (
            torch.zeros(2, 2, dtype=torch.int64),
            torch.ones(2, 4),
            [2, 3],
            "sparse tensor of shape [2, 3] does not match indices [2, 2] and values [2, 4]",
        ),
        (
            torch.zeros(1, 2, dtype=torch.int64),
            torch.ones(2, 4),
            [2, 3],
            "sparse tensor of shape [2, 3] does not match indices [1, 2] and values [2, 4]",
        ),
        (
            torch.zeros(2, 2, dtype=torch.int64),
            torch.ones(2),
            [2, -3],
            "sparse tensor of shape [2, -3] does not match indices [2, 2] and values [2]",
        ),
    ],
)
def test_inconsistent_sparse_parts_are_refused(
    indices: torch.Tensor, values: torch.Tensor, shape: list[int], message: str
) -> None:
    msg = pb.SparseTensor(shape=shape, indices=codec.encode_tensor(indices), values=codec.encode_tensor(values))
    with pytest.raises(codec.CodecError, match=exactly(f"q: {message}")):
        codec.decode_sparse(msg, what="q")


def test_sparse_with_an_empty_dimension_and_no_entries_decodes() -> None:
    empty = pb.SparseTensor(
        shape=[0, 3],
        indices=codec.encode_tensor(torch.zeros(2, 0, dtype=torch.int64)),
        values=codec.encode_tensor(torch.ones(0)),
    )
    assert codec.decode_sparse(empty).shape == (0, 3)
    scalar_values = pb.SparseTensor(
        shape=[2], indices=codec.encode_tensor(torch.zeros(1, 1, dtype=torch.int64)), values=codec.encode_tensor(torch.ones(1))
    )
    assert codec.decode_sparse(scalar_values).to_dense().tolist() == [1.0, 0.0]


def test_sparse_index_outside_the_shape_is_refused_with_torchs_first_line() -> None:
    msg = pb.SparseTensor(
        shape=[2, 3], indices=codec.encode_tensor(torch.tensor([[0, 5], [0, 0]])), values=codec.encode_tensor(torch.ones(2))
    )
    with pytest.raises(codec.CodecError) as info:
        codec.decode_sparse(msg, what="z")
    try:
        torch.sparse_coo_tensor(torch.tensor([[0, 5], [0, 0]]), torch.ones(2), [2, 3], check_invariants=True)
    except RuntimeError as exc:
        first_line = str(exc).splitlines()[0][:200]
    assert str(info.value) == f"z: invalid sparse tensor: {first_line}"


def test_long_sparse_errors_are_cut_to_200_characters() -> None:
    msg = pb.SparseTensor(shape=[2], indices=codec.encode_tensor(torch.tensor([[7]])), values=codec.encode_tensor(torch.ones(1)))
    with pytest.raises(codec.CodecError) as info:
        codec.decode_sparse(msg)
    detail = str(info.value).removeprefix("tensor: invalid sparse tensor: ")
    assert detail and len(detail) <= 200 and "\n" not in detail


# -- numpy ---------------------------------------------------------------------------------


def test_numpy_inputs_exact() -> None:
    with pytest.raises(codec.CodecError, match=exactly("expected a torch.Tensor or numpy.ndarray, got list")):
        codec.encode_tensor([1.0])
    for array in (np.array(["a"]), np.array([b"x"]), np.array([1], dtype=object), np.array(["2020-01-01"], dtype="M8[D]")):
        with pytest.raises(
            codec.CodecError,
            match=exactly(
                f"a numpy array of dtype {array.dtype} cannot be sent; expected a bool, integer, float or complex array"
            ),
        ):
            codec.encode_tensor(array)
    big_endian = np.array([1.0, 2.0], dtype=">f4")
    msg = codec.encode_tensor(big_endian)
    assert msg.dtype == F32 and msg.data == bytes.fromhex("0000803f00000040")
    strided = np.arange(6, dtype="<i2")[::2]
    assert codec.encode_tensor(strided).data == bytes.fromhex("000002000400")


def test_numpy_scalars_exact() -> None:
    c64 = codec.decode_value(codec.encode_value(np.complex64(1 + 2j)))
    assert c64.dtype is torch.complex64 and c64.item() == 1 + 2j
    c128 = codec.decode_value(codec.encode_value(np.complex128(3 - 1j)))
    assert c128.dtype is torch.complex128 and c128.item() == 3 - 1j
    with pytest.raises(
        codec.CodecError,
        match=exactly("a numpy scalar of dtype datetime64[D] cannot be sent; expected bool, integer, float, complex or str"),
    ):
        codec.encode_value(np.datetime64("2020-01-01"))


def test_int_bounds_are_signed_64_bit() -> None:
    for ok in (-(2**63), 2**63 - 1):
        assert codec.decode_value(codec.encode_value(ok)) == ok
    for bad in (-(2**63) - 1, 2**63):
        with pytest.raises(codec.CodecError, match=exactly(f"int argument {bad} does not fit in 64 bits")):
            codec.encode_value(bad)


def test_requires_grad_on_an_integer_tensor_is_refused_with_the_reason() -> None:
    bad = pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[1], data=b"\0" * 8, requires_grad=True))
    with pytest.raises(
        codec.CodecError,
        match=exactly(
            "argument: requires_grad is set on a tensor of dtype int64; "
            "only floating point and complex tensors can require gradients"
        ),
    ):
        codec.decode_value(bad)


def test_numpy_dtype_torch_lacks_is_refused_with_torchs_reason() -> None:
    array = np.ones(2, dtype=np.longdouble)
    with pytest.raises(codec.CodecError, match=f"^a numpy array of dtype {array.dtype} cannot be sent: .+"):
        codec.encode_tensor(array)


# -- stream framing ------------------------------------------------------------------------


def header(*shapes: list[int], data: bytes = b"") -> pb.ForwardRequest:
    """A streamed request's header: one float32 argument per shape, no inline data."""
    args = [pb.Value(tensor=pb.Tensor(dtype=F32, shape=shape, data=data)) for shape in shapes]
    return pb.ForwardRequest(function="f", args=args)


def test_stream_header_errors_exact() -> None:
    with pytest.raises(
        codec.CodecError, match=exactly("stream: streamed tensor 0 carries data in the header; send it in data chunks")
    ):
        streaming.Assembler(header([1], data=b"\0\0\0\0"))
    bad = pb.ForwardRequest(function="f", args=[pb.Value(tensor=pb.Tensor(dtype=F32, shape=[1])), pb.Value(tensor=pb.Tensor())])
    expected = ", ".join(pb.DType.Name(v) for v in sorted(codec.WIRE_TO_DTYPE))
    with pytest.raises(
        codec.CodecError, match=exactly(f"sq streamed tensor 1: dtype is DTYPE_UNSPECIFIED; expected one of {expected}")
    ):
        streaming.Assembler(bad, what="sq")


def test_stream_limits_at_n_and_n_plus_one() -> None:
    assert streaming.Assembler(header([4], [2]), max_tensor_bytes=16, max_total_bytes=24).sizes == [16, 8]
    with pytest.raises(
        codec.TensorTooLarge, match=exactly("stream streamed tensor 0 of shape [4] is 16 bytes, over the limit of 15 bytes")
    ):
        streaming.Assembler(header([4], [2]), max_tensor_bytes=15)
    with pytest.raises(
        codec.TensorTooLarge, match=exactly("s: streamed tensors total 24 bytes, over the request limit of 23 bytes")
    ):
        streaming.Assembler(header([4], [2]), max_total_bytes=23, what="s")


def test_chunks_that_straddle_tensors_fill_each_buffer() -> None:
    assembler = streaming.Assembler(header([1], [1]))
    assembler.feed(bytes([1, 2]))
    assembler.feed(bytes([3, 4, 5, 6]))  # the rest of the first tensor and part of the second
    assembler.feed(bytes([7, 8]))
    assert [p.tolist() for p in assembler.payloads()] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(codec.CodecError, match=exactly("stream: more data than the 8 bytes the header declares")):
        assembler.feed(b"\0")


def test_trailing_empty_tensors_need_no_chunk() -> None:
    assembler = streaming.Assembler(header([1], [0], [2, 0]))
    assembler.feed(bytes([1, 2, 3, 4]))
    payloads = list(assembler.payloads())
    assert [(p.dtype, p.numel()) for p in payloads] == [(torch.uint8, 4), (torch.uint8, 0), (torch.uint8, 0)]


def test_a_short_stream_says_how_much_arrived() -> None:
    with pytest.raises(codec.CodecError, match=exactly("stream: stream ended after 0 of the 8 bytes the header declares")):
        streaming.Assembler(header([1], [1])).payloads()
    assembler = streaming.Assembler(header([1], [1], [1]), what="s")
    assembler.feed(bytes(6))
    with pytest.raises(codec.CodecError, match=exactly("s: stream ended after 6 of the 12 bytes the header declares")):
        assembler.payloads()


# -- more exact edges (found by mutation testing) ------------------------------------------


def test_a_size_one_slice_of_any_stride_travels() -> None:
    one = torch.arange(6.0)[::2][1:2]  # one element, stride 2
    assert codec.encode_tensor(one).data == bytes.fromhex("00000040")  # float32 2.0
    assert codec.decode_tensor(codec.encode_tensor(torch.tensor(2.0).expand(1, 1))).tolist() == [[2.0]]  # stride 0


def test_bool_bytes_other_than_0_and_1_are_refused() -> None:
    with pytest.raises(codec.CodecError, match=exactly("tensor: bool tensor holds a byte other than 0 or 1")):
        codec.decode_tensor(pb.Tensor(dtype=pb.DTYPE_BOOL, shape=[2], data=b"\x01\x02"))
    assert codec.decode_tensor(pb.Tensor(dtype=pb.DTYPE_BOOL, shape=[2], data=b"\x01\x00")).tolist() == [True, False]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_and_unsupported_tensors_are_refused_exactly() -> None:
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(
        codec.CodecError, match=exactly("a nested tensor cannot be sent; send its components as separate tensors")
    ):
        codec.encode_tensor(nested)
    supported = ", ".join(str(d).removeprefix("torch.") for d in codec.DTYPE_TO_WIRE)
    with pytest.raises(codec.CodecError, match=exactly(f"dtype float8_e4m3fnuz cannot be sent; supported: {supported}")):
        codec.encode_tensor(torch.zeros(1, dtype=torch.float8_e4m3fnuz))


def test_byte_count_and_stride_limits_sit_exactly_at_int64() -> None:
    u8, f32 = pb.DTYPE_UINT8, pb.DTYPE_FLOAT32
    largest = 2**63 - 1
    assert codec.tensor_nbytes(pb.Tensor(dtype=u8, shape=[largest])) == largest  # exactly int64's maximum: accepted
    assert codec.tensor_nbytes(pb.Tensor(dtype=u8, shape=[0, largest])) == 0
    assert codec.tensor_nbytes(pb.Tensor(dtype=u8, shape=[0, 2**62])) == 0
    with pytest.raises(
        codec.TensorTooLarge,
        match=exactly("tensor: shape [4611686018427387904] has 4611686018427387904 elements, over the int64 limit"),
    ):
        codec.tensor_nbytes(pb.Tensor(dtype=f32, shape=[2**62]))
    with pytest.raises(
        codec.CodecError,
        match=exactly("tensor: shape [0, 4611686018427387904] overflows int64 strides, though it has 0 elements"),
    ):
        codec.tensor_nbytes(pb.Tensor(dtype=f32, shape=[0, 2**62]))
    with pytest.raises(codec.CodecError, match="^tensor: shape \\[0, 4611686018427387904, 2\\] overflows int64 strides"):
        codec.tensor_nbytes(pb.Tensor(dtype=u8, shape=[0, 2**62, 2]))


def test_hybrid_sparse_tensors_keep_their_dense_dimensions() -> None:
    hybrid = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.arange(6.0).reshape(2, 3), (2, 3), check_invariants=True)
    back = codec.decode_sparse(codec.encode_sparse(hybrid))
    assert back.sparse_dim() == 1 and back.dense_dim() == 1
    assert back.to_dense().tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_a_shared_memory_reference_outside_a_unary_call_is_refused_exactly() -> None:
    msg = codec.encode_tensor(torch.ones(2))
    msg.ClearField("data")
    msg.shared_memory.name = "gradserve-1-2-3-" + "0" * 32
    message = (
        "x: a shared-memory reference is accepted only in a unary call of a client whose "
        "SharedMemoryProbe succeeded (request metadata gradserve-shared-memory-reply-bytes)"
    )
    with pytest.raises(codec.CodecError, match=exactly(message)):
        codec.decode_tensor(msg, what="x")
