"""The client core both faces share (as httpx's ``BaseClient``): configuration, call plans, the
retry schedule and error conversion. ``GradientClient`` and ``AsyncGradientClient`` only do I/O.

Retries: one client call runs a Function at most once. gRPC's own retry policy is off
(it re-sent calls the server had started after a connection dropped, and on streamed
calls it aborts the process in gRPC core: see shared/findings/grpc_retry_stream_abort.py).
A call is repeated only when the server said it never started it (UNAVAILABLE with
reason LOADING: the server is still loading its Functions); gRPC's transparent retry
still covers calls that never left the client. A server that is not up yet is waited
for: within the call's deadline, or up to ``wait_for_server_s`` when there is none; then the
call is made, so an unreachable server fails with the connection's own error.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from gradserve.v1 import codec, shm, streaming
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1.connection import ChannelSettings

from . import _messages as m
from . import _shm
from ._errors import ArgumentError, GradServeError, InternalError, from_rpc_error

__all__ = ["REPLY_ERRORS", "ClientCore", "Connections", "Plan", "StartupWait", "malformed_reply", "release"]

_METHODS = {
    "list_functions": "ListFunctions",
    "forward": "Forward",
    "backward": "Backward",
    "forward_backward": "ForwardBackward",
    "shared_memory_probe": "SharedMemoryProbe",
}

_REPORT_MARGIN_S = 0.2

WAIT_FOR_SERVER_S = 60.0
"""Default bound, in seconds, on waiting for a starting server when a call has no deadline."""


@dataclass(frozen=True)
class Plan:
    """One call to make: the RPC (``kind``), its request, and how to read the reply.

    ``payloads`` holds the tensors' bytes when the call is to be streamed
    (``StreamCall``; ``request`` is then the header), None for a single message.
    ``decode(response, incoming)`` turns the reply (and, streamed, an iterator of its
    tensors' bytes) into the method's result.

    Same-host shared memory: ``shared_memory`` says a unary reply may reference
    segments (mapped before ``decode``); ``segment`` names the request's segment (unlinked
    when the call ends); ``network`` is the same call with every byte over gRPC.
    """

    kind: str
    request: Any
    payloads: list[torch.Tensor] | None
    decode: Callable[[Any, Iterator[torch.Tensor] | None], Any]
    shared_memory: bool = False
    segment: str | None = None
    network: Plan | None = None

    @property
    def method(self) -> str:
        """Name of the unary RPC."""
        return _METHODS[self.kind]

    def read(self, response: Any, incoming: Iterator[torch.Tensor] | None) -> Any:
        """The method's result; a reply that breaks the contract is an InternalError (a GradServeError)."""
        try:
            if self.shared_memory and incoming is None:
                mapped = shm.map_message(response, what="reply")  # then unlinked: nothing left if we fail below
                incoming = iter(mapped) if mapped is not None else None
            return self.decode(response, incoming)
        except codec.CodecError as exc:
            raise malformed_reply(exc) from None

    def stream_requests(self) -> Iterator[pb.StreamRequest]:
        """The StreamCall messages: the header, then the data chunks."""
        return m.stream_requests(self.kind, self.request, self.payloads or [])

    def read_stream(self, first: pb.StreamResponse | None) -> tuple[Any, streaming.Assembler]:
        return m.read_stream_header(first, self.kind)

    @staticmethod
    def feed(assembler: streaming.Assembler, message: pb.StreamResponse) -> None:
        """One message after a streamed reply's header: it must be data."""
        if streaming.part(message) != "data":
            raise codec.CodecError(f"StreamCall reply: only data may follow the header, got {streaming.part(message)}")
        assembler.feed(message.data)


class StartupWait:
    """When to try a call again: only after the server said it never started it (reason LOADING).

    Parameters
    ----------
    timeout
        The call's deadline, in seconds from now; None for none.
    bound_s
        Without a deadline, how long to keep waiting for a starting server, in seconds.
    """

    def __init__(self, timeout: float | None, bound_s: float) -> None:
        now = time.monotonic()
        self.deadline = None if timeout is None else now + timeout
        self.give_up_at = self.deadline if self.deadline is not None else now + bound_s
        self._delay_s = 0.05

    def remaining(self) -> float | None:
        """Seconds left of the call's deadline (never below zero), or None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def until_give_up(self) -> float:
        """Seconds left to wait for a starting server: with a deadline, all of it but the last
        0.2 s, kept to make the call and report the connection's own error."""
        margin = _REPORT_MARGIN_S if self.deadline is not None else 0.0
        return max(0.0, self.give_up_at - margin - time.monotonic())

    def retry_after(self, error: GradServeError) -> float:
        """Seconds to sleep before trying again; re-raises ``error`` when it must not be retried."""
        left = self.give_up_at - time.monotonic()
        if error.reason != "LOADING" or left <= _REPORT_MARGIN_S:
            raise error
        delay, self._delay_s = min(self._delay_s, left - _REPORT_MARGIN_S), min(2 * self._delay_s, 1.0)
        return delay


