"""A real server on 127.0.0.1:<ephemeral>: remote gradients equal local autograd, errors map to codes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import (
    FunctionFailedError,
    FunctionNotFoundError,
    GradientClient,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from gradserve.server import RunningServer, ServerConfig, create_server, examples, registry
from gradserve.v1 import codec
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# name -> (local function, argument factory); every built-in example, remote vs local.
CASES: dict[str, tuple[Callable[..., Any], Callable[[torch.dtype], tuple[Any, ...]]]] = {
    "square": (examples.Square.apply, lambda d: (randn(3, 4, dtype=d),)),
    "cube_plus_square": (examples.CubePlusSquare.apply, lambda d: (randn(3, 4, dtype=d), randn(4, seed=1, dtype=d))),
    "straight_through_sign": (examples.StraightThroughSign.apply, lambda d: (randn(6, dtype=d),)),
    "softplus": (examples.Softplus.apply, lambda d: (randn(6, dtype=d) * 50,)),
    "logsumexp": (examples.LogSumExp.apply, lambda d: (randn(3, 5, dtype=d),)),
    "linear": (examples.Linear.apply, lambda d: (randn(4, 3, dtype=d), randn(2, 3, seed=1, dtype=d), randn(2, seed=2, dtype=d))),
    "max_with_index": (examples.MaxWithIndex.apply, lambda d: (randn(3, 5, dtype=d),)),
    "scale": (examples.scale, lambda d: (randn(4, dtype=d), 2.5)),
}


def with_grad(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)


def local_forward_backward(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, list[Any]]:
    args = with_grad(args)
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    diff = [o for o in outs if o.requires_grad]
    torch.autograd.backward(diff, [torch.ones_like(o) for o in diff])
    return out, [a.grad if isinstance(a, torch.Tensor) else None for a in args]


def test_list_functions(client: GradientClient) -> None:
    functions = {f.name: f for f in client.list_functions()}
    assert set(CASES) <= set(functions)
    assert functions["cube_plus_square"].num_inputs == 2
    assert functions["linear"].kind == "autograd.Function" and functions["scale"].kind == "callable"
    assert "x ** 2" in functions["square"].doc


def test_seed_values(client: GradientClient) -> None:
    result = client.forward_backward("square", torch.tensor(1.0, requires_grad=True))
    assert (result.outputs.item(), result.grads[0].item()) == (1.0, 2.0)
    x, y = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    result = client.forward_backward("cube_plus_square", x, y)
    assert [result.outputs.item(), result.grads[0].item(), result.grads[1].item()] == [17.0, 12.0, 6.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_remote_gradients_equal_local_autograd(client: GradientClient, name: str, dtype: torch.dtype) -> None:
    fn, make = CASES[name]
    args = make(dtype)
    expected_out, expected_grads = local_forward_backward(fn, args)
    result = client.forward_backward(name, *with_grad(args))
    if isinstance(expected_out, tuple):
        assert isinstance(result.outputs, tuple) and len(result.outputs) == len(expected_out)
        for got, want in zip(result.outputs, expected_out):
            torch.testing.assert_close(got, want.detach())
    else:
        torch.testing.assert_close(result.outputs, expected_out.detach())
    assert len(result.grads) == len(args)
    for got, want in zip(result.grads, expected_grads):
        if want is None:
            assert got is None
        else:
            assert got.dtype == dtype
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", sorted(CASES))
def test_remote_step_inside_a_local_graph(client: GradientClient, name: str) -> None:
    fn, make = CASES[name]
    args = make(torch.float64)
    local_args, remote_args = with_grad(args), with_grad(args)

    def loss(f: Callable[..., Any], a: tuple[Any, ...]) -> torch.Tensor:
        out = f(*a)
        first = out[0] if isinstance(out, tuple) else out
        return (first * 3).tanh().sum()

    loss(fn, local_args).backward()
    remote_loss = loss(client.function(name), remote_args)
    assert remote_loss.grad_fn is not None
    remote_loss.backward()
    for r, loc in zip(remote_args, local_args):
        if isinstance(loc, torch.Tensor):
            torch.testing.assert_close(r.grad, loc.grad)


def test_square_through_the_network_fills_x_grad(client: GradientClient) -> None:
    x = torch.tensor([1.0, 2.0, -3.0], requires_grad=True)
    loss = (client.function("square")(x) * 3).sum()
    loss.backward()
    assert x.grad.tolist() == [6.0, 12.0, -18.0]


def test_non_differentiable_outputs_do_not_require_grad(client: GradientClient) -> None:
    x = torch.tensor([[1.0, 5.0, 2.0]], requires_grad=True)
    values, indices = client.function("max_with_index")(x)
    assert values.requires_grad and not indices.requires_grad and indices.dtype == torch.int64
    values.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 0.0]]


@pytest.fixture
def one_handle_server() -> Iterator[RunningServer]:
    running = create_server(ServerConfig(port=0, device="cpu", max_handles=1), registry)
    yield running
    running.stop(0)


def test_backward_recomputes_when_the_handle_is_gone(one_handle_server: RunningServer) -> None:
    with GradientClient(f"127.0.0.1:{one_handle_server.port}", timeout=30) as client:
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        y = client.function("square")(x)
        other = client.function("square")(torch.ones(1, requires_grad=True))  # evicts y's graph (--max-handles 1)
        y.backward(torch.tensor([10.0, -3.0]))  # NOT_FOUND by handle, then recomputed; a non-uniform cotangent
        assert x.grad.tolist() == [20.0, -12.0]
        del other


def test_recompute_keeps_each_outputs_cotangent(one_handle_server: RunningServer) -> None:
    """Two outputs, two distinct cotangents, by handle and recomputed: dropping or swapping one shows."""
    with GradientClient(f"127.0.0.1:{one_handle_server.port}", timeout=30) as client:
        for keep in (True, False):  # False: the graph is evicted before backward
            x = torch.tensor([1.0, 2.0], requires_grad=True)
            doubled, plus_one = client.function("two_outputs")(x)  # (2x, x + 1)
            if not keep:
                client.function("square")(torch.ones(1, requires_grad=True))
            torch.autograd.backward([doubled, plus_one], [torch.tensor([1.0, 10.0]), torch.tensor([100.0, 1000.0])])
            assert x.grad.tolist() == [2 * 1.0 + 100.0, 2 * 10.0 + 1000.0]
        result = client.forward_backward(
            "max_with_index",
            torch.tensor([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]], requires_grad=True),
            grad_outputs=[torch.tensor([3.0, -4.0]), None],
        )
        assert result.grads[0].tolist() == [[0.0, 3.0, 0.0], [-4.0, 0.0, 0.0]]


def test_handle_and_recompute_backward_are_bit_identical(server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        args = [
            codec.encode_value(randn(8, 3).requires_grad_()),
            codec.encode_value(randn(5, 3, seed=1).requires_grad_()),
            codec.encode_value(randn(5, seed=2).requires_grad_()),
        ]
        upstream = [codec.encode_maybe_tensor(randn(8, 5, seed=3))]
        fwd = stub.Forward(pb.ForwardRequest(function="linear", args=args, keep_graph=True), timeout=10)
        assert fwd.handle and fwd.handle_ttl_ms > 0
        by_handle = stub.Backward(pb.BackwardRequest(function="linear", handle=fwd.handle, grad_outputs=upstream), timeout=10)
        recompute = pb.BackwardRequest(function="linear", recompute=pb.Arguments(values=args), grad_outputs=upstream)
        by_recompute = stub.Backward(recompute, timeout=10)
        assert by_handle.SerializeToString() == by_recompute.SerializeToString()
        assert all(g.WhichOneof("kind") == "tensor" for g in by_handle.grads)


def test_dtypes_and_devices_follow_the_caller(client: GradientClient) -> None:
    x = torch.tensor([1.5, -2.0], dtype=torch.float64, requires_grad=True)
    result = client.forward_backward("square", x)
    assert result.outputs.dtype == torch.float64 and result.grads[0].dtype == torch.float64
    bf = torch.tensor([1.5, -2.0], dtype=torch.bfloat16, requires_grad=True)
    result = client.forward_backward("square", bf)
    assert result.outputs.dtype == torch.bfloat16 and result.grads[0].tolist() == [3.0, -4.0]
    out = client.forward("square", torch.arange(6.0).reshape(2, 3).T)  # non-contiguous
    assert out.tolist() == [[0.0, 9.0], [1.0, 16.0], [4.0, 25.0]]


def test_explicit_grad_outputs_and_missing_gradients(client: GradientClient) -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    result = client.forward_backward("two_outputs", x, grad_outputs=[torch.tensor([1.0, 10.0]), None])
    assert result.grads[0].tolist() == [2.0, 20.0]
    result = client.forward_backward("cube_plus_square", torch.tensor(2.0, requires_grad=True), torch.tensor(3.0))
    assert result.grads[1] is None  # explicit none, not zeros
    result = client.forward_backward("scale", torch.tensor([1.0], requires_grad=True), 3)
    assert result.grads == (torch.tensor([3.0]), None)


def test_errors_have_codes_and_messages(client: GradientClient) -> None:
    with pytest.raises(FunctionNotFoundError) as err:
        client.forward("nope", torch.ones(1))
    assert err.value.code is grpc.StatusCode.NOT_FOUND and err.value.reason == "FUNCTION_NOT_FOUND"
    with pytest.raises(InvalidArgumentError, match="square takes 1 argument, got 2"):
        client.forward("square", torch.ones(1), torch.ones(1))
    with pytest.raises(FunctionFailedError, match="forward_raises forward raised ValueError: x must be positive"):
        client.forward("forward_raises", torch.ones(1))
    with pytest.raises(FunctionFailedError, match="article_cube_plus_square backward") as err:
        client.forward_backward(
            "article_cube_plus_square", torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
        )
    assert err.value.code is grpc.StatusCode.FAILED_PRECONDITION
    # The server keeps serving everyone else.
    assert client.forward_backward("square", torch.tensor(1.0, requires_grad=True)).grads[0].item() == 2.0


def test_malformed_tensor_on_the_wire(server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        bad = pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1024, 1024, 2], data=b"\0" * 8))
        with pytest.raises(grpc.RpcError) as err:
            stub.Forward(pb.ForwardRequest(function="square", args=[bad]), timeout=10)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "square argument 0" in err.value.details() and "got 8" in err.value.details()


def test_health_reports_serving(server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gradserve.v1.GradientService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_request_over_the_limit_is_resource_exhausted() -> None:
    small = create_server(ServerConfig(port=0, device="cpu", max_request_bytes=1 << 20), registry)
    try:
        with GradientClient(f"127.0.0.1:{small.port}", timeout=10) as c:
            with pytest.raises(ResourceExhaustedError):
                c.forward("square", torch.zeros(512 * 1024))  # 2 MiB > 1 MiB
            assert c.forward("square", torch.tensor([3.0])).tolist() == [9.0]
    finally:
        small.stop(0)


def test_many_callers_at_once(client: GradientClient) -> None:
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(10):
                x = randn(16, seed=seed * 100 + i).requires_grad_()
                result = client.forward_backward("cube_plus_square", x, x.detach() * 2)
                torch.testing.assert_close(result.grads[0], 3 * x.detach() ** 2)
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
