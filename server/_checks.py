"""Checks on registered Functions: the backward contract at run time, and gradcheck on demand.

1. :func:`contract_checked` wraps an autograd Function so that what its backward returns
   is checked against its forward's inputs on every call: one gradient (or None) per
   input, each a tensor of the input's shape (or one torch would reduce to it) and dtype,
   and None for inputs that cannot have a gradient. The article version of
   ``cube_plus_square`` (one gradient for two inputs) gets a clear error, never a wrong
   gradient.
2. :func:`check_function` runs ``torch.autograd.gradcheck`` (and ``gradgradcheck`` where
   the backward may be differentiated) in float64 on sample inputs, and in complex128
   for Functions that declare complex support, and reports gradcheck's own message
   on failure. float64 because float32 finite differences raise false alarms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.gradcheck import GradcheckError

if TYPE_CHECKING:
    from ._registry import RegisteredFunction

__all__ = [
    "BackwardContractError",
    "CheckResult",
    "check_function",
    "complex_sample",
    "contract_checked",
    "default_sample_inputs",
    "format_table",
]

_META = "_gradserve_input_meta"


class BackwardContractError(RuntimeError):
    """A Function's backward returned the wrong number, kind, shape or dtype of gradients."""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _input_meta(inputs: Sequence[Any]) -> tuple[tuple[tuple[int, ...], torch.dtype] | None, ...]:
    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else None for a in inputs)


def _check_grads(name: str, meta: Sequence[Any], grads: Any) -> tuple[Any, ...]:
    grads = grads if isinstance(grads, tuple) else (grads,)
    if len(grads) > len(meta) and all(g is None for g in grads[len(meta) :]):
        # As torch does: trailing Nones for parameters the call left to their defaults.
        grads = grads[: len(meta)]
    if len(grads) != len(meta):
        raise BackwardContractError(
            f"{name} backward returned {_plural(len(grads), 'gradient')} for {_plural(len(meta), 'input')}; "
            "return one gradient (or None) per forward input"
        )
    for i, (grad, m) in enumerate(zip(grads, meta)):
        if grad is None:
            continue
        if not isinstance(grad, torch.Tensor):
            raise BackwardContractError(
                f"{name} backward returned a {type(grad).__name__} for argument {i}; expected a tensor or None"
            )
        if m is None:
            raise BackwardContractError(
                f"{name} backward returned a gradient for argument {i}, which is not a tensor; expected None"
            )
        shape, dtype = m
        if not (dtype.is_floating_point or dtype.is_complex):
            raise BackwardContractError(
                f"{name} backward returned a gradient for argument {i}, a {_dtype_name(dtype)} tensor that cannot "
                "have one; expected None"
            )
        if tuple(grad.shape) != shape and not _reducible(shape, tuple(grad.shape)):
            raise BackwardContractError(
                f"{name} backward: gradient for argument {i}: got shape {list(grad.shape)}, expected {list(shape)}"
            )
        if grad.dtype != dtype:
            raise BackwardContractError(
                f"{name} backward: gradient for argument {i}: got dtype {_dtype_name(grad.dtype)}, "
                f"expected {_dtype_name(dtype)} (the argument's dtype)"
            )
    return grads


def _reducible(shape: tuple[int, ...], grad_shape: tuple[int, ...]) -> bool:
    """Whether torch would sum a gradient of ``grad_shape`` down to ``shape`` (input broadcast in forward)."""
    try:
        return tuple(torch.broadcast_shapes(shape, grad_shape)) == grad_shape
    except RuntimeError:
        return False


def contract_checked(cls: type[torch.autograd.Function], name: str) -> type[torch.autograd.Function]:
    """A subclass of ``cls`` whose backward output is checked; forward and backward math are ``cls``'s.

    Raises (from backward) :class:`BackwardContractError` with a message naming ``name``,
    the argument, what was expected and what arrived.
    """
    namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    if cls.setup_context is torch.autograd.Function.setup_context:  # forward(ctx, *args)

        def forward(ctx: Any, *args: Any) -> Any:
            setattr(ctx, _META, _input_meta(args))
            return cls.forward(ctx, *args)

        namespace["forward"] = staticmethod(forward)
    else:  # forward(*args) + setup_context(ctx, inputs, output)

        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> Any:
            setattr(ctx, _META, _input_meta(inputs))
            return cls.setup_context(ctx, inputs, output)

        namespace["setup_context"] = staticmethod(setup_context)

    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        return _check_grads(name, getattr(ctx, _META), cls.backward(ctx, *grad_outputs))

    namespace["backward"] = staticmethod(backward)
    return type(cls.__name__, (cls,), namespace)


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