class Connections:
    """Which of a client's connections (0 .. count-1) a call uses: the next in turn, or for a backward by
    handle the one whose forward made the handle.

    A server with ``--workers`` keeps a forward's graph in the worker process that ran it,
    and one connection always reaches the same worker: so the backward goes back on
    that connection and finds the handle. No I/O; safe to share between threads.
    """

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"connections must be at least 1, got {count}")
        self.count = count
        self._turn = itertools.count()
        self._home: dict[str, int] = {}
        self._lock = threading.Lock()

    def next(self) -> int:
        """The connection for a call that needs no particular one (round robin)."""
        return next(self._turn) % self.count if self.count > 1 else 0

    def remember(self, handle: str, index: int) -> None:
        """``handle`` was made on connection ``index``."""
        if handle and self.count > 1:
            with self._lock:
                self._home[handle] = index

    def home(self, handle: str) -> int:
        """The connection ``handle`` was made on (the next in turn for one unknown)."""
        index = self._home.get(handle) if self.count > 1 else 0
        return self.next() if index is None else index

    def forget(self, handle: str) -> None:
        """``handle`` will not be used again (consumed by a backward, released, or gone)."""
        if self.count > 1:
            with self._lock:
                self._home.pop(handle, None)


class ClientCore:
    """Configuration and call plans of a gradserve client; no I/O.

    Parameters are those of :class:`gradserve.client.GradientClient`.
    """

    def __init__(
        self,
        target: str,
        timeout: float | None,
        settings: ChannelSettings,
        stream_threshold_bytes: int,
        wait_for_server_s: float,
        shared_memory: _shm.SharedMemory | None = None,
        connections: int = 1,
    ) -> None:
        self.target = target
        self.shared_memory = shared_memory
        self.connections = Connections(connections)
        self.timeout = timeout
        self.settings = settings
        self.stream_threshold_bytes = stream_threshold_bytes
        self.wait_for_server_s = wait_for_server_s
        self.connected_once = False  # set by the faces after a first reply

    def open_channels(self, api: Any) -> list[Any]:
        """One channel per connection, from ``api`` (``grpc`` or ``grpc.aio``)."""
        return self.settings.open_channels(self.target, api, self.connections.count)

    # -- policy ------------------------------------------------------------------------

    def startup_wait(self, timeout: float | None) -> StartupWait:
        """The retry schedule of one call; ``timeout`` None means the client's default."""
        return StartupWait(self.timeout if timeout is None else timeout, self.wait_for_server_s)

    def call_options(self, wait: StartupWait) -> dict[str, Any]:
        """Keyword arguments of a gRPC call: the deadline left and the credentials' metadata.

        Not wait_for_ready: the faces wait for a starting server themselves (within the
        deadline, else up to ``wait_for_server_s``), then call, so a server that stays
        unreachable fails with the connection's own error (and a TLS hint), not a bare
        DEADLINE_EXCEEDED.
        """
        metadata = self.settings.metadata()
        if self.shared_memory is not None and self.shared_memory.active:
            metadata += self.shared_memory.metadata()
        return {"timeout": wait.remaining(), "metadata": metadata}

    def error(self, error: grpc.RpcError) -> GradServeError:
        """The GradServeError for a failed call, with a hint where a TLS mismatch is the likely cause
        (only while no call has succeeded yet: a dropped connection is not a TLS mismatch)."""
        converted = from_rpc_error(error)
        if converted.code is grpc.StatusCode.UNAVAILABLE and not converted.reason and not self.connected_once:
            hint = _tls_hint(converted.message, self.settings)
            if hint:
                return type(converted)(converted.code, f"{converted.message} ({hint})", converted.reason)
        return converted

    # -- same-host shared memory (see _shm) ---------------------------------------------

    @property
    def transport(self) -> str:
        """``"shared_memory"``, ``"network"``, or ``"pending"`` before the first call's probe."""
        return "network" if self.shared_memory is None else self.shared_memory.state

    def probe_plan(self) -> tuple[Plan, bytes] | None:
        """The SharedMemoryProbe call to make before this call, with its nonce; None when none is due."""
        if self.shared_memory is None or self.shared_memory.state != "pending":
            return None
        made = self.shared_memory.probe_request()
        if made is None:
            return None
        request, segment, nonce = made
        return Plan("shared_memory_probe", request, None, lambda r, _: r, segment=segment), nonce

    def prepare(self, plan: Plan) -> Plan:
        """``plan`` as it will be sent: large tensors moved to a segment while shared memory is on."""
        return plan if self.shared_memory is None else self.shared_memory.prepare(plan)

    def fall_back(self, plan: Plan, error: GradServeError) -> Plan:
        """The plan to send after ``error``: the network one when a segment was refused; else re-raises ``error``."""
        if self.shared_memory is None:
            raise error
        return self.shared_memory.fall_back(plan, error)

    # -- plans --------------------------------------------------------------------------

    def list_functions(self) -> Plan:
        return Plan("list_functions", pb.ListFunctionsRequest(), None, lambda r, _: m.function_infos(r))

    def forward(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Plan:
        with _arguments():
            payloads = self._payloads(args, kwargs.values())
            request = m.forward_request(name, args, kwargs, payloads)
        return Plan("forward", request, payloads, lambda r, inc: m.decode_outputs(r.outputs, r.returns_tuple, args, inc))

    def forward_backward(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any], grad_outputs: Any) -> Plan:
        inputs = [*args, *kwargs.values()]
        with _arguments():
            cotangents = m.as_grad_outputs(grad_outputs)
            payloads = self._payloads(args, cotangents, kwargs.values())
            request = m.forward_backward_request(name, args, kwargs, cotangents, payloads)
        return Plan("forward_backward", request, payloads, lambda r, inc: m.forward_backward_result(r, inputs, inc))

    def forward_keep(
        self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any], requires_grad: Sequence[bool], grad_enabled: bool
    ) -> Plan:
        with _arguments():
            payloads = self._payloads(args, kwargs.values())
            request = m.forward_request(name, args, kwargs, payloads, requires_grad, grad_enabled)
        return Plan("forward", request, payloads, lambda r, inc: m.forwarded(r, args, inc))

    def backward(self, step: m.BackwardStep, *, by_handle: bool) -> Plan:
        with _arguments():
            if by_handle:
                payloads = self._payloads(step.grad_outputs)
                request = m.backward_by_handle(step, payloads)
            else:
                payloads = self._payloads(step.inputs, step.grad_outputs)
                request = m.backward_by_recompute(step, payloads)
        return Plan("backward", request, payloads, lambda r, inc: m.backward_reply(r, step.inputs, inc))

    def _payloads(self, *groups: Sequence[Any]) -> list[torch.Tensor] | None:
        if self.shared_memory is not None and self.shared_memory.wants(groups):
            return []  # streamed form: prepare() moves the large tensors into a segment
        return m.payload_list(self.stream_threshold_bytes, *groups)


