"""The handle store: forward graphs kept for a later backward, bounded by count, bytes and lifetime."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from gradserve.v1 import codec

from ._errors import HandleNotFound
from ._registry import RegisteredFunction

__all__ = ["Graph", "HandleStore"]

log = logging.getLogger(__name__)


@dataclass
class Graph:
    """One kept graph: its inputs (leaves on the device) and the outputs that hold the autograd graph.

    For a forward (``order`` 0) the inputs are the arguments, positional then keyword,
    and the outputs the Function's. For a backward of order k kept for the next order
    (``create_graph=True``), the inputs are those of order k-1 followed by its
    cotangents, and the outputs are the gradients (None where there is none).

    ``nbytes`` counts the tensors of the inputs and outputs, in bytes: a lower bound of
    what the graph holds (tensors a Function saves internally are not visible).
    """

    function: RegisteredFunction
    inputs: list[Any]
    outputs: tuple[torch.Tensor | None, ...]
    order: int = 0
    nbytes: int = field(init=False)
    expires_at: float = 0.0
    owner: str = ""

    def __post_init__(self) -> None:
        self.nbytes = sum(codec.nbytes(t) for t in [*self.inputs, *self.outputs])


class HandleStore:
    """Kept graphs by handle. Thread-safe.

    Parameters
    ----------
    max_handles
        Most graphs kept; beyond it the least recently used is evicted.
    max_bytes
        Most bytes kept (sum of ``Graph.nbytes``); beyond it the least recently used
        graphs are evicted. A single graph over the cap is not kept at all.
    ttl_s
        Seconds a graph lives without a backward: a graph kept at time t is gone from
        t + ttl_s on (alive at any earlier instant).
    clock
        Seconds from a monotonic clock; :func:`time.monotonic` unless a test injects (or sets ``clock`` to) another.
    """

    def __init__(self, max_handles: int, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_handles = max_handles
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self.evictions = 0  # evicted for count or bytes, or expired
        self._graphs: OrderedDict[str, Graph] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def fits(self, graph: Graph) -> bool:
        """Whether :meth:`put` would keep ``graph`` (it is not alone over ``max_bytes``)."""
        if graph.nbytes > self.max_bytes:
            log.info(
                "not keeping a %d-byte graph of %s: over --max-handle-bytes=%d", graph.nbytes, graph.function.name, self.max_bytes
            )
            return False
        return True

    @staticmethod
    def new_handle() -> str:
        """A fresh, unguessable handle."""
        return secrets.token_urlsafe(18)

    def put(self, graph: Graph, owner: str = "", handle: str | None = None) -> str | None:
        """Keep ``graph`` for ``owner`` under ``handle`` (a new one if None).

        Returns the handle, or None when the graph alone is over ``max_bytes``.
        """
        if not self.fits(graph):
            return None
        handle = handle or self.new_handle()
        graph.owner = owner
        graph.expires_at = self.clock() + self.ttl_s
        with self._lock:
            self._expire_locked()
            self._graphs[handle] = graph
            self._bytes += graph.nbytes
            while len(self._graphs) > self.max_handles or self._bytes > self.max_bytes:
                evicted, old = self._graphs.popitem(last=False)
                self._bytes -= old.nbytes
                self.evictions += 1
                log.info("evicted graph handle %s… of %s (least recently used)", evicted[:6], old.function.name)
        return handle

    def take(self, handle: str, owner: str = "") -> Graph:
        """Remove and return ``owner``'s graph under ``handle``; raises :class:`HandleNotFound`.

        Another owner's handle is not found, exactly like an unknown one, and stays
        intact for its owner.
        """
        with self._lock:
            self._expire_locked()
            graph = self._graphs.get(handle)
            if graph is not None and graph.owner == owner:
                del self._graphs[handle]
            else:
                raise HandleNotFound(
                    f"graph handle {handle[:6]!r}… is unknown, expired, evicted or already used; "
                    "send the arguments again to recompute"
                )
            self._bytes -= graph.nbytes
            return graph

    def restore(self, handle: str, graph: Graph) -> None:
        """Put back a graph :meth:`take` removed (the backward failed), for the same owner."""
        with self._lock:
            if handle in self._graphs:
                return
            self._graphs[handle] = graph
            self._bytes += graph.nbytes

    def release(self, handles: Iterable[str], owner: str = "") -> int:
        """Forget these handles of ``owner``; returns how many were still held (another owner's are left alone)."""
        released = 0
        with self._lock:
            for handle in handles:
                graph = self._graphs.get(handle)
                if graph is not None and graph.owner == owner:
                    del self._graphs[handle]
                    self._bytes -= graph.nbytes
                    released += 1
        return released

    def stats(self) -> tuple[int, int]:
        """(entries, bytes) held now, after dropping expired graphs."""
        with self._lock:
            self._expire_locked()
            return len(self._graphs), self._bytes

    def __len__(self) -> int:
        return self.stats()[0]

    def _expire_locked(self) -> None:
        now = self.clock()
        expired = [h for h, g in self._graphs.items() if g.expires_at <= now]
        for h in expired:
            self._bytes -= self._graphs.pop(h).nbytes
            self.evictions += 1
