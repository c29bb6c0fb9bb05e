"""Tensor codec: torch tensors and Python scalars to and from ``gradserve.v1`` messages.

Written once; the client SDK and the server both import it. The wire format is the
one ``gradserve.proto`` documents: a dtype enum, an int64 shape and the elements as raw
little-endian bytes in C-contiguous (logical) order. Decoding checks the byte count
against shape x item size *before* it allocates anything, never unpickles, and never
calls ``torch.load``. Every dtype round-trips bit-exactly (NaN payloads, +-Inf and
-0.0 included); bfloat16 and float16 travel as 2-byte elements, never widened.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from google.protobuf import struct_pb2

from . import gradserve_pb2 as pb

__all__ = [
    "DTYPE_TO_WIRE",
    "WIRE_TO_DTYPE",
    "MAX_SPARSE_NUMEL",
    "CodecError",
    "TensorTooLarge",
    "decode_maybe_tensor",
    "decode_sparse",
    "decode_tensor",
    "decode_value",
    "dtype_name",
    "encode_maybe_tensor",
    "encode_sparse",
    "encode_tensor",
    "encode_value",
    "nbytes",
    "tensor_nbytes",
    "wire_bytes",
]

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("gradserve's codec sends raw little-endian bytes and needs a little-endian host")

DTYPE_TO_WIRE: dict[torch.dtype, int] = {
    torch.bool: pb.DTYPE_BOOL,
    torch.uint8: pb.DTYPE_UINT8,
    torch.int8: pb.DTYPE_INT8,
    torch.int16: pb.DTYPE_INT16,
    torch.int32: pb.DTYPE_INT32,
    torch.int64: pb.DTYPE_INT64,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.complex64: pb.DTYPE_COMPLEX64,
    torch.complex128: pb.DTYPE_COMPLEX128,
    torch.uint16: pb.DTYPE_UINT16,
    torch.uint32: pb.DTYPE_UINT32,
    torch.uint64: pb.DTYPE_UINT64,
    torch.float8_e4m3fn: pb.DTYPE_FLOAT8_E4M3FN,
    torch.float8_e5m2: pb.DTYPE_FLOAT8_E5M2,
}
WIRE_TO_DTYPE: dict[int, torch.dtype] = {v: k for k, v in DTYPE_TO_WIRE.items()}

# The table must cover the proto enum exactly (all but DTYPE_UNSPECIFIED): a dtype added
# to the contract without a codec entry fails here, at import, not on a user's request.
_declared = {v.number for v in pb.DType.DESCRIPTOR.values if v.number != pb.DTYPE_UNSPECIFIED}
if _declared != set(WIRE_TO_DTYPE):
    raise ImportError(f"codec dtype table {sorted(WIRE_TO_DTYPE)} does not match gradserve.v1.DType {sorted(_declared)}")

_INT64_MAX = 2**63 - 1

MAX_SPARSE_NUMEL = 2**31 - 1
"""Most elements (dense count) a server accepts in a sparse argument or grad_output: torch's
sparse kernels divide by zero (SIGFPE, the whole process dies) on shapes of 2**32 elements."""

MAX_DIMS = 64
"""Most dimensions a tensor may have (torch's own kernels stop at 25 to 64; a rank of
100,000 in a 100 KB request would cost minutes of CPU in shape arithmetic)."""


class CodecError(ValueError):
    """A message does not describe a valid tensor or value (maps to INVALID_ARGUMENT)."""


class TensorTooLarge(CodecError):
    """A tensor is larger than the configured limit (maps to RESOURCE_EXHAUSTED)."""


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: a dtype as error messages name it."""
    return str(dtype).removeprefix("torch.")


def _shape_text(shape: Any) -> str:
    """A shape for an error message, cut short so hostile input cannot bloat the reply."""
    dims = list(shape)
    return str(dims) if len(dims) <= 8 else f"[{', '.join(map(str, dims[:8]))}, ... ({len(dims)} dimensions)]"


