"""Built-in examples: seed values by hand, and gradcheck in float64 (run locally, no server)."""

from __future__ import annotations

import math

import pytest
import torch

from gradserve.server import examples

f64 = torch.float64


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=f64, generator=torch.Generator().manual_seed(0)).requires_grad_()


GRADCHECK_CASES = {
    "square": (examples.Square.apply, lambda: (rand(3, 4),)),
    "cube_plus_square": (examples.CubePlusSquare.apply, lambda: (rand(3, 4), rand(4))),
    "softplus": (examples.Softplus.apply, lambda: (rand(5) * 30,)),
    "logsumexp": (examples.LogSumExp.apply, lambda: (rand(3, 5),)),
    "linear": (examples.Linear.apply, lambda: (rand(4, 3), rand(2, 3), rand(2))),
    "max_with_index": (lambda x: examples.MaxWithIndex.apply(x)[0], lambda: (rand(3, 5),)),
    "scale": (lambda x: examples.scale(x, 2.5), lambda: (rand(3),)),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_gradcheck_float64(name: str) -> None:
    fn, make_inputs = GRADCHECK_CASES[name]
    assert torch.autograd.gradcheck(fn, make_inputs())


def test_straight_through_sign_gradient_is_the_estimator_not_the_derivative() -> None:
    # gradcheck would (rightly) disagree: the STE is a deliberate surrogate gradient.
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = examples.StraightThroughSign.apply(x)
    y.backward(torch.full_like(x, 3.0))
    assert y.tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    assert x.grad.tolist() == [0.0, 3.0, 3.0, 3.0, 0.0]


def test_square_seed_value() -> None:
    x = torch.tensor(1.0, requires_grad=True)
    y = examples.Square.apply(x)
    y.backward()
    assert (y.item(), x.grad.item()) == (1.0, 2.0)


def test_cube_plus_square_seed_values_both_gradients() -> None:
    x = torch.tensor(2.0, requires_grad=True)
    y = torch.tensor(3.0, requires_grad=True)
    f = examples.CubePlusSquare.apply(x, y)
    f.backward()
    assert (f.item(), x.grad.item(), y.grad.item()) == (17.0, 12.0, 6.0)


def test_softplus_and_logsumexp_are_stable_where_naive_forms_overflow() -> None:
    x = torch.tensor([100.0, -100.0, 0.0])
    assert examples.Softplus.apply(x).tolist() == pytest.approx([100.0, 3.72e-44, 0.6931472], rel=1e-5, abs=1e-44)
    rows = torch.tensor([[1000.0, 1000.0], [float("-inf"), float("-inf")]], requires_grad=True)
    out = examples.LogSumExp.apply(rows)
    out[0].backward()
    assert out[0].item() == pytest.approx(1000.0 + 0.6931472)
    assert out[1].item() == float("-inf")
    assert rows.grad[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-4)  # float32 rounding of 1000.69


def test_linear_without_bias_matches_torch() -> None:
    x, w = rand(4, 3), rand(2, 3)
    torch.testing.assert_close(examples.Linear.apply(x, w, None), torch.nn.functional.linear(x, w))


# -- independent oracles: plain torch ops or hand-computed values, never the example itself ---------


def cotangent(*shape: int) -> torch.Tensor:
    """A non-uniform cotangent, so a gradient that ignores or reorders grad_output shows."""
    return torch.randn(*shape, dtype=f64, generator=torch.Generator().manual_seed(7)) * 3 + 0.5


def grads(fn, args: tuple[torch.Tensor, ...], upstream: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple:
    """fn(*args) and its vector-Jacobian product for ``upstream``, on fresh leaves."""
    leaves = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    ups = upstream if isinstance(upstream, tuple) else (upstream,)
    pairs = [(o, u) for o, u in zip(outs, ups) if u is not None]
    wanted = [a for a in leaves if a.requires_grad]
    return out, torch.autograd.grad([o for o, _ in pairs], wanted, [u for _, u in pairs])


ORACLES = {  # name -> (example, plain torch, arguments, cotangent shape)
    "square": (examples.Square.apply, lambda x: x * x, lambda: (rand(3, 4),), (3, 4)),
    "cube_plus_square": (examples.CubePlusSquare.apply, lambda x, y: x**3 + y**2, lambda: (rand(3, 4), rand(4) + 1), (3, 4)),
    "softplus": (examples.Softplus.apply, torch.nn.functional.softplus, lambda: (rand(6) * 30,), (6,)),
    "logsumexp": (examples.LogSumExp.apply, lambda x: torch.logsumexp(x, dim=-1), lambda: (rand(3, 5),), (3,)),
    "linear": (examples.Linear.apply, torch.nn.functional.linear, lambda: (rand(4, 3), rand(2, 3) + 1, rand(2) - 1), (4, 2)),
    "scale": (lambda x: examples.scale(x, 2.5), lambda x: 2.5 * x, lambda: (rand(4),), (4,)),
}


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_example_equals_plain_torch_with_a_non_uniform_cotangent(name: str) -> None:
    example, oracle, make_args, shape = ORACLES[name]
    args, upstream = make_args(), cotangent(*shape)
    got, got_grads = grads(example, args, upstream)
    want, want_grads = grads(oracle, args, upstream)
    torch.testing.assert_close(got, want)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", ["square", "cube_plus_square", "softplus", "logsumexp", "linear"])
def test_second_order_equals_plain_torch(name: str) -> None:
    """Double backward (create_graph=True) of the example against torch's own autograd of the same maths."""
    example, oracle, make_args, shape = ORACLES[name]
    args, upstream = make_args(), cotangent(*shape)

    def second(fn) -> list:
        leaves = tuple(a.detach().clone().requires_grad_() for a in args)
        first = torch.autograd.grad(fn(*leaves), leaves, upstream, create_graph=True)
        total = sum((g * g * (k + 1)).sum() for k, g in enumerate(first))
        return [torch.zeros(()) if g is None else g for g in torch.autograd.grad(total, leaves, allow_unused=True)]

    got, want = second(example), second(oracle)
    assert any(bool(w.abs().sum()) for w in want)  # the second order is not trivially zero
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_max_with_index_equals_torch_max_with_distinct_cotangents() -> None:
    x = torch.tensor([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0], [-1.0, -2.0, -0.5]], dtype=f64, requires_grad=True)
    values, indices = examples.MaxWithIndex.apply(x)
    want_values, want_indices = torch.max(x.detach(), dim=-1)
    assert torch.equal(values.detach(), want_values) and torch.equal(indices, want_indices)
    values.backward(torch.tensor([10.0, -20.0, 30.0], dtype=f64))
    assert x.grad.tolist() == [[0.0, 10.0, 0.0], [-20.0, 0.0, 0.0], [0.0, 0.0, 30.0]]


def test_straight_through_sign_window_includes_plus_and_minus_one() -> None:
    """|x| <= 1 passes the gradient: at exactly +-1 it passes, one float step outside it is blocked."""
    one = torch.tensor(1.0, dtype=f64)
    just_out = torch.nextafter(one, torch.tensor(2.0, dtype=f64)).item()
    just_in = torch.nextafter(one, torch.tensor(0.0, dtype=f64)).item()
    x = torch.tensor([-just_out, -1.0, -just_in, just_in, 1.0, just_out], dtype=f64, requires_grad=True)
    y = examples.StraightThroughSign.apply(x)
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=f64))
    assert y.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]
    torch.testing.assert_close(examples.StraightThroughSign.apply(rand(7)), torch.sign(rand(7)))


