"""Codec: exact round trips for every dtype and shape kind, and validation before allocation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_table import WIRE_DTYPES

from gradserve.v1 import codec
from gradserve.v1 import gradserve_pb2 as pb

DTYPES = list(codec.DTYPE_TO_WIRE)


def bits(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor in logical order: equality here is bit-exactness."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def random_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads and subnormals included), except bool: 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=shapes, seed=st.integers(0, 2**31))
def test_round_trip_is_bit_exact(dtype: torch.dtype, shape: list[int], seed: int) -> None:
    t = random_tensor(dtype, shape, seed)
    msg = codec.encode_tensor(t)
    assert len(msg.data) == t.numel() * dtype.itemsize
    back = codec.decode_tensor(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and list(back.shape) == shape
    assert bits(back) == bits(t)


@settings(max_examples=100, deadline=None)
@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31), kind=st.sampled_from(["transpose", "slice", "expand"]))
def test_non_contiguous_tensors_travel_in_logical_order(dtype: torch.dtype, seed: int, kind: str) -> None:
    base = random_tensor(dtype, [4, 6], seed)
    view = {"transpose": base.T, "slice": base[::2, 1::3], "expand": base[:1].expand(3, 6)}[kind]
    assert not view.is_contiguous()
    back = codec.decode_tensor(codec.encode_tensor(view))
    assert bits(back) == bits(view.contiguous())


def test_expanded_size_one_tensor() -> None:
    # What autograd hands a backward for out.sum() when out has one element: stride 0.
    t = torch.tensor(2.0).expand(1, 1)
    assert codec.decode_tensor(codec.encode_tensor(t)).tolist() == [[2.0]]
    empty = torch.ones((), dtype=torch.float16).expand(0)  # a default cotangent of an empty output (found by the fuzz)
    assert codec.decode_tensor(codec.encode_tensor(empty)).shape == (0,)


def test_numpy_negative_strides_travel_in_logical_order() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)[::-1, ::-2]
    back = codec.decode_tensor(codec.encode_tensor(a))
    np.testing.assert_array_equal(back.numpy(), a)


def test_special_floats_are_bit_exact() -> None:
    specials = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 5e-324]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = torch.tensor(specials, dtype=dtype)
        assert bits(codec.decode_tensor(codec.encode_tensor(t))) == bits(t)
    back = codec.decode_tensor(codec.encode_tensor(torch.tensor([-0.0])))
    assert math.copysign(1.0, back.item()) == -1.0


def test_bfloat16_is_never_widened() -> None:
    t = torch.tensor([1.0, 3.140625, -2.5], dtype=torch.bfloat16)
    msg = codec.encode_tensor(t)
    assert msg.dtype == pb.DTYPE_BFLOAT16 and len(msg.data) == 6
    assert codec.decode_tensor(msg).dtype is torch.bfloat16


def test_zero_dim_and_zero_size() -> None:
    scalar = codec.decode_tensor(codec.encode_tensor(torch.tensor(2.5)))
    assert scalar.shape == () and scalar.item() == 2.5
    empty = codec.decode_tensor(codec.encode_tensor(torch.empty(3, 0, 2)))
    assert empty.shape == (3, 0, 2)


def test_decoded_tensor_is_writable_and_owns_its_memory() -> None:
    msg = codec.encode_tensor(torch.arange(4.0))
    t = codec.decode_tensor(msg)
    t.add_(1)  # must not touch the (immutable) message bytes
    assert codec.decode_tensor(msg).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_wire_dtypes_match_the_hand_written_table() -> None:
    """The proto's enum numbers, the codec's dtypes and item sizes against tests/wire_table.py (from docs/protocol.md)."""
    declared = {v.name: v.number for v in pb.DType.DESCRIPTOR.values if v.number != pb.DTYPE_UNSPECIFIED}
    assert declared == {name: w.number for name, w in WIRE_DTYPES.items()}
    assert codec.WIRE_TO_DTYPE == {w.number: w.dtype for w in WIRE_DTYPES.values()}
    for w in WIRE_DTYPES.values():
        shape = [3, 2]
        msg = codec.encode_tensor(torch.zeros(shape, dtype=w.dtype))
        assert (msg.dtype, len(msg.data)) == (w.number, 6 * w.itemsize)
        assert codec.tensor_nbytes(pb.Tensor(dtype=w.number, shape=shape)) == 6 * w.itemsize


@pytest.mark.parametrize(
    ("msg", "needle"),
    [
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "DTYPE_UNSPECIFIED"),
        (pb.Tensor(dtype=99, shape=[1], data=b"\0" * 4), "unknown value 99"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, -1], data=b""), "negative dimension"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1024, 1024, 2], data=b"\0" * 8), "needs 8388608 bytes of data, got 8"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**40, 2**40], data=b""), "over the int64 limit"),
        (pb.Tensor(dtype=pb.DTYPE_BOOL, shape=[2], data=b"\x01\x07"), "other than 0 or 1"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0, 2**31, 2**40], data=b""), "overflows int64 strides"),  # found by the fuzz
    ],
)
def test_malformed_tensors_are_rejected(msg: pb.Tensor, needle: str) -> None:
    with pytest.raises(codec.CodecError, match=needle):
        codec.decode_tensor(msg)


def test_size_limit_is_checked_before_the_byte_count() -> None:
    # 2^20 x 2^20 float32 would be 4 TiB: refused on the declared size, no allocation tried.
    msg = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**20, 2**20], data=b"")
    with pytest.raises(codec.TensorTooLarge, match="4398046511104 bytes, over the limit of 1024 bytes"):
        codec.decode_tensor(msg, max_bytes=1024)


def test_values_round_trip() -> None:
    for value in (True, False, 7, -(2**63), 2.5, "mean", None):
        back = codec.decode_value(codec.encode_value(value))
        assert back == value and type(back) is type(value)
    with pytest.raises(codec.CodecError, match="does not fit in 64 bits"):
        codec.encode_value(2**63)
    with pytest.raises(codec.CodecError, match="got dict"):
        codec.encode_value({})
    with pytest.raises(codec.CodecError, match="empty Value"):
        codec.decode_value(pb.Value())


def test_requires_grad_only_on_floating_tensors() -> None:
    t = codec.decode_value(codec.encode_value(torch.ones(2, requires_grad=True)))
    assert t.requires_grad and t.is_leaf
    bad = pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[1], data=b"\0" * 8, requires_grad=True))
    with pytest.raises(codec.CodecError, match="requires_grad is set on a tensor of dtype int64"):
        codec.decode_value(bad, what="square argument 0")


def test_unsupported_dtypes_are_refused_when_encoding() -> None:
    with pytest.raises(codec.CodecError, match="dtype float8_e4m3fnuz cannot be sent"):
        codec.encode_tensor(torch.zeros(2, dtype=torch.float8_e4m3fnuz))
    with pytest.raises(codec.CodecError, match="dense"):
        codec.encode_tensor(torch.eye(2).to_sparse())  # sparse goes through encode_sparse
    with pytest.raises(codec.CodecError, match="meta tensor"):
        codec.encode_tensor(torch.empty(2, device="meta"))


def test_maybe_tensor_keeps_none_explicit() -> None:
    none = codec.encode_maybe_tensor(None)
    assert none.WhichOneof("kind") == "none"
    assert codec.decode_maybe_tensor(none) is None
    assert codec.decode_maybe_tensor(codec.encode_maybe_tensor(torch.zeros(1))).tolist() == [0.0]
    with pytest.raises(codec.CodecError, match="empty MaybeTensor"):
        codec.decode_maybe_tensor(pb.MaybeTensor())
