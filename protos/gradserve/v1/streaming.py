"""Chunked streaming of large tensors (the ``StreamCall`` RPC), shared by client and server.

A streamed message travels as a header (the ordinary request or response with every
Tensor's ``data`` empty) followed by ``data`` chunks: the tensors' wire bytes
concatenated in *slot order*, the order :func:`tensor_slots` lists the header's
Tensors (depth-first, fields in field-number order). Encoders append payloads in that
order (``codec.encode_*(..., payloads=list)``) and decoders consume them in that
order (``codec.decode_*(..., payloads=iterator)``).

Memory: the sender sends views of each tensor's bytes (no copy for a contiguous CPU
tensor) in chunks of :data:`CHUNK_BYTES`; the receiver copies each chunk once into a
buffer the decoded tensor then uses without a further copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from google.protobuf.message import Message

from . import codec
from . import gradserve_pb2 as pb

__all__ = ["ACCEPTED_KEY", "CHUNK_BYTES", "Assembler", "accepted", "chunks", "tensor_slots"]

CHUNK_BYTES = 1 << 20
"""Size of a data chunk, in bytes. Measured here: 1 MiB chunks beat both 64 KiB and one big message."""


ACCEPTED_KEY = "gradserve-accepted"
"""Initial-metadata key the server sends once it accepted a StreamCall's header. A client sends
the data chunks only after it: data racing a refusal makes gRPC report INTERNAL instead of the
refusal's status."""


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


def chunks(payloads: Iterable[torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The payloads' bytes (uint8 CPU tensors from ``codec.wire_bytes``) in chunks of ``chunk_bytes``."""
    for payload in payloads:
        view = memoryview(payload.numpy())
        for start in range(0, len(view), chunk_bytes):
            yield bytes(view[start : start + chunk_bytes])


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

    def feed(self, data: bytes) -> None:
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
