"""Chunked streaming of large tensors (the ``StreamCall`` RPC), shared by client and server.

A streamed message travels as a header (the ordinary request or response with every
Tensor's ``data`` empty) followed by ``data`` chunks: the tensors' wire bytes
concatenated in *slot order*, the order :func:`tensor_slots` lists the header's
Tensors (depth-first, fields in field-number order). Encoders append payloads in that
order (``codec.encode_*(..., payloads=list)``) and decoders consume them in that
order (``codec.decode_*(..., payloads=iterator)``).

Memory and copies: a data chunk is framed here, without a protobuf message
(:func:`data_message`, :func:`serialize`, :func:`parser`): the sender copies each
:data:`CHUNK_BYTES` slice of a tensor's bytes once, straight into the wire bytes of a
``data``-only message; the receiver copies each chunk once, from gRPC's buffer into the
buffer the decoded tensor then uses. Through protobuf messages each byte was copied three
times on the way out before gRPC's own copy (a bytes slice, the message, its
serialisation), and three times on the way in after it. The
framing is protobuf's own (field ``data`` = 4, length-delimited), so any gRPC client or
server sees ordinary ``StreamRequest`` / ``StreamResponse`` messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from google.protobuf.message import Message

from . import codec
from . import gradserve_pb2 as pb

__all__ = [
    "ACCEPTED_KEY",
    "CHUNK_BYTES",
    "METHOD",
    "Assembler",
    "Data",
    "accepted",
    "chunks",
    "data_message",
    "data_messages",
    "framed_handler",
    "open_stream_call",
    "parser",
    "part",
    "serialize",
    "tensor_slots",
]

CHUNK_BYTES = 1 << 20
"""Size of a data chunk, in bytes. Measured here: 1 MiB chunks beat 64 KiB and one big message, and
(with the framing below) 4 MiB chunks took twice as long at 4 MB; 256 KiB was no better."""


ACCEPTED_KEY = "gradserve-accepted"
"""Initial-metadata key the server sends once it accepted a StreamCall's header. A client sends
the data chunks only after it: data racing a refusal makes gRPC report INTERNAL instead of the
refusal's status."""


METHOD = "/gradserve.v1.GradientService/StreamCall"
"""Full name of the streamed RPC."""

_DATA_FIELD = 4
for _message in (pb.StreamRequest, pb.StreamResponse):  # the framing below hard-codes field 4, bytes
    _field = _message.DESCRIPTOR.fields_by_name["data"]
    if _field.number != _DATA_FIELD or _field.type != _field.TYPE_BYTES:
        raise ImportError(f"streaming: {_message.DESCRIPTOR.full_name}.data is not bytes field {_DATA_FIELD}")
_DATA_TAG = (_DATA_FIELD << 3) | 2  # wire type 2: length-delimited


