"""Start-up checks and the backward contract, in process: exact verdicts, details and messages.

The CLI tests run ``gradserve check`` in a subprocess; these call the checks directly so
that each verdict and each message is pinned (and mutation testing can see them).
"""

from __future__ import annotations

import re
from typing import Any

import gradserve_broken_functions  # noqa: F401  (registers the broken Functions)
import pytest
import torch

import gradserve.server.examples  # noqa: F401  (registers the examples)
from gradserve.server import registry
from gradserve.server._checks import CheckResult, check_function, complex_sample, default_sample_inputs, format_table
from gradserve.server._contract import BackwardContractError, contract_checked
from gradserve.server._registry import Registry


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


def x64(*values: float) -> tuple[torch.Tensor]:
    return (torch.tensor(values, dtype=torch.float64, requires_grad=True),)


class Double(torch.autograd.Function):
    """2x, right at every order."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return 2 * g


# -- verdicts ------------------------------------------------------------------------------


def test_a_correct_function_passes_both_orders_with_no_detail() -> None:
    assert check_function(registry.get("square")) == CheckResult("square", "pass", "pass", "")
    assert check_function(registry.get("square")).ok


def test_a_wrong_first_derivative_fails_first_order_in_gradchecks_words() -> None:
    result = check_function(registry.get("wrong_cube"))
    assert (result.first_order, result.second_order, result.ok) == ("fail", "skip", False)
    assert result.detail == (
        "first order (float64): Jacobian mismatch for output 0 with respect to input 0, "
        "numerical:tensor([[12.0000]], dtype=torch.float64) analytical:tensor([[8.]], dtype=torch.float64)"
    )


def test_a_wrong_second_derivative_fails_second_order_only() -> None:
    result = check_function(registry.get("ctx_attribute_square"))
    assert (result.first_order, result.second_order, result.ok) == ("pass", "fail", False)
    assert result.detail.startswith("second order (float64): Jacobian mismatch for output 0 with respect to input 0, ")
    assert result.detail.endswith("analytical:tensor([[0.]], dtype=torch.float64)")


def test_gradcheck_false_is_skipped_with_its_reason() -> None:
    assert check_function(registry.get("straight_through_sign")) == CheckResult(
        "straight_through_sign", "skip", "skip", "surrogate gradient by design (straight-through estimator)"
    )
    reg = Registry()
    plain = reg.add(Double, name="unchecked", gradcheck=False)
    assert check_function(plain) == CheckResult("unchecked", "skip", "skip", "declared gradcheck=False")
    assert check_function(plain).ok


def test_a_function_that_raises_fails_first_order_with_the_exception() -> None:
    assert check_function(registry.get("grad_for_scalar")) == CheckResult(
        "grad_for_scalar",
        "fail",
        "skip",
        "BackwardContractError: grad_for_scalar backward returned a gradient for argument 1, which is not a tensor; "
        "expected None",
    )


def test_a_backward_that_raises_when_differentiated_fails_second_order() -> None:
    class NotTwice(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            if torch.is_grad_enabled():
                raise RuntimeError("no second order")
            return 2 * x * g

    result = check_function(Registry().add(NotTwice, name="not_twice", double_backward=True, sample_inputs=lambda: x64(1.5)))
    assert (result.first_order, result.second_order) == ("pass", "fail")
    assert result.detail == "second order: RuntimeError: no second order"


def test_first_order_only_functions_skip_second_order_and_keep_first_order_detail() -> None:
    result = check_function(Registry().add(Double, name="double", sample_inputs=lambda: x64(1.0, 2.0)))
    assert result == CheckResult("double", "pass", "skip", "")


def test_complex_functions_are_checked_on_complex_inputs_too() -> None:
    class RealOnly(torch.autograd.Function):
        """x * x with backward 2 x g: right for real x, wrong (no conjugate) for complex x."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return 2 * x * g

    reg = Registry()
    assert check_function(reg.add(RealOnly, name="real", sample_inputs=lambda: x64(0.5))).first_order == "pass"
    declared = check_function(reg.add(RealOnly, name="cplx", supports_complex=True, sample_inputs=lambda: x64(0.5)))
    assert declared.first_order == "fail"
    assert declared.detail.startswith("first order (complex128): ")