def tensor_nbytes(msg: pb.Tensor, *, what: str = "tensor") -> int:
    """Number of data bytes the tensor's dtype and shape call for, in bytes.

    Raises
    ------
    CodecError
        The dtype is DTYPE_UNSPECIFIED or unknown, more than :data:`MAX_DIMS`
        dimensions, or a dimension is negative.
    TensorTooLarge
        The size in bytes overflows int64.
    """
    dtype = WIRE_TO_DTYPE.get(msg.dtype)
    if dtype is None:
        name = "DTYPE_UNSPECIFIED" if msg.dtype == pb.DTYPE_UNSPECIFIED else f"unknown value {msg.dtype}"
        expected = ", ".join(pb.DType.Name(v) for v in sorted(WIRE_TO_DTYPE))
        raise CodecError(f"{what}: dtype is {name}; expected one of {expected}")
    if len(msg.shape) > MAX_DIMS:
        raise CodecError(f"{what}: tensor has {len(msg.shape)} dimensions; at most {MAX_DIMS} are accepted")
    numel, span = 1, 1
    for dim in msg.shape:
        if dim < 0:
            raise CodecError(f"{what}: shape {_shape_text(msg.shape)} has a negative dimension")
        numel *= dim  # Python ints: no overflow while we check
        span *= max(dim, 1)
    itemsize = dtype.itemsize
    if numel * itemsize > _INT64_MAX:
        raise TensorTooLarge(f"{what}: shape {_shape_text(msg.shape)} has {numel} elements, over the int64 limit")
    if span * itemsize > _INT64_MAX:  # even with zero elements, torch's strides would overflow
        raise CodecError(f"{what}: shape {_shape_text(msg.shape)} overflows int64 strides, though it has {numel} elements")
    return numel * itemsize


def decode_tensor(
    msg: pb.Tensor, *, max_bytes: int | None = None, what: str = "tensor", payloads: Iterator[torch.Tensor] | None = None
) -> torch.Tensor:
    """Decode a ``gradserve.v1.Tensor`` into a new CPU tensor it owns.

    Parameters
    ----------
    msg
        The message. ``requires_grad`` is *not* applied; the caller decides.
    max_bytes
        Largest accepted data size in bytes; ``None`` for no limit.
    what
        How error messages name the tensor, e.g. ``"square argument 0"``.
    payloads
        For streaming: the tensor's wire bytes are the next item (a uint8 CPU tensor
        the stream filled, used without a copy); ``msg.data`` must be empty.

    Returns
    -------
    torch.Tensor
        On the CPU, with ``msg``'s dtype and shape, C-contiguous, writable.

    Raises
    ------
    CodecError
        Unknown dtype, negative dimension, a byte count different from shape x item
        size, or a bool byte other than 0 or 1.
    TensorTooLarge
        The declared size overflows int64 or is over ``max_bytes``. Checked first,
        on the declared shape, before the byte count and before allocating.
    """
    nbytes = tensor_nbytes(msg, what=what)
    dtype = WIRE_TO_DTYPE[msg.dtype]
    shape = list(msg.shape)
    if max_bytes is not None and nbytes > max_bytes:
        raise TensorTooLarge(
            f"{what}: {dtype_name(dtype)} tensor of shape {_shape_text(shape)} is {nbytes} bytes, "
            f"over the limit of {max_bytes} bytes"
        )
    raw = next(payloads) if payloads is not None else None
    got = len(msg.data) + (raw.numel() if raw is not None else 0)
    if got != nbytes:
        if msg.HasField("shared_memory"):
            raise CodecError(
                f"{what}: a shared-memory reference is accepted only in a unary call of a client whose "
                "SharedMemoryProbe succeeded (request metadata gradserve-shared-memory-reply-bytes)"
            )
        raise CodecError(
            f"{what}: {dtype_name(dtype)} tensor of shape {_shape_text(shape)} needs {nbytes} bytes of data, got {got}"
        )
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if raw is None:
        # One copy into memory the tensor owns: the protobuf bytes are immutable and a
        # Function may write to its inputs in place.
        raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
    if dtype is torch.bool and bool((raw > 1).any()):
        raise CodecError(f"{what}: bool tensor holds a byte other than 0 or 1")
    return raw.view(dtype).reshape(shape)


def nbytes(value: Any) -> int:
    """Bytes a tensor (dense or sparse COO: indices and values) or numpy array puts on the wire; 0 for anything else."""
    if isinstance(value, torch.Tensor):
        if value.layout == torch.sparse_coo:
            return nbytes(value._indices()) + nbytes(value._values())
        return value.numel() * value.element_size()
    return value.nbytes if isinstance(value, np.ndarray) else 0


