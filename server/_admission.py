"""Admission before work: how many calls run at once, how many bytes are in flight, idle streams.

Three small, independent pieces the server assembles:

- :class:`ConcurrencyLimit`, a server interceptor: at most ``max_calls`` calls in
  progress; the next gets RESOURCE_EXHAUSTED at once. Health checks and ListFunctions
  have ``reserved_calls`` slots of their own, so they answer while the rest is full. It
  also wraps every request stream in an :class:`IdleWatchdog` timer.
- :class:`ByteBudget`: bytes of requests being received and replies being built, over
  all calls; a call that does not fit waits (first come, first served) up to its
  deadline.
- :class:`IdleWatchdog`: cancels a stream whose caller sends nothing for
  ``idle_timeout_s`` while the server waits for it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from ._auth import deny_handler
from ._errors import Abandoned, ResourceExhausted
from ._logging import RateLimitedLog

__all__ = ["AdmissionExecutor", "ByteBudget", "ConcurrencyLimit", "IdleWatchdog", "Reservation"]

log = logging.getLogger(__name__)

# A call without a deadline waits at most this long for room in the byte budget.
MAX_ADMISSION_WAIT_S = 60.0


class AdmissionExecutor(futures.ThreadPoolExecutor):
    """The server's thread pool; frees a :class:`ConcurrencyLimit` slot when the call's task ends.

    gRPC runs each call as one task of this pool, submitted on its polling thread right
    after the interceptors chose the handler. The slot is freed when that task ends
    however it ends (including a unary call cancelled before its request arrived, when
    no handler code runs), exactly as gRPC's own ``maximum_concurrent_rpcs`` count is.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._pending = threading.local()

    def hold(self, release: Callable[[], None]) -> None:
        """Attach ``release`` to the next task submitted from this thread (the admitted call's)."""
        stale = getattr(self._pending, "release", None)
        if stale is not None:  # never submitted (not expected): free it rather than leak it
            stale()
        self._pending.release = release

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        release = getattr(self._pending, "release", None)
        self._pending.release = None
        future = super().submit(fn, *args, **kwargs)
        if release is not None:
            future.add_done_callback(lambda _f: release())
        return future


