"""Built-in examples: seed values by hand, and gradcheck in float64 (run locally, no server)."""

from __future__ import annotations

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