def wire_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's wire bytes: a C-contiguous uint8 CPU tensor in logical order (a view when possible).

    One device-to-host transfer for a CUDA tensor; no copy for a contiguous CPU tensor.
    """
    flat = tensor.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    if flat.stride(0) != 1:  # size-0 and size-1 dims count as contiguous at any stride
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8)


def encode_tensor(
    tensor: Any,
    *,
    requires_grad: bool | None = None,
    payloads: list[torch.Tensor] | None = None,
    out: pb.Tensor | None = None,
) -> pb.Tensor:
    """Encode a tensor (any device, any layout, any strides) as a ``gradserve.v1.Tensor``.

    Parameters
    ----------
    tensor
        A dense ``torch.Tensor`` of a supported dtype, or a numpy array (negative
        strides allowed). Non-contiguous inputs are sent in logical order.
    requires_grad
        Value of the message's ``requires_grad``; defaults to ``tensor.requires_grad``.
    payloads
        For streaming: leave ``data`` empty and append the wire bytes (see
        :func:`wire_bytes`) to this list instead, so they are never copied into a message.
    out
        An empty message to fill and return, e.g. ``response.outputs.add()``: building a
        message and then assigning it into another (``Response(outputs=[t])``) copies
        every data byte again.

    Raises
    ------
    CodecError
        Unsupported dtype (e.g. quantized, float8_e4m3fnuz), a layout other than
        strided (sparse COO goes through :func:`encode_sparse`), or a meta tensor
        (it has no data).
    """
    if not isinstance(tensor, torch.Tensor):
        tensor = _from_numpy(tensor)
    if tensor.layout != torch.strided:
        raise CodecError(f"a {tensor.layout} tensor cannot be sent here; expected a dense (strided) tensor")
    if tensor.is_nested:
        raise CodecError("a nested tensor cannot be sent; send its components as separate tensors")
    if tensor.is_meta:
        raise CodecError(f"a meta tensor (shape {_shape_text(tensor.shape)}) has no data to send")
    wire = DTYPE_TO_WIRE.get(tensor.dtype)
    if wire is None:
        raise CodecError(
            f"dtype {dtype_name(tensor.dtype)} cannot be sent; supported: {', '.join(map(dtype_name, DTYPE_TO_WIRE))}"
        )
    if requires_grad is None:
        requires_grad = tensor.requires_grad
    raw = wire_bytes(tensor)
    msg = pb.Tensor() if out is None else out
    msg.dtype = wire
    msg.shape.extend(tensor.shape)
    msg.requires_grad = requires_grad
    if payloads is not None:
        payloads.append(raw)
    elif raw.numel():
        msg.data = raw.numpy().tobytes()
    return msg


def encode_sparse(
    tensor: torch.Tensor, *, requires_grad: bool | None = None, payloads: list[torch.Tensor] | None = None
) -> pb.SparseTensor:
    """Encode a sparse COO tensor as its indices and values, as stored (not coalesced).

    ``requires_grad`` and ``payloads`` as :func:`encode_tensor` (indices, then values).

    Raises
    ------
    CodecError
        A layout other than sparse COO, or values of an unsupported dtype.
    """
    if tensor.layout != torch.sparse_coo:
        raise CodecError(f"expected a sparse COO tensor, got layout {tensor.layout}")
    return pb.SparseTensor(
        shape=tensor.shape,
        indices=encode_tensor(tensor._indices(), requires_grad=False, payloads=payloads),
        values=encode_tensor(tensor._values(), requires_grad=False, payloads=payloads),
        requires_grad=tensor.requires_grad if requires_grad is None else requires_grad,
    )


def decode_sparse(
    msg: pb.SparseTensor,
    *,
    max_bytes: int | None = None,
    max_numel: int | None = None,
    what: str = "tensor",
    payloads: Iterator[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode a ``gradserve.v1.SparseTensor`` into a CPU sparse COO tensor; ``requires_grad`` is not applied.

    Raises
    ------
    CodecError
        Indices that are not int64 of shape [sparse_dim, nnz], values whose shape does
        not match, or an index outside ``shape`` (torch's own invariant check), and
        what :func:`decode_tensor` raises.
    TensorTooLarge
        Indices and values together over ``max_bytes``, or a shape of more than
        ``max_numel`` elements (servers pass :data:`MAX_SPARSE_NUMEL`).
    """
    if len(msg.shape) > MAX_DIMS:
        raise CodecError(f"{what}: sparse tensor has {len(msg.shape)} dimensions; at most {MAX_DIMS} are accepted")
    numel = math.prod(msg.shape)
    if max_numel is not None and numel > max_numel:
        raise TensorTooLarge(
            f"{what}: sparse tensor of shape {_shape_text(msg.shape)} has {numel} elements; at most {max_numel} are accepted "
            "(torch's sparse kernels overflow on larger shapes)"
        )
    size = tensor_nbytes(msg.indices, what=f"{what} indices") + tensor_nbytes(msg.values, what=f"{what} values")
    if max_bytes is not None and size > max_bytes:
        raise TensorTooLarge(f"{what}: sparse tensor's indices and values are {size} bytes, over the limit of {max_bytes} bytes")
    indices = decode_tensor(msg.indices, what=f"{what} indices", payloads=payloads)
    values = decode_tensor(msg.values, what=f"{what} values", payloads=payloads)
    shape = list(msg.shape)
    if indices.dtype != torch.int64 or indices.dim() != 2 or indices.shape[1] != values.shape[:1].numel() * (values.dim() > 0):
        raise CodecError(
            f"{what}: sparse indices must be int64 of shape [sparse_dim, nnz] with nnz = values.shape[0]; "
            f"got {dtype_name(indices.dtype)} {list(indices.shape)} and values {list(values.shape)}"
        )
    if (
        any(d < 0 for d in shape)
        or indices.shape[0] + values.dim() - 1 != len(shape)
        or list(values.shape[1:]) != shape[indices.shape[0] :]
    ):
        raise CodecError(
            f"{what}: sparse tensor of shape {_shape_text(shape)} does not match indices {list(indices.shape)} "
            f"and values {list(values.shape)}"
        )
    try:
        return torch.sparse_coo_tensor(indices, values, shape, check_invariants=True)
    except RuntimeError as exc:
        raise CodecError(f"{what}: invalid sparse tensor: {str(exc).splitlines()[0][:200]}") from None