def test_random_functions_are_checked_on_fixed_draws_and_must_declare_it() -> None:
    class Noisy(torch.autograd.Function):
        """x times a fresh random factor: differentiable only if the draw is the same at every call."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            k = torch.rand(())
            ctx.k = k
            return x * k

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return g * ctx.k

    reg = Registry()
    assert check_function(reg.add(Noisy, name="noisy", sample_inputs=lambda: x64(1.0, 2.0))).first_order == "pass"
    liar = check_function(reg.add(Noisy, name="liar", uses_rng=False, sample_inputs=lambda: x64(1.0, 2.0)))
    assert (liar.first_order, liar.second_order) == ("fail", "skip")
    assert liar.detail == "declared uses_rng=False, but its forward drew random numbers: register it without uses_rng=False"
    assert check_function(Registry().add(Double, name="d", uses_rng=False, sample_inputs=lambda: x64(1.0))).first_order == "pass"


def test_long_gradcheck_messages_are_cut_to_400_characters_on_one_line() -> None:
    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return 3 * g

    result = check_function(Registry().add(Wrong, name="wrong", sample_inputs=lambda: x64(*range(30))))
    label = "first order (float64): "
    assert result.detail.startswith(label + "Jacobian mismatch for output 0 with respect to input 0, numerical:tensor([[2.")
    assert len(result.detail) == len(label) + 400 and "\n" not in result.detail


# -- sample inputs and the table -----------------------------------------------------------


def test_default_sample_inputs_are_seeded_float64_in_half_to_three_halves() -> None:
    a, b = default_sample_inputs(2)
    g = torch.Generator().manual_seed(0)
    expected = [torch.rand(3, 4, dtype=torch.float64, generator=g) + 0.5 for _ in range(2)]
    assert torch.equal(a, expected[0]) and torch.equal(b, expected[1])
    assert a.requires_grad and b.requires_grad and a.dtype == torch.float64 and a.shape == (3, 4)
    assert len(default_sample_inputs(3)) == 3


def test_complex_sample_adds_an_imaginary_part_of_half_plus_a_quarter() -> None:
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    frozen = torch.tensor([4.0], dtype=torch.float64)
    z, w, k, f32 = complex_sample([x, frozen, 3.0, torch.ones(1)])
    assert z.dtype == torch.complex128 and z.tolist() == [1 + 0.75j, 2 + 1.25j] and z.requires_grad and z.is_leaf
    assert w.tolist() == [4 + 2.25j] and not w.requires_grad
    assert k == 3.0 and f32.dtype == torch.float32


def test_format_table_pads_three_columns_and_trims_the_line_end() -> None:
    table = format_table([CheckResult("square", "pass", "pass"), CheckResult("wrong_cube", "fail", "skip", "why")])
    assert table.splitlines() == [
        "function    first order  second order  detail",
        "square      pass         pass",
        "wrong_cube  fail         skip          why",
    ]


# -- the backward contract -----------------------------------------------------------------


def backward_of(cls: type[torch.autograd.Function], *inputs: Any) -> tuple[Any, ...]:
    """Run ``contract_checked(cls)`` forward and backward; the gradients of the tensor inputs."""
    checked = contract_checked(cls, "f")
    out = checked.apply(*inputs)
    leaves = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
    loss = out.sum()
    return torch.autograd.grad(loss.real if loss.is_complex() else loss, leaves, allow_unused=True)


def returning(*grads: Any, forward: Any = None) -> type[torch.autograd.Function]:
    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *args: Any) -> torch.Tensor:
            return args[0] * 1.0 if forward is None else forward(*args)

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> Any:
            return grads[0] if len(grads) == 1 else grads

    return F


def test_gradient_count_must_match_the_inputs() -> None:
    x = torch.ones(2, requires_grad=True)
    tail = "; return one gradient (or None) per forward input"
    with pytest.raises(BackwardContractError, match=exactly("f backward returned 1 gradient for 2 inputs" + tail)):
        backward_of(returning(torch.ones(2)), x, torch.ones(2))
    with pytest.raises(BackwardContractError, match=exactly("f backward returned 2 gradients for 1 input" + tail)):
        backward_of(returning(torch.ones(2), torch.ones(2)), x)
    # Trailing Nones, for parameters left to their defaults, are dropped as torch does.
    (grad,) = backward_of(returning(torch.full((2,), 3.0), None, None), x)
    assert grad.tolist() == [3.0, 3.0]


def test_each_gradient_must_fit_its_input() -> None:
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(
        BackwardContractError, match=exactly("f backward returned a float for argument 0; expected a tensor or None")
    ):
        backward_of(returning(1.0), x)
    with pytest.raises(
        BackwardContractError,
        match=exactly("f backward returned a gradient for argument 1, which is not a tensor; expected None"),
    ):
        backward_of(returning(torch.ones(2), torch.ones(())), x, 2.0)
    with pytest.raises(
        BackwardContractError,
        match=exactly("f backward returned a gradient for argument 1, a int64 tensor that cannot have one; expected None"),
    ):
        backward_of(returning(torch.ones(2), torch.ones(2)), x, torch.ones(2, dtype=torch.int64))
    with pytest.raises(BackwardContractError, match=exactly("f backward: gradient for argument 0: got shape [3], expected [2]")):
        backward_of(returning(torch.ones(3)), x)
    with pytest.raises(
        BackwardContractError,
        match=exactly(
            "f backward: gradient for argument 0: got dtype int64, expected float32 (the argument's dtype) "
            "or another floating dtype torch casts to it"
        ),
    ):
        backward_of(returning(torch.ones(2, dtype=torch.int64)), x)
    with pytest.raises(
        BackwardContractError, match="^f backward: gradient for argument 0: got dtype complex64, expected float32"
    ):
        backward_of(returning(torch.ones(2, dtype=torch.complex64)), x)


def test_gradients_torch_would_accept_pass_the_contract() -> None:
    x = torch.ones(2, requires_grad=True)
    (grad,) = backward_of(returning(torch.ones(3, 2)), x)  # broadcast in forward: torch sums it down
    assert grad.tolist() == [3.0, 3.0]
    (grad,) = backward_of(returning(torch.full((2,), 0.5, dtype=torch.float64)), x)  # cast to the input's dtype
    assert grad.dtype == torch.float32 and grad.tolist() == [0.5, 0.5]
    z = torch.ones(2, dtype=torch.complex64, requires_grad=True)
    (grad,) = backward_of(returning(torch.full((2,), 1j, dtype=torch.complex128)), z)
    assert grad.dtype == torch.complex64 and grad.tolist() == [1j, 1j]
    (grad,) = backward_of(returning(None), x)
    assert grad is None


def test_setup_context_functions_are_checked_too() -> None:
    class Split(torch.autograd.Function):
        """2x, with a backward one element too long."""

        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            ctx.n = output.numel()

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return torch.ones(ctx.n + 1)

    with pytest.raises(BackwardContractError, match=exactly("f backward: gradient for argument 0: got shape [3], expected [2]")):
        backward_of(Split, torch.ones(2, requires_grad=True))
    checked = contract_checked(Split, "f")
    assert (checked.__name__, checked.__qualname__, checked.__doc__) == ("Split", Split.__qualname__, Split.__doc__)
    assert checked.__module__ == Split.__module__ == __name__


def test_default_samples_give_one_input_per_required_parameter_and_one_for_varargs() -> None:
    class Product(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x, y)
            return x * y

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = ctx.saved_tensors
            return g * y, g * x

    class FirstTwice(torch.autograd.Function):
        """2 * xs[0]: one gradient, so right only when called with exactly one input."""

        @staticmethod
        def forward(ctx: Any, *xs: torch.Tensor) -> torch.Tensor:
            return 2 * xs[0]

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return 2 * g

    reg = Registry()
    assert check_function(reg.add(Product, name="product")) == CheckResult("product", "pass", "skip", "")
    assert check_function(reg.add(FirstTwice, name="first_twice")) == CheckResult("first_twice", "pass", "skip", "")


def test_a_none_gradient_does_not_end_the_checks_of_the_next_ones() -> None:
    x, y = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    with pytest.raises(BackwardContractError, match=exactly("f backward: gradient for argument 1: got shape [5], expected [2]")):
        backward_of(returning(None, torch.ones(5)), x, y)


def test_every_failed_order_and_kind_is_in_the_detail() -> None:
    class WrongTwice(torch.autograd.Function):
        """x**2 with backward 3 x g, 3 x kept as a ctx attribute: wrong at first order (real and
        complex inputs) and at second order (autograd cannot see through the attribute)."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.three_x = 3 * x
            return x * x

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return ctx.three_x * g

    reg = Registry()
    first_only = check_function(reg.add(WrongTwice, name="c", supports_complex=True, sample_inputs=lambda: x64(0.5)))
    parts = first_only.detail.split("; ")
    assert [p.split(":")[0] for p in parts] == ["first order (float64)", "first order (complex128)"]
    both = check_function(reg.add(WrongTwice, name="d", double_backward=True, sample_inputs=lambda: x64(0.5)))
    assert (both.first_order, both.second_order) == ("fail", "fail")
    assert [p.split(":")[0] for p in both.detail.split("; ")] == ["first order (float64)", "second order (float64)"]


def test_setup_context_functions_get_their_inputs() -> None:
    class Mul(torch.autograd.Function):
        """x * y, saving both in setup_context from its ``inputs``."""

        @staticmethod
        def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x * y

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = ctx.saved_tensors
            return g * y, g * x

    gx, gy = backward_of(Mul, *x64(2.0, 3.0), *x64(5.0, 7.0))
    assert gx.tolist() == [5.0, 7.0] and gy.tolist() == [2.0, 3.0]
