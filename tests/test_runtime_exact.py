"""Runtime, exactly: device choice, deferred keeps, and recomputes (keyword arguments, replayed
randomness, higher orders, refused replays) against hand-computed gradients."""

from __future__ import annotations

import re

import pytest
import torch

from gradserve.server import Runtime, registry, resolve_device
from gradserve.server._errors import RngMismatch
from gradserve.server._runtime import RngReplay


def x64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(registry, "cpu", max_handles=4, handle_ttl_s=60)


def test_device_choice_with_and_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("auto") == torch.device("cpu") or torch.cuda.is_available()
    with pytest.raises(ValueError, match=re.escape("--device must be auto, cpu, cuda or cuda:N, got 'mps'") + "$"):
        resolve_device("mps")
    with pytest.raises(ValueError, match=re.escape("--device must be auto, cpu, cuda or cuda:N, got 'gpu'") + "$"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=re.escape("--device cuda:2: only 2 CUDA device(s) visible") + "$"):
        resolve_device("cuda:2")


def test_a_deferred_graph_is_kept_only_by_keep(runtime: Runtime) -> None:
    x = x64(3.0)
    result = runtime.forward("square", [x], keep_graph=True, defer_keep=True)
    assert result.handle and len(runtime.handles) == 0
    runtime.keep(result)
    assert len(runtime.handles) == 1
    assert runtime.backward("square", handle=result.handle).grads[0].tolist() == [6.0]
    kept = runtime.forward("square", [x], keep_graph=True)  # kept at once: keep() has nothing to do
    runtime.keep(kept)
    assert len(runtime.handles) == 1


def test_recompute_uses_the_keyword_arguments(runtime: Runtime) -> None:
    x = x64(1.0, 2.0)
    g = torch.tensor([1.0, -2.0], dtype=torch.float64)
    grads = runtime.backward("scale", args=[x], kwargs={"k": 3.0}, grad_outputs=[g]).grads
    assert grads[0].tolist() == [3.0, -6.0]


def test_recompute_replays_the_forwards_random_numbers(runtime: Runtime) -> None:
    x = x64(*([1.0] * 64))
    forward = runtime.forward("dropout", [x], keep_graph=True)
    by_handle = runtime.backward("dropout", handle=forward.handle).grads[0]
    for _ in range(3):  # other draws between forward and recompute must not matter
        torch.rand(10)
        again = runtime.backward("dropout", args=[x], rng=forward.rng).grads[0]
        assert torch.equal(again, by_handle)
    assert 0 < int((by_handle == 0).sum()) < 64


def test_a_replay_from_another_device_or_torch_is_refused(runtime: Runtime) -> None:
    x = x64(1.0)
    tail = (
        f"this server runs on cpu with torch {torch.__version__} and cannot draw the same numbers again. "
        "Run the forward again, or send the backward to a server like the one that ran it"
    )
    other_device = RngReplay(seed=1, device_type="cuda-but-longer-than-16", torch_version=torch.__version__)
    message = f"dropout: the forward drew random numbers on 'cuda-but-longer-' with torch {torch.__version__!r}; {tail}"
    with pytest.raises(RngMismatch, match="^" + re.escape(message) + "$"):
        runtime.backward("dropout", args=[x], rng=other_device)
    other_torch = RngReplay(seed=1, device_type="cpu", torch_version="9" * 40)
    message = f"dropout: the forward drew random numbers on 'cpu' with torch {'9' * 32!r}; {tail}"
    with pytest.raises(RngMismatch, match="^" + re.escape(message) + "$"):
        runtime.backward("dropout", args=[x], rng=other_torch)
    same = RngReplay(seed=1, device_type="cpu", torch_version=torch.__version__)
    assert runtime.backward("dropout", args=[x], rng=same).grads[0].shape == (1,)


def test_second_order_by_recompute_matches_hand_computed_values(runtime: Runtime) -> None:
    # y = x^2; first order d = 2 x g; the backward of d with cotangent w gives
    # d/dx = 2 g w and d/dg = 2 x w.
    x = x64(1.5, -2.0)
    g = torch.tensor([3.0, 0.5], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 4.0], dtype=torch.float64)
    grads = runtime.backward("square", args=[x], lower_order=[[g]], grad_outputs=[w]).grads
    assert [t.tolist() for t in grads] == [[6.0, 4.0], [3.0, -16.0]]
    by_handle = runtime.backward(
        "square", handle=runtime.forward("square", [x], keep_graph=True).handle, grad_outputs=[g], keep_graph=True
    )
    again = runtime.backward("square", handle=by_handle.handle, grad_outputs=[w]).grads
    assert [t.tolist() for t in again] == [[6.0, 4.0], [3.0, -16.0]]