def _from_numpy(array: Any) -> torch.Tensor:
    if not isinstance(array, np.ndarray):
        raise CodecError(f"expected a torch.Tensor or numpy.ndarray, got {type(array).__name__}")
    if array.dtype.hasobject or array.dtype.kind not in "biufc":
        raise CodecError(f"a numpy array of dtype {array.dtype} cannot be sent; expected a bool, integer, float or complex array")
    if not array.dtype.isnative:  # big-endian data ('>f4'): torch takes native byte order only
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.c_contiguous:  # negative or gapped strides (ascontiguousarray would make 0-d arrays 1-d)
        array = array.copy(order="C")
    try:
        return torch.from_numpy(array)
    except TypeError as exc:  # dtypes torch lacks: longdouble, uint beyond 64 bits
        raise CodecError(f"a numpy array of dtype {array.dtype} cannot be sent: {exc}") from None


def _numpy_scalar(value: Any) -> Any:
    """A numpy scalar (np.float32(2.0), np.int64(3), np.bool_) as the Python scalar or 0-dim tensor it stands for."""
    item = value.item()
    if isinstance(item, (bool, int, float, str)):
        return item
    if isinstance(item, complex):
        return torch.tensor(item, dtype=torch.complex64 if value.dtype.itemsize == 8 else torch.complex128)
    raise CodecError(f"a numpy scalar of dtype {value.dtype} cannot be sent; expected bool, integer, float, complex or str")


def encode_value(
    value: Any, *, requires_grad: bool | None = None, payloads: list[torch.Tensor] | None = None, out: pb.Value | None = None
) -> pb.Value:
    """Encode one argument: a tensor (dense or sparse COO), numpy array or scalar, bool, int, float, str or None.

    ``requires_grad`` (tensors only; default: the tensor's own flag) and ``payloads``
    are passed to :func:`encode_tensor`. A numpy scalar travels as the Python scalar
    it holds. ``out``: an empty message to fill and return (see :func:`encode_tensor`).

    Raises
    ------
    CodecError
        Another type, a numpy array of object or string dtype, or an int outside
        signed 64-bit.
    """
    msg = pb.Value() if out is None else out
    if isinstance(value, np.generic):
        value = _numpy_scalar(value)
    if isinstance(value, torch.Tensor) and value.layout == torch.sparse_coo:
        msg.sparse_tensor.CopyFrom(encode_sparse(value, requires_grad=requires_grad, payloads=payloads))
    elif isinstance(value, (torch.Tensor, np.ndarray)):
        encode_tensor(value, requires_grad=requires_grad, payloads=payloads, out=msg.tensor)
    elif isinstance(value, bool):  # before int: bool is an int subclass
        msg.bool_value = value
    elif isinstance(value, int):
        if not -(2**63) <= value <= _INT64_MAX:
            raise CodecError(f"int argument {value} does not fit in 64 bits")
        msg.int_value = value
    elif isinstance(value, float):
        msg.float_value = value
    elif isinstance(value, str):
        msg.string_value = value
    elif value is None:
        msg.null_value = struct_pb2.NULL_VALUE
    else:
            raise CodecError(
            f"arguments must be tensors, numpy arrays, bool, int, float, str or None; got {type(value).__name__}"
        )
    return msg