class _arguments:
    """Arguments that cannot be encoded become :class:`ArgumentError` (a GradServeError), before anything is sent."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, codec.CodecError):
            raise ArgumentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT") from None


REPLY_ERRORS = (codec.CodecError, RuntimeError, MemoryError, IndexError, AttributeError)
"""What decoding a reply raises when the reply breaks the contract (bad framing, absurd shapes,
missing parts); the faces turn these into :func:`malformed_reply`."""


def malformed_reply(exc: Exception) -> InternalError:
    """A reply the client cannot decode (or allocate): the server broke the contract."""
    what = str(exc) if isinstance(exc, codec.CodecError) else f"{type(exc).__name__}: {exc}"
    return InternalError(grpc.StatusCode.INTERNAL, f"malformed reply from the server: {what[:500]}", "MALFORMED_REPLY")


def _tls_hint(message: str, settings: ChannelSettings) -> str:
    """What probably went wrong when a connection fails the way a TLS mismatch makes it fail."""
    text = message.lower()
    closed = any(s in text for s in ("socket closed", "connection reset", "end of tcp stream", "broken pipe"))
    if not settings.secure:
        return "the server may use TLS: pass tls=True, or root_certificates= for a private CA" if closed else ""
    if not (closed or any(s in text for s in ("ssl", "handshake", "tls", "certificate"))):
        return ""
    if "certificate_verify_failed" in text or "hostname" in text:
        return "TLS: the server's certificate is not signed by root_certificates, or is not for this target's name"
    causes = ["the server may not use TLS", "its certificate may not be signed by root_certificates"]
    if settings.private_key is None:
        causes.insert(0, "the server may require a client certificate (private_key= and certificate_chain=)")
    return "TLS handshake failed: " + "; ".join(causes)


def release(plan: Plan) -> None:
    """Free what a call held once it ended: its request's shared-memory segment."""
    _shm.done(plan)
