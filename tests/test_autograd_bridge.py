"""The client's autograd bridge, step by step: what each backward sends, against local autograd.

A spy on the client's three calls into the bridge (forward keeping a graph, backward,
release) records each step; the gradients are compared with local torch on
cotangents that are not all ones, so a dropped, reordered or zero-filled grad_output shows.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from gradserve.client import ArgumentError, GradientClient
from gradserve.server import RunningServer, ServerConfig, create_server, registry


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = create_server(ServerConfig(port=0, device="cpu", max_workers=4), registry)
    yield running
    running.stop(0)


class Spy:
    """Records the bridge's calls on a client and passes them on."""

    def __init__(self, client: GradientClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self.forwards: list[tuple[Any, ...]] = []
        self.steps: list[Any] = []
        self.released: list[str] = []
        self.handles: list[str] = []
        self.timeouts: list[Any] = []
        forward_keep, backward, release = client._forward_keep, client._backward, client._release

        def spy_forward(name: str, args: Any, kwargs: Any, requires_grad: Any, grad_enabled: bool, timeout: Any) -> Any:
            self.forwards.append((name, list(requires_grad), grad_enabled, dict(kwargs)))
            self.timeouts.append(timeout)
            result = forward_keep(name, args, kwargs, requires_grad, grad_enabled, timeout)
            self.handles.append(result.handle)
            return result

        def spy_backward(step: Any, timeout: Any) -> Any:
            self.steps.append(step)
            self.timeouts.append(timeout)
            reply = backward(step, timeout)
            self.handles.append(reply.handle)
            return reply

        def spy_release(handle: str) -> None:
            self.released.append(handle)
            release(handle)

        monkeypatch.setattr(client, "_forward_keep", spy_forward)
        monkeypatch.setattr(client, "_backward", spy_backward)
        monkeypatch.setattr(client, "_release", spy_release)


@pytest.fixture
def spy(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[GradientClient, Spy]]:
    with GradientClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        yield client, Spy(client, monkeypatch)


def leaf(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_first_order_sends_the_handle_and_the_cotangent(spy: tuple[GradientClient, Spy]) -> None:
    client, s = spy
    x = leaf(1.0, -2.0, 3.0)
    y = client.function("square")(x)
    assert s.forwards == [("square", [True], True, {})]
    handle = s.handles[0]
    assert handle
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    y.backward(g)
    assert x.grad.tolist() == [1.0, 4.0, 12.0]  # 2 x g
    (step,) = s.steps
    assert (step.name, step.handle, step.keep_graph, step.levels, step.built) == ("square", handle, False, (), [True])
    assert step.grad_output_leaves == [False] and torch.equal(step.grad_outputs[0], g)
    assert torch.equal(step.inputs[0], x) and step.num_positional == 1 and step.kwarg_names == ()
    gc.collect()
    assert s.released == []  # the backward consumed the handle: nothing to release


def test_a_second_backward_recomputes_without_the_used_handle(spy: tuple[GradientClient, Spy]) -> None:
    client, s = spy
    x = leaf(2.0)
    y = client.function("square")(x)
    y.backward(torch.tensor([1.0], dtype=torch.float64), retain_graph=True)
    y.backward(torch.tensor([3.0], dtype=torch.float64))
    assert x.grad.tolist() == [4.0 + 12.0]
    assert [step.handle for step in s.steps] == [s.handles[0], ""]
    assert s.steps[0].version == s.steps[1].version == registry.get("square").version


def test_an_unused_node_releases_its_handle(spy: tuple[GradientClient, Spy]) -> None:
    client, s = spy
    y = client.function("square")(leaf(1.0))
    handle = s.handles[0]
    del y
    gc.collect()
    assert s.released == [handle]


def test_no_grad_and_non_tensor_arguments_reach_the_server_as_given(spy: tuple[GradientClient, Spy]) -> None:
    client, s = spy
    with torch.no_grad():
        out = client.function("scale")(leaf(1.0, 2.0), 3.0)
    assert out.tolist() == [3.0, 6.0] and not out.requires_grad
    assert s.forwards == [("scale", [True, False], False, {})]  # grad mode off: the server builds no graph
    x = leaf(1.0, 2.0)
    out = client.function("scale")(x, 3.0)
    out.backward(torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert x.grad.tolist() == [3.0, -3.0]
    assert s.forwards[1] == ("scale", [True, False], True, {})
    step = s.steps[0]
    assert step.inputs[1] == 3.0 and step.built == [True, False]


def test_keyword_arguments_travel_by_name(spy: tuple[GradientClient, Spy]) -> None:
    client, s = spy
    x = leaf(1.0, 2.0)
    out = client.function("scale")(x, k=4.0)
    assert s.forwards == [("scale", [True, False], True, {"k": 4.0})]
    out.sum().backward()
    assert x.grad.tolist() == [4.0, 4.0]
    assert s.steps[0].num_positional == 1 and s.steps[0].kwarg_names == ("k",)


def test_outputs_without_a_gradient_are_marked_and_get_none(spy: tuple[GradientClient, Spy]) -> None:
    client, s = spy
    x = leaf(1.0, 5.0, 2.0)
    values, index = client.function("max_with_index")(x)
    assert not index.requires_grad and values.requires_grad
    values.backward(torch.tensor(2.0, dtype=torch.float64))
    assert x.grad.tolist() == [0.0, 2.0, 0.0]
    assert s.steps[0].grad_outputs[1] is None  # no zeros sent for the integer output


def test_second_order_records_a_remote_gradient_node(spy: tuple[GradientClient, Spy]) -> None:
    client, s = spy
    x = leaf(1.5, -0.5)
    y = client.function("square")(x)
    g = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(y, x, g, create_graph=True)
    assert dx.tolist() == [6.0, -3.0] and dx.requires_grad  # 2 x g
    first = s.steps[0]
    assert (first.keep_graph, first.grad_output_leaves, first.levels, first.handle) == (True, [True], (), s.handles[0])
    second_handle = s.handles[1]
    assert second_handle
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    dxx, dg = torch.autograd.grad(dx, (x, g), w)
    assert dxx.tolist() == [4.0, -12.0] and dg.tolist() == [3.0, 2.0]  # 2 g w and 2 x w
    second = s.steps[1]
    assert (second.handle, second.levels, second.built, second.keep_graph) == (second_handle, (1,), [True, True], False)
    assert torch.equal(second.grad_outputs[0], w)


def test_a_cotangent_that_needs_no_grad_is_not_a_leaf(spy: tuple[GradientClient, Spy]) -> None:
    client, s = spy
    x = leaf(2.0)
    y = client.function("square")(x)
    (dx,) = torch.autograd.grad(y, x, torch.tensor([1.0], dtype=torch.float64), create_graph=True)
    assert s.steps[0].grad_output_leaves == [False] and s.steps[0].keep_graph is True
    (dxx,) = torch.autograd.grad(dx, x)
    assert dxx.tolist() == [2.0]
    assert s.steps[1].built == [True, False]


def test_vmap_is_refused_with_the_reason(spy: tuple[GradientClient, Spy]) -> None:
    client, _ = spy
    f = client.function("square")
    message = (
        "square: a remote gradserve step cannot run under torch.func transforms (vmap, "
        "jacobian/hessian(vectorize=True), grad(is_grads_batched=True)); use vectorize=False"
    )
    with pytest.raises(ArgumentError, match="^INVALID_ARGUMENT: " + re.escape(message) + "$") as err:
        torch.func.vmap(f)(torch.ones(2, 3))
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    with pytest.raises(ArgumentError, match="^INVALID_ARGUMENT: " + re.escape(message) + "$"):
        torch.autograd.functional.jacobian(f, leaf(1.0, 2.0), vectorize=True)


def test_a_batched_backward_is_refused_by_the_backward(spy: tuple[GradientClient, Spy]) -> None:
    client, _ = spy
    x = leaf(1.0, 2.0)
    y = client.function("square")(x)  # a plain forward, then a batched backward
    message = (
        "square: a remote gradserve step cannot run under torch.func transforms (vmap, "
        "jacobian/hessian(vectorize=True), grad(is_grads_batched=True)); use vectorize=False"
    )
    with pytest.raises(ArgumentError, match="^INVALID_ARGUMENT: " + re.escape(message) + "$"):
        torch.autograd.grad(y, x, torch.eye(2, dtype=torch.float64), is_grads_batched=True)


def test_every_call_of_a_node_carries_the_functions_timeout(spy: tuple[GradientClient, Spy]) -> None:
    client, s = spy
    x = leaf(1.0)
    y = client.function("square", timeout=7.5)(x)
    (dx,) = torch.autograd.grad(y, x, torch.ones(1, dtype=torch.float64), create_graph=True)
    dx.backward()
    assert x.grad.tolist() == [2.0]
    assert s.timeouts == [7.5, 7.5, 7.5]  # forward, backward kept for the next order, second order