def decode_value(
    msg: pb.Value,
    *,
    max_tensor_bytes: int | None = None,
    max_sparse_numel: int | None = None,
    what: str = "argument",
    payloads: Iterator[torch.Tensor] | None = None,
) -> Any:
    """Decode one positional argument; a tensor comes back as in :func:`decode_tensor`.

    A tensor's ``requires_grad`` is applied, so it arrives as a CPU leaf that requires grad.
    ``payloads`` is passed to :func:`decode_tensor`; ``max_sparse_numel`` to :func:`decode_sparse`.

    Raises
    ------
    CodecError
        An empty Value, ``requires_grad`` on a tensor whose dtype is not floating
        point or complex, and what :func:`decode_tensor` raises.
    """
    kind = msg.WhichOneof("kind")
    if kind in ("tensor", "sparse_tensor"):
        if kind == "tensor":
            tensor = decode_tensor(msg.tensor, max_bytes=max_tensor_bytes, what=what, payloads=payloads)
        else:
            tensor = decode_sparse(
                msg.sparse_tensor, max_bytes=max_tensor_bytes, max_numel=max_sparse_numel, what=what, payloads=payloads
            )
        if getattr(msg, kind).requires_grad:
            if not (tensor.is_floating_point() or tensor.is_complex()):
                raise CodecError(
                    f"{what}: requires_grad is set on a tensor of dtype {dtype_name(tensor.dtype)}; "
                    "only floating point and complex tensors can require gradients"
                )
            tensor.requires_grad_(True)
        return tensor
    if kind == "null_value":
        return None
    if kind is None:
        raise CodecError(f"{what}: empty Value; expected a tensor, bool, int, float, string or null")
    return getattr(msg, kind)


def encode_maybe_tensor(
    tensor: torch.Tensor | None,
    *,
    requires_grad: bool = False,
    payloads: list[torch.Tensor] | None = None,
    out: pb.MaybeTensor | None = None,
) -> pb.MaybeTensor:
    """Encode a gradient or grad_output; ``None`` becomes the explicit ``none``, never zeros.

    A sparse COO tensor travels sparse. ``requires_grad`` sets the message's flag
    (for gradients: differentiable again; for cotangents: a leaf of a kept graph).
    ``out``: an empty message to fill and return (see :func:`encode_tensor`).
    """
    msg = pb.MaybeTensor() if out is None else out
    if tensor is None:
        msg.none = struct_pb2.NULL_VALUE
    elif tensor.layout == torch.sparse_coo:
        msg.sparse.CopyFrom(encode_sparse(tensor, requires_grad=requires_grad, payloads=payloads))
    else:
        encode_tensor(tensor, requires_grad=requires_grad, payloads=payloads, out=msg.tensor)
    return msg


def decode_maybe_tensor(
    msg: pb.MaybeTensor,
    *,
    max_bytes: int | None = None,
    max_sparse_numel: int | None = None,
    what: str = "tensor",
    payloads: Iterator[torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Decode a ``MaybeTensor``: a CPU tensor (dense or sparse COO), or ``None`` for ``none``.

    The message's ``requires_grad`` is not applied. Raises :class:`CodecError` when
    nothing is set, and what :func:`decode_tensor` / :func:`decode_sparse` raise.
    """
    kind = msg.WhichOneof("kind")
    if kind == "tensor":
        return decode_tensor(msg.tensor, max_bytes=max_bytes, what=what, payloads=payloads)
    if kind == "sparse":
        return decode_sparse(msg.sparse, max_bytes=max_bytes, max_numel=max_sparse_numel, what=what, payloads=payloads)
    if kind == "none":
        return None
    raise CodecError(f"{what}: empty MaybeTensor; expected a tensor, a sparse tensor or none")