def test_square_complex_gradient_by_hand() -> None:
    """At x = 1 + 2j with grad_output 1: y = -3 + 4j, gradient conj(2x) = 2 - 4j (PyTorch's convention)."""
    x = torch.tensor(1 + 2j, dtype=torch.complex128, requires_grad=True)
    y = examples.Square.apply(x)
    y.backward(torch.tensor(1 + 0j, dtype=torch.complex128))
    assert (y.item(), x.grad.item()) == (-3 + 4j, 2 - 4j)


@pytest.mark.parametrize("name", ["square", "cube_plus_square", "linear"])
def test_complex_gradient_equals_plain_torch(name: str) -> None:
    example, oracle, make_args, shape = ORACLES[name]
    args = tuple(torch.complex(a.detach(), a.detach() / 2 + 0.25).requires_grad_() for a in make_args())
    upstream = torch.complex(cotangent(*shape), cotangent(*shape).flip(-1))
    got, got_grads = grads(example, args, upstream)
    want, want_grads = grads(oracle, args, upstream)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_softplus_and_logsumexp_by_hand() -> None:
    """softplus(0) = log 2, d/dx = sigmoid(0) = 1/2; logsumexp([0, log 3]) = log 4, gradient softmax = [1/4, 3/4]."""
    x = torch.tensor([0.0], dtype=f64, requires_grad=True)
    y = examples.Softplus.apply(x)
    y.backward(torch.tensor([4.0], dtype=f64))
    assert y.item() == pytest.approx(math.log(2)) and x.grad.item() == pytest.approx(2.0)
    row = torch.tensor([0.0, math.log(3)], dtype=f64, requires_grad=True)
    out = examples.LogSumExp.apply(row)
    out.backward(torch.tensor(8.0, dtype=f64))
    assert out.item() == pytest.approx(math.log(4)) and row.grad.tolist() == pytest.approx([2.0, 6.0])


def test_linear_by_hand() -> None:
    """x = [[1, 2]], w = [[3, 4], [5, 6]], b = [1, -1]: y = [[12, 16]]; with g = [[1, 10]]:
    grad_x = g @ w = [[53, 64]], grad_w = g.T @ x = [[1, 2], [10, 20]], grad_b = [1, 10]."""
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    w = torch.tensor([[3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    b = torch.tensor([1.0, -1.0], requires_grad=True)
    y = examples.Linear.apply(x, w, b)
    y.backward(torch.tensor([[1.0, 10.0]]))
    assert y.tolist() == [[12.0, 16.0]]
    assert (x.grad.tolist(), w.grad.tolist(), b.grad.tolist()) == ([[53.0, 64.0]], [[1.0, 2.0], [10.0, 20.0]], [1.0, 10.0])


@pytest.mark.parametrize("name", ["square", "cube_plus_square", "softplus", "logsumexp", "linear", "scale"])
def test_gradgradcheck_float64(name: str) -> None:
    fn, make_inputs = GRADCHECK_CASES[name]
    assert torch.autograd.gradgradcheck(fn, make_inputs())
