"""Gradient checks on registered Functions, on demand (``gradserve check``, ``serve --check``).

:func:`check_function` runs ``torch.autograd.gradcheck`` (and ``gradgradcheck`` where
the backward may be differentiated) in float64 on sample inputs, and in complex128 for
Functions that declare complex support, and reports gradcheck's own message on failure.
float64 because float32 finite differences raise false alarms. (The backward contract
checked on every call is in ``_contract``.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.gradcheck import GradcheckError

from ._registry import RegisteredFunction

__all__ = ["CheckResult", "check_function", "complex_sample", "default_sample_inputs", "format_table"]

# -- gradcheck -------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """Outcome of checking one Function.

    Attributes
    ----------
    name : str
    first_order, second_order : str
        ``"pass"``, ``"fail"`` or ``"skip"``.
    detail : str
        Why it failed or was skipped, in gradcheck's own words (which Jacobian
        entry, numerical against analytical); empty on success.
    """

    name: str
    first_order: str
    second_order: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        """True unless an order failed."""
        return "fail" not in (self.first_order, self.second_order)


def default_sample_inputs(num_inputs: int) -> tuple[torch.Tensor, ...]:
    """Sample inputs for an elementwise Function: ``num_inputs`` float64 [3, 4] tensors in [0.5, 1.5].

    Away from 0 so functions with a kink there (abs, relu, sign) stay differentiable.
    """
    g = torch.Generator().manual_seed(0)
    return tuple((torch.rand(3, 4, dtype=torch.float64, generator=g) + 0.5).requires_grad_() for _ in range(num_inputs))


def complex_sample(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """float64 sample inputs as complex128 ones: x + i*(x/2 + 0.25), so both parts vary."""
    return tuple(
        torch.complex(a.detach(), a.detach() / 2 + 0.25).requires_grad_(a.requires_grad)
        if isinstance(a, torch.Tensor) and a.dtype == torch.float64
        else a
        for a in inputs
    )


def _verdict(check: Callable[..., bool], fn: Callable[..., Any], inputs: tuple[Any, ...], label: str) -> str:
    """'' when ``check`` (torch's gradcheck or gradgradcheck) passes, else its own message, on one line."""
    try:
        check(fn, inputs, raise_exception=True)
    except GradcheckError as exc:
        text = " ".join(str(exc).split())
        return f"{label}: {text[:400]}"
    return ""


def _seeded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with the random generators reseeded before every call (restored after), so a
    Function that draws random numbers (dropout) is checked on fixed draws, as the server
    replays them on a recompute."""

    def call(*args: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(0)
            return fn(*args)

    return call


def _draws_random_numbers(fn: Callable[..., Any], inputs: tuple[Any, ...]) -> bool:
    """Whether one call of ``fn`` moves the CPU random generator (its state is restored after)."""
    with torch.random.fork_rng(devices=[]):
        before = torch.default_generator.get_state()
        fn(*inputs)
        return not torch.equal(before, torch.default_generator.get_state())


def check_function(entry: RegisteredFunction) -> CheckResult:
    """torch's gradcheck, and gradgradcheck where the backward may be differentiated, in float64.

    Functions registered with ``supports_complex=True`` are checked on complex128
    inputs too (gradcheck then checks PyTorch's conjugate Wirtinger convention). The
    failure detail is gradcheck's own message. Never raises for a misbehaving
    Function: failures come back in the result.
    """
    if not entry.gradcheck:
        return CheckResult(entry.name, "skip", "skip", entry.skip_reason or "declared gradcheck=False")
    samples: list[tuple[str, tuple[Any, ...]]] = []
    apply = _seeded(entry.apply)
    try:
        inputs = tuple(entry.sample_inputs() if entry.sample_inputs else default_sample_inputs(entry.required_inputs or 1))
        samples.append(("float64", inputs))
        if entry.supports_complex:
            samples.append(("complex128", complex_sample(inputs)))
        first = [_verdict(torch.autograd.gradcheck, apply, sample, f"first order ({kind})") for kind, sample in samples]
        if not entry.uses_rng and _draws_random_numbers(entry.apply, inputs):
            first.append("declared uses_rng=False, but its forward drew random numbers: register it without uses_rng=False")
    except Exception as exc:  # noqa: BLE001 - a broken Function is a failed check, not a crash
        return CheckResult(entry.name, "fail", "skip", f"{type(exc).__name__}: {exc}")
    first_verdict = "fail" if any(first) else "pass"
    if not entry.differentiable_backward:
        return CheckResult(entry.name, first_verdict, "skip", "; ".join(d for d in first if d))
    try:
        second = [_verdict(torch.autograd.gradgradcheck, apply, sample, f"second order ({kind})") for kind, sample in samples]
    except Exception as exc:  # noqa: BLE001
        second = [f"second order: {type(exc).__name__}: {exc}"]
    details = "; ".join(d for d in [*first, *second] if d)
    return CheckResult(entry.name, first_verdict, "fail" if any(second) else "pass", details)


def format_table(results: Sequence[CheckResult]) -> str:
    """A plain-text table: function, first order, second order, detail."""
    rows = [("function", "first order", "second order", "detail")]
    rows += [(r.name, r.first_order, r.second_order, r.detail) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows)
