"""The server's side of same-host shared memory (``--shared-memory``): probe, request segments, reply segments, sweeper.

Who unlinks what, on every path (the guarantees README.md states):

- **Request segments** (the client created them): unlinked here as soon as they are
  mapped, after admission; a call refused before that leaves them to the client, which
  unlinks its segment when the call ends however it ends. A client killed before the
  server mapped its segment leaves it to :func:`gradserve.v1.shm.sweep` (its pid is dead).
- **Reply segments** (created here, after the Function ran, only while the caller is
  still there): the client unlinks each right after mapping it. If it never does (it
  died or was cancelled between our reply and its read), :class:`SharedMemoryService`
  unlinks it :data:`REPLY_TTL_S` seconds after creating it; a call that fails after the
  segment was made unlinks it at once.
- **A server killed** with reply segments unread: the next sweep by any gradserve
  process of the same user and pid namespace (a server starting, every
  :data:`SWEEP_INTERVAL_S` seconds in a running one, a client starting) removes them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from typing import Any

import grpc
from google.protobuf.message import Message

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import shm

from ._errors import Abandoned

__all__ = ["REPLY_TTL_S", "SWEEP_INTERVAL_S", "Disabled", "SharedMemoryService"]

log = logging.getLogger(__name__)

REPLY_TTL_S = 30.0
"""Seconds a reply segment (or a probe's) waits for the client to map and unlink it before the server unlinks it."""

MAX_REPLY_THRESHOLD_BYTES = 1 << 20
"""Reply tensors of this many bytes or more always go through a segment once a client asked for shared memory: the
inline rest of a unary reply stays far from protobuf's 2 GiB ceiling whatever threshold the client sent."""

SWEEP_INTERVAL_S = 10.0
"""Seconds between two sweeps of a running server (expired replies, segments of dead processes)."""


class Disabled(shm.SharedMemoryError):
    """The server runs with ``--no-shared-memory`` (or has no /dev/shm): FAILED_PRECONDITION, nothing ran."""

    code = "FAILED_PRECONDITION"
    reason = "SHARED_MEMORY_DISABLED"


class UnknownSession(shm.Unavailable):
    """A call through shared memory without a token this server issued (FAILED_PRECONDITION: probe again; nothing ran)."""


class SharedMemoryService:
    """Shared memory for one server.

    Parameters
    ----------
    enabled
        ``--shared-memory``; also off when this host has no writable /dev/shm.
    reply_ttl_s, sweep_interval_s
        See :data:`REPLY_TTL_S` and :data:`SWEEP_INTERVAL_S`.
    key
        Secret (at least 32 bytes) under which session tokens are issued and checked;
        default: a random one for this process. Server processes sharing a port
        (``--workers``) should share one, so a token from any of them works on all.
    """

    def __init__(
        self,
        enabled: bool,
        reply_ttl_s: float = REPLY_TTL_S,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
        key: bytes | None = None,
    ) -> None:
        if key is not None and len(key) < 32:
            raise ValueError(f"shared-memory token key: at least 32 bytes, got {len(key)}")
        self.enabled = enabled and shm.available()
        self.reply_ttl_s = reply_ttl_s
        self._replies: dict[str, float] = {}  # name -> unlink-by time (monotonic)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._interval_s = sweep_interval_s
        self._key = key or secrets.token_bytes(32)  # tokens are checked against it: nothing is stored per client

    def start(self) -> None:
        """Sweep what dead processes left, then again every ``sweep_interval_s`` seconds in a daemon thread."""
        if not self.enabled:
            return
        self.sweep()
        self._thread = threading.Thread(target=self._run, name="gradserve-shm-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the sweeper and unlink every reply segment not read yet."""
        self._stopped.set()
        with self._lock:
            names, self._replies = list(self._replies), {}
        for name in names:
            shm.unlink(name)

    def sweep(self) -> None:
        """Unlink expired reply segments and those of dead processes."""
        now = time.monotonic()
        with self._lock:
            expired = [n for n, t in self._replies.items() if t <= now]
            for name in expired:
                del self._replies[name]
        for name in expired:
            shm.unlink(name)
        removed = shm.sweep()
        if removed:
            log.info("removed %d shared-memory segments left by dead processes", len(removed))

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must outlive a bad pass
                log.exception("shared-memory sweep failed")

    # -- calls ----------------------------------------------------------------------------

    @staticmethod
    def reply_threshold(context: grpc.ServicerContext) -> int | None:
        """The client's :data:`shm.REPLY_KEY` in bytes, capped at :data:`MAX_REPLY_THRESHOLD_BYTES`; None when
        it did not send it (or sent no integer)."""
        for key, value in context.invocation_metadata() or ():
            if key == shm.REPLY_KEY:
                try:
                    return min(max(1, int(value)), MAX_REPLY_THRESHOLD_BYTES)
                except ValueError:
                    return None
        return None

    def shared_bytes(self, request: Message, context: grpc.ServicerContext, what: str) -> int:
        """Check the caller's token and the request's references from the message alone; their total in bytes
        (for admission).

        Raises :class:`Disabled` when it has references and shared memory is off,
        :class:`UnknownSession` without a token this server issued, and what
        :func:`shm.shared_bytes` raises.
        """
        total = shm.shared_bytes(request, what=what)
        if not self.enabled:
            if total:
                raise Disabled(f"{what}: this server runs with shared memory off (--no-shared-memory); send tensors inline")
            return 0
        token = next((v for k, v in context.invocation_metadata() or () if k == shm.TOKEN_KEY), "")
        try:
            raw = bytes.fromhex(token)
        except ValueError:
            raw = b""
        if len(raw) != 32 or not hmac.compare_digest(raw, self._token(raw[:16])):
            raise UnknownSession(
                f"{what}: no valid {shm.TOKEN_KEY} (this server did not issue it: restarted, or another replica); "
                "nothing ran: probe again with SharedMemoryProbe, or send tensors inline"
            )
        return total

    def _token(self, salt: bytes) -> bytes:
        """A session token: ``salt`` (16 bytes) and its HMAC under this server's key (16 bytes)."""
        return salt + hmac.new(self._key, salt, hashlib.sha256).digest()[:16]

    def send(self, response: Message, payloads: list[Any], threshold_bytes: int, context: grpc.ServicerContext) -> str | None:
        """Fill a streamed-form reply for a unary answer: large tensors into one new segment, the rest inline.

        Raises :class:`Abandoned` (and creates nothing) when the caller is gone. The
        segment is tracked and unlinked after ``reply_ttl_s`` unless the client did first.
        Without room in /dev/shm, everything goes inline.
        """
        if not context.is_active():
            raise Abandoned("caller gone before the reply; nothing kept")
        try:
            name = shm.place(response, payloads, threshold_bytes)
        except OSError as exc:
            log.debug("shared-memory reply failed (%s); replying inline", exc)
            name = shm.place(response, payloads, 2**64)
        if name is not None:
            self._track(name)
        return name

    def discard(self, name: str | None) -> None:
        """Unlink a reply segment now (its call failed after it was made)."""
        if name is not None:
            with self._lock:
                self._replies.pop(name, None)
            shm.unlink(name)

    def probe(self, request: pb.SharedMemoryProbeRequest) -> pb.SharedMemoryProbeResponse:
        """Read the caller's nonce and hand it a session token in a segment (see the SharedMemoryProbe RPC)."""
        if not self.enabled:
            raise Disabled("SharedMemoryProbe: this server runs with shared memory off (--no-shared-memory)")
        with self._lock:
            ours = request.name in self._replies
        if ours:  # another caller's token (or reply) segment: never read or unlink it for someone else
            raise shm.SharedMemoryError(
                f"SharedMemoryProbe: segment {request.name} was created by this server; name a segment of your own"
            )
        nonce = shm.read_probe(request.name)  # only a process of our user can have made it
        token = self._token(secrets.token_bytes(16))
        name, _ = shm.create_segment([token])  # only a process of our user can read it
        self._track(name)
        segment = pb.SharedMemoryRef(name=name, offset=0, byte_size=len(token))
        return pb.SharedMemoryProbeResponse(nonce=shm.probe_digest(nonce), segment=segment)

    def _track(self, name: str) -> None:
        with self._lock:
            self._replies[name] = time.monotonic() + self.reply_ttl_s
