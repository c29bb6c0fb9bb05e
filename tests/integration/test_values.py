"""Outputs and gradients through a real server: seed values by hand, and remote vs local autograd."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import GradientClient
from gradserve.server import examples

from .conftest import SERVICE, Endpoint

F64 = torch.float64


def test_health_reports_serving_without_a_token(endpoint: Endpoint) -> None:
    channel = endpoint.channel(token="")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    finally:
        channel.close()


def test_lists_the_built_in_examples(client: GradientClient) -> None:
    functions = {f.name: f for f in client.list_functions()}
    assert {"square", "cube_plus_square", "softplus", "logsumexp", "linear", "max_with_index", "scale"} <= set(functions)
    assert functions["cube_plus_square"].num_inputs == 2


def test_square_at_one(client: GradientClient) -> None:
    result = client.forward_backward("square", torch.tensor(1.0, requires_grad=True))
    assert result.outputs.item() == 1.0
    assert [g.item() for g in result.grads] == [2.0]

    x = torch.tensor(1.0, requires_grad=True)
    y = client.function("square")(x)  # the remote step joins this graph
    y.backward()
    assert (y.item(), x.grad.item()) == (1.0, 2.0)


def test_cube_plus_square_at_two_three(client: GradientClient) -> None:
    x, y = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    result = client.forward_backward("cube_plus_square", x, y)
    assert result.outputs.item() == 17.0
    assert [g.item() for g in result.grads] == [12.0, 6.0]

    f = client.function("cube_plus_square")(x, y)
    f.backward()
    assert (f.item(), x.grad.item(), y.grad.item()) == (17.0, 12.0, 6.0)


def test_gradients_keep_dtype_and_absent_ones_are_none(client: GradientClient) -> None:
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    result = client.forward_backward("scale", x, 2.5)
    assert result.outputs.dtype == F64 and result.outputs.tolist() == [2.5, -5.0, 1.25]
    grad, k_grad = result.grads
    assert grad.dtype == F64 and grad.tolist() == [2.5, 2.5, 2.5]
    assert k_grad is None  # a float argument has no gradient, and it is not sent as zeros


def _rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=F64) * scale).requires_grad_()


# name -> (local callable, inputs); the local one runs the same Function without a server.
CASES: dict[str, tuple[Callable[..., Any], Callable[[], tuple[Any, ...]]]] = {
    "softplus": (examples.Softplus.apply, lambda: (_rand(7, scale=30),)),
    "logsumexp": (examples.LogSumExp.apply, lambda: (_rand(3, 5),)),
    "linear": (examples.Linear.apply, lambda: (_rand(4, 3), _rand(2, 3), _rand(2))),
    "max_with_index": (examples.MaxWithIndex.apply, lambda: (_rand(3, 5),)),
    "straight_through_sign": (examples.StraightThroughSign.apply, lambda: (_rand(6),)),
    "scale": (examples.scale, lambda: (_rand(4), -1.5)),
}


def _local(name: str, args: tuple[Any, ...], grad_outputs: list[torch.Tensor | None]) -> tuple[Any, list[Any]]:
    fn = CASES[name][0]
    local_args = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*local_args)
    outs = out if isinstance(out, tuple) else (out,)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return out, [a.grad if isinstance(a, torch.Tensor) else None for a in local_args]


def _grad_outputs_for(name: str, args: tuple[Any, ...]) -> list[torch.Tensor | None]:
    with torch.no_grad():
        out = CASES[name][0](*args)
    outs = out if isinstance(out, tuple) else (out,)
    return [torch.randn_like(o) if o.is_floating_point() else None for o in outs]


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_backward_matches_local_autograd(client: GradientClient, name: str) -> None:
    torch.manual_seed(sum(map(ord, name)))
    args = CASES[name][1]()
    grad_outputs = _grad_outputs_for(name, args)
    remote = client.forward_backward(name, *args, grad_outputs=grad_outputs if len(grad_outputs) > 1 else grad_outputs[0])
    local_out, local_grads = _local(name, args, grad_outputs)
    torch.testing.assert_close(remote.outputs, local_out if not isinstance(local_out, tuple) else tuple(local_out))
    assert len(remote.grads) == len(local_grads)
    for r, expected in zip(remote.grads, local_grads):
        if expected is None:
            assert r is None
        else:
            torch.testing.assert_close(r, expected)


@pytest.mark.parametrize("name", ["logsumexp", "linear", "softplus"])
def test_remote_step_in_a_local_graph_matches_local_autograd(client: GradientClient, name: str) -> None:
    torch.manual_seed(7 + len(name))
    args = CASES[name][1]()
    weight = torch.randn_like(CASES[name][0](*args).detach())

    remote_loss = (client.function(name)(*args) * weight).sum().tanh()
    remote_loss.backward()
    remote_grads = [a.grad.clone() for a in args]

    local_args = [a.detach().clone().requires_grad_() for a in args]
    local_loss = (CASES[name][0](*local_args) * weight).sum().tanh()
    local_loss.backward()

    torch.testing.assert_close(remote_loss.detach(), local_loss.detach())
    for r, a in zip(remote_grads, local_args):
        torch.testing.assert_close(r, a.grad)


def test_user_function_from_the_functions_folder(client: GradientClient) -> None:
    """functions/my_functions.py's swish, as compose mounts it (the local server loads it too)."""
    if "swish" not in {f.name for f in client.list_functions()}:
        pytest.skip("this server does not serve functions/my_functions.py (GRADSERVE_FUNCTIONS without my_functions)")
    result = client.forward_backward("swish", torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True))
    s1 = 1 / (1 + torch.exp(torch.tensor(-1.0, dtype=F64)))
    torch.testing.assert_close(result.outputs, torch.stack([torch.tensor(0.0, dtype=F64), s1]))
    torch.testing.assert_close(result.grads[0], torch.stack([torch.tensor(0.5, dtype=F64), s1 + s1 * (1 - s1)]))

    x = torch.randn(5, dtype=F64, requires_grad=True)
    client.function("swish")(x).sum().backward()
    local = x.detach().clone().requires_grad_()
    (local * torch.sigmoid(local)).sum().backward()
    torch.testing.assert_close(x.grad, local.grad)
