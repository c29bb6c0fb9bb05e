"""Gradients you can trust: every case where the remote step must equal local autograd, or refuse.

Expected values come from local PyTorch with plain torch ops (an oracle independent of
the example classes), or are computed by hand. Every higher-order case runs twice: on a
server that keeps graphs (backward by handle) and on one that keeps none (every order
recomputed from the arguments, the lower-order cotangents and the forward's seed), in
single messages and streamed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ServerProcess
from hypothesis import given, settings
from hypothesis import strategies as st

from gradserve.client import (
    ArgumentError,
    FunctionFailedError,
    GradientClient,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from gradserve.client._messages import payload_list
from gradserve.server import RunningServer, ServerConfig, create_server, registry
from gradserve.server._checks import check_function
from gradserve.server._errors import RngMismatch
from gradserve.server._registry import Registry
from gradserve.server._runtime import RngReplay, Runtime
from gradserve.v1 import codec
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

# -- servers: one that keeps graphs, one that keeps none, one that keeps a single graph ---

_KINDS = {
    "handle": {},
    "recompute": {"max_handle_bytes": 0},  # no graph fits: every backward recomputes
    "one_handle": {"max_handles": 1},
}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, RunningServer]]:
    running = {
        kind: create_server(ServerConfig(port=0, device="cpu", max_workers=8, **cfg), registry) for kind, cfg in _KINDS.items()
    }
    yield running
    for server in running.values():
        server.stop(0)


@pytest.fixture(scope="module")
def clients(servers: dict[str, RunningServer]) -> Iterator[dict[str, GradientClient]]:
    made = {kind: GradientClient(f"127.0.0.1:{s.port}", timeout=60) for kind, s in servers.items()}
    # Every call through StreamCall, every order recomputed: the stream's slot order
    # (arguments, keyword arguments, grad_outputs, lower-order cotangents) is exercised.
    made["streamed"] = GradientClient(f"127.0.0.1:{servers['recompute'].port}", timeout=60, stream_threshold_bytes=-1)
    yield made
    for c in made.values():
        c.close()


@pytest.fixture(params=["handle", "recompute", "streamed"])
def remote(request: pytest.FixtureRequest, clients: dict[str, GradientClient]) -> GradientClient:
    return clients[request.param]


def leaf(values, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


# -- 1. higher-order gradients ------------------------------------------------------------


def test_second_order_term_is_kept(remote: GradientClient) -> None:
    """The issue's example: y = sum(x²), g = dy/dx with create_graph, (y + sum(g²)).backward()."""
    x = leaf([1.0, 2.0], torch.float32)
    y = remote.function("square")(x).sum()
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    (y + (g**2).sum()).backward()
    # By hand: d/dx (x² + 4x²) = 2x + 8x = 10x.
    assert x.grad.tolist() == [10.0, 20.0]


def test_hessian_vector_product_matches_local(remote: GradientClient) -> None:
    """torch.autograd.functional.hvp uses the double-backward trick: a third-order graph."""
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    v = torch.tensor([0.3, 2.0, -1.0], dtype=torch.float64)
    f = remote.function("cube_plus_square")
    value, hvp = torch.autograd.functional.hvp(lambda t: f(t, t).sum(), x, v)
    local_value, local_hvp = torch.autograd.functional.hvp(lambda t: (t**3 + t**2).sum(), x, v)
    assert value.item() == pytest.approx(local_value.item())
    torch.testing.assert_close(hvp, local_hvp)
    torch.testing.assert_close(hvp, (6 * x + 2) * v)  # by hand: the Hessian is diag(6x + 2)