class Data:
    """A ``data``-only stream message parsed without protobuf; ``data`` views gRPC's buffer (no copy)."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data


def part(message: Any) -> str | None:
    """Which part of a ``StreamRequest`` / ``StreamResponse`` (or :class:`Data`) is set: ``"data"``, a header kind, or None."""
    return "data" if isinstance(message, Data) else message.WhichOneof("part")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def data_message(chunk: Any) -> bytes:
    """The wire bytes of a ``StreamRequest`` / ``StreamResponse`` holding only ``data=chunk``.

    ``chunk`` is any bytes-like object (a memoryview slice of a tensor's bytes); it is
    copied once, into the returned message. Send it through :func:`serialize`.
    """
    return b"".join((bytes((_DATA_TAG,)), _varint(len(chunk)), chunk))


def serialize(message: Any) -> bytes:
    """gRPC serializer of ``gradserve.v1`` messages: a protobuf message is serialised; bytes (already
    serialised, or from :func:`data_message`) pass as they are."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def parser(message_type: type[Message]) -> Any:
    """gRPC deserializer of stream messages of ``message_type``: a ``data``-only message becomes
    :class:`Data` (a view of gRPC's buffer), anything else is parsed by protobuf."""
    from_string = message_type.FromString

    def parse(raw: bytes) -> Any:
        if raw[:1] == bytes((_DATA_TAG,)):
            length, shift, pos = 0, 0, 1
            while pos < len(raw) and pos <= 5:  # protobuf (upb) reads a length in at most 5 bytes
                byte = raw[pos]
                length |= (byte & 0x7F) << shift
                shift += 7
                pos += 1
                if not byte & 0x80:
                    if pos + length == len(raw):  # exactly one data field: what protobuf would parse
                        return Data(memoryview(raw)[pos:])
                    break
        return from_string(raw)  # headers, and anything unusual: protobuf decides (and raises on garbage)

    return parse


def framed_handler(handler: Any) -> Any:
    """A server's ``StreamCall`` method handler (as the generated code builds it) with this module's framing."""
    return handler._replace(request_deserializer=parser(pb.StreamRequest), response_serializer=serialize)


def open_stream_call(channel: Any) -> Any:
    """The ``StreamCall`` multi-callable of a client channel (sync or ``grpc.aio``) with this module's framing."""
    return channel.stream_stream(
        METHOD, request_serializer=serialize, response_deserializer=parser(pb.StreamResponse), _registered_method=True
    )


def accepted(initial_metadata: Any) -> bool:
    """Whether the server's initial metadata says it accepted the header (else it refused: read the status)."""
    return any(key == ACCEPTED_KEY for key, _ in initial_metadata or ())


def tensor_slots(message: Message) -> list[pb.Tensor]:
    """The ``gradserve.v1.Tensor`` messages inside ``message``, in slot order."""
    slots: list[pb.Tensor] = []
    for field in sorted(message.DESCRIPTOR.fields, key=lambda f: f.number):
        if field.message_type is None:
            continue
        if field.is_repeated:
            items = list(getattr(message, field.name))
        elif message.HasField(field.name):
            items = [getattr(message, field.name)]
        else:
            continue
        for item in items:
            if field.message_type is pb.Tensor.DESCRIPTOR:
                slots.append(item)
            else:
                slots.extend(tensor_slots(item))
    return slots


def chunks(payloads: Iterable[torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """The payloads' bytes (uint8 CPU tensors from ``codec.wire_bytes``) as read-only views of ``chunk_bytes`` each (no copy)."""
    for payload in payloads:
        view = memoryview(payload.numpy()).toreadonly()
        for start in range(0, len(view), chunk_bytes):
            yield view[start : start + chunk_bytes]


def data_messages(payloads: Iterable[torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The payloads as the wire bytes of ``data`` messages (:func:`data_message`) of ``chunk_bytes`` each:
    each byte is copied once, a chunk at a time, whatever the payloads' total size."""
    for chunk in chunks(payloads, chunk_bytes):
        yield data_message(chunk)


class Assembler:
    """Receives a streamed message: checks the header's declared sizes, then fills buffers from chunks.

    Parameters
    ----------
    header
        The header message (a request or response with empty ``data`` fields).
    max_tensor_bytes, max_total_bytes
        Limits on one tensor and on all of them, in bytes; None for none. Checked on
        the declared shapes, before anything is allocated.
    what
        How errors name the message, e.g. ``"square"``.

    Raises
    ------
    codec.CodecError
        A header tensor carries inline data, or has a bad dtype or shape.
    codec.TensorTooLarge
        A tensor, or all of them together, over the limits.
    """

    def __init__(
        self, header: Message, *, max_tensor_bytes: int | None = None, max_total_bytes: int | None = None, what: str = "stream"
    ) -> None:
        self.what = what
        self.sizes: list[int] = []
        for i, slot in enumerate(tensor_slots(header)):
            if slot.data or slot.HasField("shared_memory"):
                raise codec.CodecError(f"{what}: streamed tensor {i} carries data in the header; send it in data chunks")
            nbytes = codec.tensor_nbytes(slot, what=f"{what} streamed tensor {i}")
            if max_tensor_bytes is not None and nbytes > max_tensor_bytes:
                raise codec.TensorTooLarge(
                    f"{what} streamed tensor {i} of shape {list(slot.shape)} is {nbytes} bytes, "
                    f"over the limit of {max_tensor_bytes} bytes"
                )
            self.sizes.append(nbytes)
        total = sum(self.sizes)
        if max_total_bytes is not None and total > max_total_bytes:
            raise codec.TensorTooLarge(
                f"{what}: streamed tensors total {total} bytes, over the request limit of {max_total_bytes} bytes"
            )
        self.buffers: list[torch.Tensor] = []
        self._filled = 0  # bytes written into the last buffer

    def feed(self, data: Any) -> None:
        """Copy the next chunk into the buffers. Raises CodecError past the declared total."""
        view = np.frombuffer(data, dtype=np.uint8)
        while len(view):
            if not self.buffers or self._filled == self.sizes[len(self.buffers) - 1]:
                if len(self.buffers) == len(self.sizes):
                    raise codec.CodecError(f"{self.what}: more data than the {sum(self.sizes)} bytes the header declares")
                self.buffers.append(torch.empty(self.sizes[len(self.buffers)], dtype=torch.uint8))
                self._filled = 0
                continue
            target = self.buffers[-1].numpy()
            n = min(len(view), len(target) - self._filled)
            target[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]

    def payloads(self) -> Iterator[torch.Tensor]:
        """The filled buffers in slot order. Raises CodecError if data is missing."""
        while len(self.buffers) < len(self.sizes) and self.sizes[len(self.buffers)] == 0:
            self.buffers.append(torch.empty(0, dtype=torch.uint8))  # trailing empty tensors get no chunk
            self._filled = 0
        received = sum(self.sizes[: len(self.buffers) - 1]) + self._filled if self.buffers else 0
        if len(self.buffers) < len(self.sizes) or (self.buffers and self._filled != self.sizes[len(self.buffers) - 1]):
            raise codec.CodecError(
                f"{self.what}: stream ended after {received} of the {sum(self.sizes)} bytes the header declares"
            )
        return iter(self.buffers)
