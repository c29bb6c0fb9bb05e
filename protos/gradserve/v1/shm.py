"""Same-host shared memory: tensor bytes in POSIX shared-memory segments, references on the wire.

Written once; client and server both import it (as the codec). Linux only: segments
are files in ``/dev/shm``, opened by name with ``os.open`` (no ``multiprocessing``
resource tracker, which unlinks segments behind our back).

Life of a segment (see README, "Same-host shared memory"):

- Its **name** is ``gradserve-<uid>-<pid namespace>-<creator pid>-<32 hex>``: a file
  name, never a path. A received name must match that pattern exactly before anything
  is opened, so a client string can never pick another file.
- The **sender** creates it with ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600, writes
  it with ``pwrite`` and closes it: it keeps no mapping, so it cannot change the
  bytes after sending.
- The **receiver** checks each reference against the tensor's declared dtype and
  shape, opens the segment, checks with ``fstat`` that it is a regular file of its
  own user, closed to group and others and large enough, maps it and **unlinks it
  at once**: the mapping outlives the name, and the decoded tensors use it without a
  copy (they keep the mapping alive; nobody else holds one).
- What a dead process leaves is removed by :func:`sweep`: names of our user and pid
  namespace whose creator pid is gone. Each side also unlinks what it created when a
  call ends without the other side having done so (see the client and server).
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from google.protobuf.message import Message

from . import codec
from . import gradserve_pb2 as pb
from .streaming import tensor_slots

__all__ = [
    "ALIGN",
    "REPLY_KEY",
    "SHM_DIR",
    "TOKEN_KEY",
    "NotOwned",
    "SharedMemoryError",
    "Unavailable",
    "available",
    "create_segment",
    "map_message",
    "new_name",
    "probe_digest",
    "read_probe",
    "shared_bytes",
    "sweep",
    "unlink",
]

SHM_DIR = Path("/dev/shm")
"""Where POSIX shared memory lives on Linux (``shm_open`` creates files here)."""

ALIGN = 64
"""Offsets of tensors in a segment are multiples of this many bytes (a cache line; any dtype's alignment)."""

REPLY_KEY = "gradserve-shared-memory-reply-bytes"
"""Request metadata of a client whose probe succeeded: reply tensors of at least this many bytes through shared memory."""

TOKEN_KEY = "gradserve-shared-memory-token"
"""Request metadata beside :data:`REPLY_KEY`: the session token (hex) read from the probe's reply segment."""

PROBE_MAX_BYTES = 64
"""Largest probe segment, in bytes."""

_NAME = re.compile(r"gradserve-([0-9]{1,10})-([0-9]{1,20})-([0-9]{1,10})-[0-9a-f]{32}")  # ASCII digits only


class SharedMemoryError(codec.CodecError):
    """A reference or segment that cannot be used (INVALID_ARGUMENT unless a subclass says otherwise)."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class NotOwned(SharedMemoryError):
    """The segment belongs to another user, or group or others may open it (PERMISSION_DENIED)."""

    code = "PERMISSION_DENIED"
    reason = "SHARED_MEMORY_NOT_OWNED"


class Unavailable(SharedMemoryError):
    """The segment does not exist here: another host or /dev/shm (FAILED_PRECONDITION; nothing ran)."""

    code = "FAILED_PRECONDITION"
    reason = "SHARED_MEMORY_UNAVAILABLE"


def available() -> bool:
    """Whether this process can create segments: Linux with a writable ``/dev/shm``."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK | os.X_OK)


@functools.cache
def _pid_namespace() -> int:
    """Inode of this process's pid namespace (0 when /proc does not say): pids mean something only inside one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def new_name() -> str:
    """A fresh segment name carrying our uid, pid namespace and pid (for :func:`sweep`) and 128 random bits."""
    return f"gradserve-{os.geteuid()}-{_pid_namespace()}-{os.getpid()}-{secrets.token_hex(16)}"


def _checked_name(name: str, what: str) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        shown = repr(name[:80]) if isinstance(name, str) else type(name).__name__
        raise SharedMemoryError(
            f"{what}: shared-memory segment name {shown} is not a gradserve segment name "
            "(gradserve-<uid>-<pidns>-<pid>-<32 hex digits>)"
        )
    return name


def probe_digest(nonce: bytes) -> bytes:
    """What a server answers for a probe's nonce: its SHA-256 (32 bytes), never the bytes themselves.

    Echoing them would make the probe an oracle: any local process can list ``/dev/shm``,
    name a small segment of the server's user (another caller's session token) and
    have the server read it out over gRPC."""
    return hashlib.sha256(nonce).digest()


def unlink(name: str) -> None:
    """Remove a segment by name; one already gone is fine. Only gradserve names are touched."""
    try:
        os.unlink(SHM_DIR / _checked_name(name, "unlink"))
    except FileNotFoundError:
        pass


def create_segment(parts: Iterable[Any]) -> tuple[str, list[int]]:
    """Create a segment (mode 0600, exclusive) holding ``parts`` at 64-byte-aligned offsets.

    Parameters
    ----------
    parts
        uint8 CPU tensors (``codec.wire_bytes``) or bytes-like objects.

    Returns
    -------
    (name, offsets)
        The segment's name and each part's offset in bytes. The caller owns the name
        and must :func:`unlink` it when the receiver cannot have done so.

    Raises
    ------
    OSError
        The segment cannot be created or written (``/dev/shm`` full, say); nothing is left behind.
    """
    views = [memoryview(p.numpy() if isinstance(p, torch.Tensor) else p).cast("B") for p in parts]
    offsets, end = [], 0
    for view in views:
        offsets.append(-(-end // ALIGN) * ALIGN)
        end = offsets[-1] + len(view)
    name = new_name()
    fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, max(end, 1))
        for view, offset in zip(views, offsets):
            while len(view):
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)
    return name, offsets


def _open_checked(name: str, need_bytes: int, what: str) -> tuple[int, int]:
    """Open a segment for reading and writing after the owner, mode and size checks; (fd, size)."""
    try:
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Unavailable(f"{what}: shared-memory segment {name} does not exist on the server's host") from None
    except OSError as exc:
        raise NotOwned(f"{what}: shared-memory segment {name} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise NotOwned(
                f"{what}: shared-memory segment {name} belongs to uid {info.st_uid} with mode {stat.filemode(info.st_mode)}; "
                f"expected a file of uid {os.geteuid()} that group and others cannot open (mode 0600)"
            )
        if info.st_size < need_bytes:
            raise SharedMemoryError(
                f"{what}: shared-memory segment {name} holds {info.st_size} bytes, references need {need_bytes}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def shared_bytes(message: Message, *, what: str = "message") -> int:
    """Check every shared-memory reference in ``message`` against its tensor's declared size; their total in bytes.

    Nothing is opened. Raises :class:`SharedMemoryError` for a bad name, an offset that
    is not a multiple of :data:`ALIGN`, a ``byte_size`` other than the tensor's byte count
    (or zero), inline data beside a reference, or ranges of one segment that overlap;
    ``codec`` errors for a bad dtype or shape.
    """
    total = 0
    ranges: dict[str, list[tuple[int, int]]] = {}
    for i, slot in enumerate(tensor_slots(message)):
        if not slot.HasField("shared_memory"):
            continue
        ref, where = slot.shared_memory, f"{what} tensor {i}"
        _checked_name(ref.name, where)
        declared = codec.tensor_nbytes(slot, what=where)
        if slot.data:
            raise SharedMemoryError(f"{where}: has both inline data and a shared-memory reference; send one")
        if ref.byte_size != declared or declared == 0:
            dtype = codec.dtype_name(codec.WIRE_TO_DTYPE[slot.dtype])
            raise SharedMemoryError(
                f"{where}: shared-memory reference of {ref.byte_size} bytes for a {dtype} "
                f"tensor of shape {list(slot.shape)[:8]} that needs {declared} bytes (empty tensors travel inline)"
            )
        if ref.offset % ALIGN:
            raise SharedMemoryError(f"{where}: shared-memory offset {ref.offset} is not a multiple of {ALIGN}")
        ranges.setdefault(ref.name, []).append((ref.offset, ref.offset + ref.byte_size))
        total += declared
    for name, spans in ranges.items():
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            raise SharedMemoryError(f"{what}: references to shared-memory segment {name} overlap")
    return total


def map_message(message: Message, *, what: str = "message") -> list[torch.Tensor] | None:
    """Map the segments ``message`` references (checked by :func:`shared_bytes` first) and unlink them.

    Returns the wire bytes of every Tensor of ``message`` in slot order, as uint8 CPU
    tensors: views of the mapped segments (writable, no copy; they keep the mapping
    alive) or copies of the inline ``data``, which is cleared. The message then reads
    as a streamed header, and ``codec.decode_*(..., payloads=iter(result))`` decodes it.
    None when the message holds no reference (nothing changed).

    Raises
    ------
    SharedMemoryError, NotOwned, Unavailable
        As :func:`shared_bytes`, a segment that is missing, not ours or too small.
    """
    slots = tensor_slots(message)
    refs = [s.shared_memory for s in slots if s.HasField("shared_memory")]
    if not refs:
        return None
    shared_bytes(message, what=what)
    needs: dict[str, int] = {}
    for ref in refs:
        needs[ref.name] = max(needs.get(ref.name, 0), ref.offset + ref.byte_size)
    maps: dict[str, mmap.mmap] = {}
    for name, need in needs.items():
        fd, _ = _open_checked(name, need, what)
        try:
            maps[name] = mmap.mmap(fd, need, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        unlink(name)  # mapped: the name is no longer needed, and no crash of ours can leak it now
    payloads = []
    for slot in slots:
        if slot.HasField("shared_memory"):
            ref = slot.shared_memory
            payloads.append(torch.frombuffer(maps[ref.name], dtype=torch.uint8, count=ref.byte_size, offset=ref.offset))
            slot.ClearField("shared_memory")
        else:
            payloads.append(
                torch.frombuffer(bytearray(slot.data), dtype=torch.uint8) if slot.data else torch.empty(0, dtype=torch.uint8)
            )
            slot.ClearField("data")
    return payloads


def place(message: Message, payloads: list[torch.Tensor], threshold_bytes: int) -> str | None:
    """Fill a streamed-form ``message`` (empty ``data``, ``payloads`` in slot order) for a unary call.

    Tensors of at least ``threshold_bytes`` go into one new segment, referenced from
    their slot; the others are copied inline. Returns the segment's name (the caller
    unlinks it if the receiver has not), or None when no tensor was large enough.
    """
    slots = tensor_slots(message)
    if len(slots) != len(payloads):
        raise ValueError(f"{len(slots)} tensors but {len(payloads)} payloads")
    big = [i for i, p in enumerate(payloads) if p.numel() and p.numel() >= threshold_bytes]
    name = None
    if big:
        name, offsets = create_segment(payloads[i] for i in big)
        for i, offset in zip(big, offsets):
            slots[i].shared_memory.CopyFrom(pb.SharedMemoryRef(name=name, offset=offset, byte_size=payloads[i].numel()))
    chosen = set(big)
    for i, (slot, payload) in enumerate(zip(slots, payloads)):
        if i not in chosen and payload.numel():
            slot.data = payload.numpy().tobytes()
    return name


def read_probe(name: str) -> bytes:
    """The bytes of a probe segment (at most :data:`PROBE_MAX_BYTES`), after the name, owner and mode checks; unlinks it.

    Raises :class:`SharedMemoryError` (bad name, too large), :class:`Unavailable`,
    :class:`NotOwned`.
    """
    _checked_name(name, "SharedMemoryProbe")
    fd, size = _open_checked(name, 1, "SharedMemoryProbe")
    try:
        if size > PROBE_MAX_BYTES:
            raise SharedMemoryError(f"SharedMemoryProbe: segment holds {size} bytes; a probe holds at most {PROBE_MAX_BYTES}")
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    unlink(name)
    return data


def sweep() -> list[str]:
    """Unlink segments that a dead process of our user and pid namespace created; the names removed.

    A segment whose creator is alive, belongs to another user, or comes from another pid
    namespace (whose pids we cannot judge) is left alone. A pid reused by a new process
    keeps its dead predecessor's segments until that process ends too.
    """
    uid, pidns = str(os.geteuid()), str(_pid_namespace())
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        match = _NAME.fullmatch(name)
        if match is None or match.group(1) != uid or match.group(2) != pidns:
            continue
        try:
            os.kill(int(match.group(3)), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's process
        except OverflowError:
            pass
        unlink(name)
        removed.append(name)
    return removed