def test_gradient_penalty_matches_local(remote: GradientClient) -> None:
    """WGAN-GP: the penalty on the input gradient's norm, differentiated into the weights."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, dtype=torch.float64, generator=g)
    weight = torch.randn(2, 3, dtype=torch.float64, generator=g)
    bias = torch.randn(2, dtype=torch.float64, generator=g)

    def penalty_grads(critic) -> list[torch.Tensor]:
        inputs = x.clone().requires_grad_()
        params = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
        score = critic(inputs, *params).tanh().sum()
        (grad_in,) = torch.autograd.grad(score, inputs, create_graph=True)
        loss = score + 10 * ((grad_in.norm(dim=1) - 1) ** 2).mean()
        return list(torch.autograd.grad(loss, params))

    remote_grads = penalty_grads(remote.function("linear"))
    local_grads = penalty_grads(F.linear)
    for r, loc in zip(remote_grads, local_grads):
        torch.testing.assert_close(r, loc)


def test_maml_step_matches_local(remote: GradientClient) -> None:
    """One MAML step: the outer loss differentiates through the inner update."""
    g = torch.Generator().manual_seed(4)
    x_in, y_in = torch.randn(6, 3, dtype=torch.float64, generator=g), torch.randn(6, 2, dtype=torch.float64, generator=g)
    x_out, y_out = torch.randn(4, 3, dtype=torch.float64, generator=g), torch.randn(4, 2, dtype=torch.float64, generator=g)
    w0 = torch.randn(2, 3, dtype=torch.float64, generator=g)

    def meta_grad(linear) -> torch.Tensor:
        w = w0.clone().requires_grad_()
        inner = ((linear(x_in, w) - y_in) ** 2).mean()
        (gw,) = torch.autograd.grad(inner, w, create_graph=True)
        adapted = w - 0.1 * gw
        outer = ((linear(x_out, adapted) - y_out) ** 2).mean()
        outer.backward()
        return w.grad

    torch.testing.assert_close(meta_grad(remote.function("linear")), meta_grad(F.linear))


def test_third_order_matches_local(remote: GradientClient) -> None:
    """d³/dx³ of x³ + y² through three nested create_graph backwards: 6 everywhere."""
    x, y = leaf([0.5, 2.0]), leaf([1.0, -1.0])
    out = remote.function("cube_plus_square")(x, y).sum()
    (g1,) = torch.autograd.grad(out, x, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), x, create_graph=True)
    (g3,) = torch.autograd.grad(g2.sum(), x)
    torch.testing.assert_close(g1, 3 * x.detach() ** 2)
    torch.testing.assert_close(g2, 6 * x.detach())
    assert g3.tolist() == [6.0, 6.0]


def test_double_backward_of_undeclared_function_class_is_refused(remote: GradientClient) -> None:
    x = leaf([1.0, 2.0])
    y = remote.function("identity")(x).sum()
    with pytest.raises(FunctionFailedError) as err:
        torch.autograd.grad(y, x, create_graph=True)
    assert err.value.reason == "DOUBLE_BACKWARD_UNSUPPORTED"
    assert "identity cannot be differentiated twice" in err.value.message and "double_backward=True" in err.value.message
    x.grad = None
    remote.function("identity")(x).sum().backward()  # first order still works
    assert x.grad.tolist() == [1.0, 1.0]


def test_once_differentiable_backward_is_refused_at_create_graph(remote: GradientClient) -> None:
    """Registered with double_backward=True, but its backward is @once_differentiable: locally the
    gradient would come back detached and the second-order term silently vanish."""
    x = leaf([1.0, 2.0])
    y = remote.function("once_differentiable_square")(x).sum()
    with pytest.raises(FunctionFailedError) as err:
        torch.autograd.grad(y, x, create_graph=True)
    assert err.value.code is grpc.StatusCode.FAILED_PRECONDITION and err.value.reason == "DOUBLE_BACKWARD_UNSUPPORTED"
    assert "once_differentiable_square cannot be differentiated twice" in err.value.message
    assert "@once_differentiable" in err.value.message


# -- 2. randomness replayed on recompute ----------------------------------------------------


def test_dropout_mask_is_replayed_after_eviction(clients: dict[str, GradientClient]) -> None:
    client = clients["one_handle"]
    x = torch.full((64,), 3.0, requires_grad=True)
    y = client.function("dropout")(x)
    client.function("square")(leaf([1.0]))  # takes the only handle: y's graph is evicted
    w = torch.linspace(-1, 1, 64)
    (y * w).sum().backward()
    kept = y.detach() != 0
    assert 10 < int(kept.sum()) < 54  # a real mask was drawn
    # dy/dx = mask / (1 - p) = y / x elementwise, whatever the mask was.
    torch.testing.assert_close(x.grad, w * y.detach() / 3.0)


def test_dropout_gradients_agree_by_handle_and_by_recompute(clients: dict[str, GradientClient]) -> None:
    for kind in ("handle", "recompute"):
        x = torch.ones(32, requires_grad=True)
        y = clients[kind].function("dropout")(x)
        y.sum().backward()
        assert torch.equal(x.grad, y.detach()), kind


def test_rng_seed_travels_only_when_numbers_were_drawn(servers: dict[str, RunningServer]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{servers['handle'].port}") as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        x = pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], data=bytes(16)))
        assert stub.Forward(pb.ForwardRequest(function="dropout", args=[x]), timeout=10).HasField("rng")
        assert not stub.Forward(pb.ForwardRequest(function="square", args=[x]), timeout=10).HasField("rng")


def test_recompute_refuses_randomness_from_another_kind_of_server() -> None:
    runtime = Runtime(registry)
    x = torch.ones(8, requires_grad=True)
    forwarded = runtime.forward("dropout", [x])
    assert forwarded.rng is not None and forwarded.rng.device_type == "cpu"
    again = runtime.backward("dropout", args=[x], rng=forwarded.rng).grads[0]
    assert torch.equal(again, forwarded.outputs[0])  # x = 1: dy/dx = y
    with pytest.raises(RngMismatch, match="drew random numbers on 'cuda'"):
        runtime.backward("dropout", args=[x], rng=RngReplay(forwarded.rng.seed, "cuda", torch.__version__))


def test_check_runs_a_random_function_on_fixed_draws() -> None:
    result = check_function(registry.get("dropout"))
    assert (result.first_order, result.second_order) == ("pass", "pass"), result.detail


@pytest.fixture(scope="module")
def recompute_process() -> Iterator[ServerProcess]:
    """A server in its own process (one in the callers' process shares torch's generators with them)."""
    with ServerProcess("--functions", "gradserve_test_functions", "--max-handle-bytes", "0", "--log-level", "WARNING") as server:
        yield server


def test_random_backwards_of_other_callers_do_not_shift_a_replayed_mask(recompute_process: ServerProcess) -> None:
    """Backwards that draw random numbers, beside forwards whose draws must replay: every backward
    here recomputes, so a mask drawn from a shifted stream would show as a wrong gradient."""
    client = GradientClient(recompute_process.target, timeout=60)
    stop = threading.Event()

    def noise() -> None:
        while not stop.is_set():
            x = torch.ones(8, requires_grad=True)
            client.function("random_backward")(x).sum().backward()

    noisy = [threading.Thread(target=noise) for _ in range(3)]
    for t in noisy:
        t.start()
    wrong = 0
    try:
        for _ in range(40):
            x = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
            y = client.function("work_then_dropout")(x)
            y.sum().backward()
            wrong += int(((x.grad == 0) != (y.detach() == 0)).any())  # zero gradient exactly where dropped
    finally:
        stop.set()
        for t in noisy:
            t.join(timeout=30)
        client.close()
    assert wrong == 0


def test_reentrant_checkpoint_replays_remote_randomness(remote: GradientClient) -> None:
    """torch.utils.checkpoint(use_reentrant=True) re-runs the forward after restoring the caller's
    generator: the server's draws follow, because the seed comes from the caller's generator."""
    f = remote.function("dropout")
    x = torch.full((256,), 2.0, dtype=torch.float64, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(lambda t: f(t) * 1.0, x, use_reentrant=True, preserve_rng_state=True)
    y.sum().backward()
    assert 50 < int((y != 0).sum()) < 206
    assert torch.equal(x.grad, y.detach() / 2)


def test_the_callers_manual_seed_decides_remote_randomness(remote: GradientClient) -> None:
    torch.manual_seed(7)
    first = remote.forward("dropout", torch.ones(64))
    torch.manual_seed(7)
    assert torch.equal(remote.forward("dropout", torch.ones(64)), first)


def test_check_fails_a_function_that_draws_despite_uses_rng_false() -> None:
    result = check_function(registry.get("deterministic_liar"))
    assert result.first_order == "fail" and "declared uses_rng=False, but its forward drew random numbers" in result.detail


def test_deterministic_functions_run_concurrently() -> None:
    """Built-in examples are registered uses_rng=False: they do not wait behind a random Function."""
    runtime = Runtime(registry)
    assert not registry.get("square").uses_rng and registry.get("dropout").uses_rng
    with runtime._rng_lock:  # as if a random Function were running
        assert runtime.forward("square", [leaf([3.0])]).outputs[0].tolist() == [9.0]


# -- 3. complex numbers ---------------------------------------------------------------------


def test_complex_gradients_follow_pytorch_convention(remote: GradientClient) -> None:
    z = torch.tensor(1 + 2j, requires_grad=True)
    remote.forward_backward("square", z, grad_outputs=torch.tensor(1 + 0j))
    grads = remote.forward_backward("square", z, grad_outputs=torch.tensor(1 + 0j)).grads
    local = torch.tensor(1 + 2j, requires_grad=True)
    (local_grad,) = torch.autograd.grad(local * local, local, torch.tensor(1 + 0j))
    assert grads[0].item() == local_grad.item() == 2 - 4j

    x, y = torch.tensor([2 - 1j], requires_grad=True), torch.tensor([3 + 0.5j], requires_grad=True)
    v = torch.tensor([0.5 + 1j])
    remote_grads = remote.forward_backward("cube_plus_square", x, y, grad_outputs=v).grads
    xl, yl = x.detach().requires_grad_(), y.detach().requires_grad_()
    local_grads = torch.autograd.grad(xl**3 + yl**2, (xl, yl), v)
    for r, loc in zip(remote_grads, local_grads):
        torch.testing.assert_close(r, loc)


def test_check_catches_a_complex_gradient_without_conjugate() -> None:
    class Unconjugated(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g  # right for real x, wrong for complex x

    reg = Registry()
    real_only = check_function(reg.add(Unconjugated, name="real_only"))
    assert real_only.first_order == "pass"  # float64 alone cannot see it
    declared = check_function(reg.add(Unconjugated, name="declared", supports_complex=True))
    assert declared.first_order == "fail" and "first order (complex128)" in declared.detail


# -- 4. default and keyword arguments ----------------------------------------------------


@pytest.mark.parametrize("name", ["scale_default", "scale_default_fn"])
def test_defaults_fill_omitted_arguments(remote: GradientClient, name: str) -> None:
    x = leaf([1.0, 2.0])
    result = remote.forward_backward(name, x)
    assert result.outputs.tolist() == [3.0, 6.0] and result.grads[0].tolist() == [3.0, 3.0]
    y = remote.function(name)(x, 0.5)
    y.sum().backward()
    assert y.tolist() == [0.5, 1.0] and x.grad.tolist() == [0.5, 0.5]


def test_keyword_arguments(remote: GradientClient) -> None:
    x = leaf([1.0, 2.0])
    assert remote.forward("scale", x, k=2.0).tolist() == [2.0, 4.0]
    assert remote.forward("scale_default_fn", x, k=4.0).tolist() == [4.0, 8.0]
    y = remote.function("scale")(x=x, k=5.0)
    y.sum().backward()
    assert x.grad.tolist() == [5.0, 5.0]
    w = leaf([[1.0, 0.0], [0.0, 2.0]])
    grads = remote.forward_backward("linear", leaf([[1.0, 1.0]]), weight=w).grads
    assert grads[0].tolist() == [[1.0, 2.0]] and grads[1].tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_signatures_are_listed(remote: GradientClient) -> None:
    infos = {f.name: f for f in remote.list_functions()}
    assert (infos["scale_default"].signature, infos["scale_default"].required_inputs) == ("(x, k=3.0)", 1)
    assert infos["linear"].signature == "(x, weight, bias=None)" and infos["linear"].required_inputs == 2
    assert infos["square"].double_backward and infos["scale"].double_backward and not infos["identity"].double_backward


def test_bad_keyword_arguments_are_refused(remote: GradientClient) -> None:
    with pytest.raises(InvalidArgumentError, match=r"got an unexpected keyword argument 'q'; signature scale\(x, k\)"):
        remote.forward("scale", leaf([1.0]), 2.0, q=2.0)
    with pytest.raises(InvalidArgumentError, match="missing a required argument: 'k'"):
        remote.forward("scale", leaf([1.0]))
    with pytest.raises(InvalidArgumentError, match="multiple values for argument 'k'"):
        remote.forward("scale", leaf([1.0]), 2.0, k=3.0)


def test_keyword_only_parameters(remote: GradientClient) -> None:
    assert remote.forward("keyword_only", leaf([1.0, 2.0]), w=3.0).tolist() == [3.0, 6.0]
    with pytest.raises(InvalidArgumentError, match=r"keyword_only\(x, \*, w\): missing a required argument: 'w'"):
        remote.forward("keyword_only", leaf([1.0]))


def test_mixed_precision_gradients_are_cast_as_torch_does(remote: GradientClient) -> None:
    x, y = torch.tensor([2.0], requires_grad=True), torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    grads = remote.forward_backward("cube_plus_square", x, y).grads
    xl, yl = x.detach().requires_grad_(), y.detach().requires_grad_()
    from gradserve.server.examples import CubePlusSquare

    CubePlusSquare.apply(xl, yl).sum().backward()  # torch casts the float64 gradient of x to float32
    assert (grads[0].dtype, grads[1].dtype) == (xl.grad.dtype, yl.grad.dtype) == (torch.float32, torch.float64)
    assert grads[0].tolist() == xl.grad.tolist() == [12.0] and grads[1].tolist() == yl.grad.tolist() == [6.0]


def test_a_repeated_keyword_is_refused(servers: dict[str, RunningServer]) -> None:
    k = pb.Value(float_value=2.0)
    x = pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1], data=bytes(4)))
    request = pb.ForwardRequest(function="scale", args=[x], kwargs=[pb.NamedValue(name="k", value=k)] * 2)
    with grpc.insecure_channel(f"127.0.0.1:{servers['handle'].port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GradientServiceStub(channel).Forward(request, timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "keyword argument k given twice" in err.value.details()


# -- 5. autograd inside forward, grad mode as local -----------------------------------------


def test_autograd_inside_forward(remote: GradientClient) -> None:
    pos = torch.tensor([1.0, -2.0, 0.5])
    assert remote.forward("forces", pos).tolist() == [-2.0, 4.0, -1.0]


def test_forward_runs_in_the_callers_grad_mode(remote: GradientClient) -> None:
    x = torch.ones(1)
    assert remote.forward("grad_mode", x).item() == float(torch.is_grad_enabled()) == 1.0
    with torch.no_grad():
        assert remote.forward("grad_mode", x).item() == 0.0


# -- 6. sparse gradients --------------------------------------------------------------------


def test_sparse_gradient_travels_sparse(remote: GradientClient) -> None:
    indices = torch.tensor([0, 2, 2])
    weight = torch.arange(8.0).reshape(4, 2).requires_grad_()
    grads = remote.forward_backward("embedding_sparse", indices, weight).grads
    local = torch.arange(8.0).reshape(4, 2).requires_grad_()
    F.embedding(indices, local, sparse=True).sum().backward()
    assert grads[0] is None and grads[1].layout == local.grad.layout == torch.sparse_coo
    assert grads[1].to_dense().tolist() == local.grad.to_dense().tolist() == [[1, 1], [0, 0], [2, 2], [0, 0]]
    remote.function("embedding_sparse")(indices, weight).sum().backward()
    assert weight.grad.layout == torch.sparse_coo and torch.equal(weight.grad.to_dense(), local.grad.to_dense())


# -- 7. outputs the wire cannot carry; the dtypes users now have ------------------------------


@pytest.mark.parametrize(
    ("name", "needle"),
    [("meta_output", "meta tensor"), ("fnuz_output", "dtype float8_e4m3fnuz cannot be sent"), ("sparse_output", "sparse_coo")],
)
def test_unsendable_outputs_are_the_functions_fault(remote: GradientClient, name: str, needle: str) -> None:
    with pytest.raises(FunctionFailedError) as err:
        remote.forward(name, torch.ones(2))
    assert err.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert f"{name} forward output 0 cannot be sent" in err.value.message and needle in err.value.message
    assert remote.forward("square", torch.ones(1)).item() == 1.0  # still serving


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2])
def test_new_dtypes_round_trip_bit_exactly(remote: GradientClient, dtype: torch.dtype) -> None:
    raw = torch.tensor([0, 1, 0x7F, 0xC3, 0xFF, 0x3C], dtype=torch.uint8)
    sent = raw.repeat(8).view(dtype)
    back = remote.forward("identity", sent)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), sent.view(torch.uint8))


# -- 8. numpy arguments -----------------------------------------------------------------


def test_numpy_big_endian_arrays_and_scalars(remote: GradientClient) -> None:
    big_endian = np.array([1.0, 2.5, -3.0], dtype=">f4")
    assert remote.forward("scale", big_endian, 2.0).tolist() == [2.0, 5.0, -6.0]
    assert remote.forward("scale", torch.tensor([1.0, 2.0]), np.float32(2.0)).tolist() == [2.0, 4.0]
    assert remote.forward("scale", torch.tensor([1.0, 2.0]), np.int64(3)).tolist() == [3.0, 6.0]
    with pytest.raises(ArgumentError, match="numpy array of dtype object cannot be sent"):
        remote.forward("scale", np.array([object()]), 2.0)


def test_numpy_zero_dim_strings_and_unsupported_dtypes(remote: GradientClient) -> None:
    assert remote.forward("square", np.array(3.0)).shape == torch.Size([])  # 0-d stays 0-d
    assert remote.forward("scale", torch.tensor([1.0]), np.float64(2.5)).tolist() == [2.5]
    assert codec.encode_value(np.str_("x")).string_value == "x"
    with pytest.raises(ArgumentError, match="dtype float128 cannot be sent"):
        remote.forward("square", np.array([1.0], np.longdouble))


def test_vmap_through_a_remote_step_is_refused_clearly(remote: GradientClient) -> None:
    f = remote.function("square")
    with pytest.raises(ArgumentError, match="cannot run under torch.func transforms"):
        torch.autograd.functional.jacobian(lambda t: f(t), torch.ones(3), vectorize=True)
    jac = torch.autograd.functional.jacobian(lambda t: f(t), torch.tensor([1.0, 2.0]), vectorize=False)
    assert jac.tolist() == [[2.0, 0.0], [0.0, 4.0]]


def test_huge_sparse_arguments_are_refused_and_the_server_lives(remote: GradientClient) -> None:
    """torch's sparse kernels divide by zero on 2**32 elements (SIGFPE killed the server)."""
    huge = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), [2**32], check_invariants=True)
    with pytest.raises(ResourceExhaustedError, match="at most 2147483647 are accepted"):
        remote.forward("square", huge)
    assert remote.forward("square", torch.tensor([3.0])).tolist() == [9.0]