class IdleWatchdog:
    """Cancels streams whose caller has sent nothing for ``idle_timeout_s`` while the server waits for it.

    One thread for all streams. Time the server spends working between two messages
    does not count, only time spent waiting for the next one.
    """

    def __init__(self, idle_timeout_s: float, on_cancel: Callable[[], None] | None = None) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._on_cancel = on_cancel
        self._streams: set[_WatchedStream] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._log = RateLimitedLog(log, per_s=1.0, burst=5)
        self._thread = threading.Thread(target=self._run, name="gradserve-idle-watchdog", daemon=True)
        self._thread.start()

    def watch(self, requests: Iterator[Any], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
        """``requests``, watched until exhausted or the call ends."""
        stream = _WatchedStream(requests, context, method, self)
        with self._lock:
            self._streams.add(stream)
        context.add_callback(lambda: self._forget(stream))
        return stream

    def stop(self) -> None:
        self._stopped.set()

    def _forget(self, stream: _WatchedStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def _run(self) -> None:
        period_s = min(0.25, self.idle_timeout_s / 4)
        while not self._stopped.wait(period_s):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._streams if s.waiting_since is not None and now - s.waiting_since > self.idle_timeout_s]
                for s in idle:
                    self._streams.discard(s)
            for s in idle:
                s.timed_out = True
                self._log.log(
                    logging.WARNING,
                    "cancelled %s from %s: no message for %.1f s (--idle-stream-timeout-s)",
                    s.method,
                    s.context.peer(),
                    self.idle_timeout_s,
                )
                if self._on_cancel is not None:
                    self._on_cancel()
                s.context.cancel()


class _WatchedStream:
    def __init__(self, requests: Iterator[Any], context: grpc.ServicerContext, method: str, watchdog: IdleWatchdog) -> None:
        self._requests = requests
        self.context = context
        self.method = method
        self.timed_out = False
        self.waiting_since: float | None = None

    def __iter__(self) -> _WatchedStream:
        return self

    def __next__(self) -> Any:
        self.waiting_since = time.monotonic()
        try:
            return next(self._requests)
        finally:
            self.waiting_since = None


class ConcurrencyLimit(grpc.ServerInterceptor):
    """At most ``max_calls`` calls in progress, plus ``reserved_calls`` for ``reserved_methods``.

    Decided on gRPC's polling thread before any thread or memory is given to the call:
    a call over the limit gets RESOURCE_EXHAUSTED at once. Must be the last interceptor
    (the one nearest the handlers), and the server must run on ``executor``.

    Parameters
    ----------
    executor
        The server's thread pool; needs ``max_calls + reserved_calls`` threads, plus a
        few for refusals.
    max_calls
        Calls of any method at once.
    reserved_methods, reserved_calls
        Full method paths that may also use ``reserved_calls`` slots of their own when
        the others are taken (health checks, ListFunctions: quick, and what operators
        and balancers need to see).
    watchdog
        Wraps every request stream (None: none).
    on_refused
        Called with the method path of each refused call.
    """

    def __init__(
        self,
        executor: AdmissionExecutor,
        max_calls: int,
        *,
        reserved_methods: frozenset[str] = frozenset(),
        reserved_calls: int = 0,
        watchdog: IdleWatchdog | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._executor = executor
        self.max_calls = max_calls
        self._reserved_methods = reserved_methods
        self._reserved_calls = reserved_calls
        self._watchdog = watchdog
        self._on_refused = on_refused
        self._lock = threading.Lock()
        self.active = 0
        self.reserved_active = 0
        self._log = RateLimitedLog(log, per_s=1.0, burst=5)

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        with self._lock:
            if self.active < self.max_calls:
                self.active += 1
                release = self._release_main
            elif details.method in self._reserved_methods and self.reserved_active < self._reserved_calls:
                self.reserved_active += 1
                release = self._release_reserved
            else:
                release = None
        if release is None:
            if self._on_refused is not None:
                self._on_refused(details.method)
            self._log.log(logging.WARNING, "refused a call: %d calls in progress (--max-concurrent-rpcs)", self.max_calls)
            return deny_handler(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self.max_calls} calls in progress (--max-concurrent-rpcs); retry with backoff",
            )
        self._executor.hold(release)
        if self._watchdog is not None and handler.request_streaming:
            return _watch_requests(handler, self._watchdog, details.method)
        return handler

    def in_progress(self) -> int:
        """Calls admitted and not yet finished."""
        with self._lock:
            return self.active + self.reserved_active

    def _release_main(self) -> None:
        with self._lock:
            self.active -= 1

    def _release_reserved(self) -> None:
        with self._lock:
            self.reserved_active -= 1


def _watch_requests(handler: Any, watchdog: IdleWatchdog, method: str) -> Any:
    kind = "stream_stream" if handler.response_streaming else "stream_unary"
    behavior = getattr(handler, kind)

    def watched(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return behavior(watchdog.watch(requests, context, method), context)

    return handler._replace(**{kind: watched})


class Reservation:
    """Bytes one call holds in a :class:`ByteBudget`; :meth:`release` when the call ends (idempotent)."""

    def __init__(self, budget: ByteBudget, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def grow_to(self, nbytes: int) -> None:
        """Hold at least ``nbytes`` from now on, without waiting (the bytes already exist; waiting could deadlock)."""
        if nbytes > self.nbytes:
            self._budget._add(nbytes - self.nbytes)
            self.nbytes = nbytes

    def release(self) -> None:
        if self.nbytes:
            self._budget._add(-self.nbytes)
            self.nbytes = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ByteBudget:
    """Bytes in flight over all calls, at most ``limit_bytes`` (0: no limit). Thread-safe, first come first served."""

    def __init__(
        self,
        limit_bytes: int,
        on_change: Callable[[int], None] | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self.limit_bytes = limit_bytes
        self.used = 0
        self._on_change = on_change
        self._on_refused = on_refused
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    def acquire(
        self, nbytes: int, *, what: str, timeout_s: float | None, is_active: Callable[[], bool] = lambda: True
    ) -> Reservation:
        """Reserve ``nbytes``, waiting up to ``timeout_s`` (None: :data:`MAX_ADMISSION_WAIT_S`) for room.

        Raises
        ------
        ResourceExhausted
            ``nbytes`` alone is over the limit, or no room came in time.
        Abandoned
            The caller left while waiting.
        """
        if not self.limit_bytes:
            self._add(nbytes)
            return Reservation(self, nbytes)
        if nbytes > self.limit_bytes:
            self._refused()
            raise ResourceExhausted(
                f"{what}: {nbytes} bytes in flight, over the server's --max-inflight-bytes of {self.limit_bytes} bytes"
            )
        deadline = time.monotonic() + (MAX_ADMISSION_WAIT_S if timeout_s is None else max(0.0, timeout_s))
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while not (self._queue[0] is ticket and self.used + nbytes <= self.limit_bytes):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._refused()
                        raise ResourceExhausted(
                            f"{what}: no room for {nbytes} bytes within the deadline: {self.used} of "
                            f"--max-inflight-bytes {self.limit_bytes} bytes are in flight; retry with backoff"
                        )
                    if not is_active():
                        raise Abandoned(f"{what}: caller gone while waiting for memory; work abandoned")
                    self._cond.wait(min(left, 0.1))
                self.used += nbytes
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
        if self._on_change is not None:
            self._on_change(self.used)
        return Reservation(self, nbytes)

    def _add(self, delta: int) -> None:
        with self._cond:
            self.used += delta
            if delta < 0:
                self._cond.notify_all()
            used = self.used
        if self._on_change is not None:
            self._on_change(used)

    def _refused(self) -> None:
        if self._on_refused is not None:
            self._on_refused()
