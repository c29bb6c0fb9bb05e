"""The handle store on its own: count and byte caps at N and N+1, owners, restore, release, and TTL on a fake clock."""

from __future__ import annotations

import re

import pytest
import torch

import gradserve.server.examples  # noqa: F401  (registers the examples)
from gradserve.server import registry
from gradserve.server._errors import HandleNotFound
from gradserve.server._handles import Graph, HandleStore


class Clock:
    """``time.monotonic`` for the store, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def graph(n: int = 4) -> Graph:
    """A graph of ``n`` float32 inputs and ``n`` outputs: 8 n bytes."""
    return Graph(registry.get("square"), [torch.ones(n)], (torch.ones(n),))


def test_graph_bytes_count_inputs_and_outputs() -> None:
    assert graph(4).nbytes == 32
    assert Graph(registry.get("square"), [torch.ones(2), 3.0], (None, torch.ones(1, dtype=torch.float64))).nbytes == 16


def test_count_cap_at_n_and_n_plus_one_evicts_the_least_recently_used(clock: Clock) -> None:
    store = HandleStore(max_handles=2, max_bytes=10**6, ttl_s=60, clock=clock.monotonic)
    a, b = store.put(graph(), handle="a"), store.put(graph(), handle="b")
    assert (a, b) == ("a", "b") and store.stats() == (2, 64) and store.evictions == 0
    store.put(graph(), handle="c")
    assert store.stats() == (2, 64) and store.evictions == 1
    with pytest.raises(HandleNotFound):
        store.take("a")
    assert store.take("b").nbytes == 32 and store.stats() == (1, 32)


def test_byte_cap_at_n_and_n_plus_one(clock: Clock) -> None:
    store = HandleStore(max_handles=10, max_bytes=64, ttl_s=60, clock=clock.monotonic)
    assert store.fits(graph(8)) and store.put(graph(8), handle="full") == "full"  # 64 bytes: exactly the cap
    assert not store.fits(graph(9)) and store.put(graph(9)) is None  # 72 bytes alone: never kept
    assert store.stats() == (1, 64) and store.evictions == 0
    store.put(graph(1), handle="small")  # 64 + 8 > 64: the oldest goes
    assert store.stats() == (1, 8) and store.evictions == 1 and len(store) == 1
    store.put(graph(8), handle="full again")  # 8 + 64 > 64: "small" goes
    assert store.stats() == (1, 64) and store.evictions == 2


def test_take_is_once_and_only_for_the_owner(clock: Clock) -> None:
    store = HandleStore(max_handles=4, max_bytes=10**6, ttl_s=60, clock=clock.monotonic)
    kept = graph()
    handle = store.put(kept, owner="alice")
    assert kept.owner == "alice" and kept.expires_at == 1060.0
    message = f"graph handle {handle[:6]!r}… is unknown, expired, evicted or already used; send the arguments again to recompute"
    with pytest.raises(HandleNotFound, match="^" + re.escape(message) + "$"):
        store.take(handle, owner="mallory")
    assert store.stats() == (1, 32)  # left intact for its owner
    assert store.take(handle, owner="alice") is kept and store.stats() == (0, 0)
    with pytest.raises(HandleNotFound):
        store.take(handle, owner="alice")


def test_restore_puts_a_taken_graph_back_once(clock: Clock) -> None:
    store = HandleStore(max_handles=4, max_bytes=10**6, ttl_s=60, clock=clock.monotonic)
    store.put(graph(2), owner="o")
    handle = store.put(graph(), owner="o")
    taken = store.take(handle, owner="o")
    assert store.stats() == (1, 16)
    store.restore(handle, taken)
    assert store.stats() == (2, 48)
    store.restore(handle, taken)  # already there: nothing counted twice
    assert store.stats() == (2, 48)
    assert store.take(handle, owner="o") is taken


def test_release_frees_only_the_owners_handles(clock: Clock) -> None:
    store = HandleStore(max_handles=4, max_bytes=10**6, ttl_s=60, clock=clock.monotonic)
    mine = [store.put(graph(), owner="me") for _ in range(2)]
    theirs = store.put(graph(2), owner="them")
    assert store.release([*mine, theirs, "unknown"], owner="me") == 2
    assert store.stats() == (1, 16)
    assert store.release([theirs], owner="them") == 1 and store.stats() == (0, 0)
    anonymous = store.put(graph())
    assert store.release([anonymous]) == 1 and store.stats() == (0, 0)  # the default owner is the anonymous ""


def test_ttl_expires_at_exactly_the_lifetime(clock: Clock) -> None:
    store = HandleStore(max_handles=4, max_bytes=10**6, ttl_s=10, clock=clock.monotonic)
    handle = store.put(graph())
    clock.now += 9.999
    assert store.stats() == (1, 32)
    clock.now += 0.001
    assert store.stats() == (0, 0) and store.evictions == 1
    store.put(graph())
    store.put(graph())
    clock.now += 10
    assert store.stats() == (0, 0) and store.evictions == 3
    with pytest.raises(HandleNotFound):
        store.take(handle)


def test_new_handles_are_unguessable_and_distinct() -> None:
    handles = {HandleStore.new_handle() for _ in range(100)}
    assert len(handles) == 100 and all(re.fullmatch(r"[A-Za-z0-9_-]{24}", h) for h in handles)