def test_second_order_recompute_of_a_first_order_function_is_refused(servers: dict[str, RunningServer]) -> None:
    x = pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 2], data=bytes(8), requires_grad=True))
    one = pb.MaybeTensor(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1], data=bytes.fromhex("0000803f")))
    request = pb.BackwardRequest(
        function="max_with_index",
        recompute=pb.Arguments(values=[x]),
        lower_order=[pb.Cotangents(values=[one, pb.MaybeTensor(none=0)])],
        grad_outputs=[pb.MaybeTensor(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 2], data=bytes(8)))],
    )
    with grpc.insecure_channel(f"127.0.0.1:{servers['handle'].port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GradientServiceStub(channel).Backward(request, timeout=10)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "cannot be differentiated twice" in err.value.details()


def test_large_numpy_arrays_stream_like_tensors(remote: GradientClient) -> None:
    big = np.arange(3 << 18, dtype=np.float32)  # 3 MiB: over the 1 MiB streaming threshold
    assert payload_list(1 << 20, [big]) == []  # counted, so the call streams (no 2 GiB ceiling)
    assert np.array_equal(remote.forward("scale", big, 2.0).numpy(), 2 * big)


# -- property: remote first and second order equal local autograd -------------------------

_ORACLES = {
    # name: (plain-torch oracle, argument count, complex supported)
    "square": (lambda x: x * x, 1, True),
    "cube_plus_square": (lambda x, y: x**3 + y**2, 2, True),
    "softplus": (F.softplus, 1, False),
    "logsumexp": (lambda x: torch.logsumexp(x, dim=-1), 1, False),
    "scale": (lambda x: x * 1.5, 1, True),
}


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(sorted(_ORACLES)),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.complex128]),
    seed=st.integers(0, 2**16),
)
def test_remote_gradients_equal_local_autograd(clients: dict[str, GradientClient], name, shape, dtype, seed) -> None:
    oracle, arity, complex_ok = _ORACLES[name]
    if dtype.is_complex and not complex_ok:
        dtype = torch.float64
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(shape, dtype=dtype, generator=g) for _ in range(arity)]
    extra = (1.5,) if name == "scale" else ()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}

    def grads(fn) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        inputs = [v.clone().requires_grad_() for v in values]
        out = fn(*inputs)
        cotangent = torch.ones_like(out) * (0.5 - 0.25j if out.is_complex() else 0.5)
        first = torch.autograd.grad(out, inputs, cotangent, create_graph=True)
        loss = sum((f.abs() ** 2).sum() for f in first)
        # Linear in x (scale): the gradient is constant and, as locally, not differentiable.
        second = torch.autograd.grad(loss, inputs) if loss.requires_grad else [torch.zeros_like(v) for v in values]
        return [f.detach() for f in first], list(second)

    for kind in ("handle", "recompute"):
        function = clients[kind].function(name)
        remote_first, remote_second = grads(lambda *xs, f=function: f(*xs, *extra))
        local_first, local_second = grads(oracle)
        for r, loc in zip(remote_first + remote_second, local_first + local_second):
            torch.testing.assert_close(r, loc, **tol)
