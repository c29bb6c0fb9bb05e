"""Checks on registered Functions: the backward contract at run time, and gradcheck on demand.

1. :func:`contract_checked` wraps an autograd Function so that what its backward returns
   is checked against its forward's inputs on every call: one gradient (or None) per
   input, each a tensor of the input's shape (or one torch would reduce to it) and dtype,
   and None for inputs that cannot have a gradient. The article version of
   ``cube_plus_square`` (one gradient for two inputs) gets a clear error, never a wrong
   gradient.
2. :func:`check_function` runs ``torch.autograd.gradcheck`` (and ``gradgradcheck`` where
   the Function declares double-backward support) in float64 on sample inputs, and
   reports the largest absolute difference between the numerical (central difference)
   and analytical Jacobians. float64 because float32 finite differences raise false
   alarms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ._registry import RegisteredFunction

__all__ = ["BackwardContractError", "CheckResult", "check_function", "contract_checked", "default_sample_inputs", "format_table"]

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
    first_error, second_error : float or None
        Largest |numerical - analytical| Jacobian entry, where computed.
    detail : str
        Why it failed or was skipped; empty on success.
    """

    name: str
    first_order: str
    first_error: float | None
    second_order: str
    second_error: float | None
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


def _differentiable(values: Any) -> list[torch.Tensor]:
    values = values if isinstance(values, tuple) else (values,)
    return [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad]


def _flat_float_outputs(fn: Callable[..., Any], inputs: tuple[Any, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """All floating outputs of ``fn(*inputs)`` flattened into one vector, and the outputs themselves."""
    out = fn(*inputs)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    flat = torch.cat([o.reshape(-1) for o in outs]) if outs else torch.zeros(0, dtype=torch.float64)
    return flat, outs


@dataclass(frozen=True)
class _JacobianError:
    error: float  # max |numerical - analytical|
    numerical: float  # at the worst entry
    analytical: float

    def __str__(self) -> str:
        return f"worst Jacobian entry: numerical {self.numerical:.6g} vs analytical {self.analytical:.6g}"


def _max_jacobian_error(fn: Callable[..., Any], inputs: tuple[Any, ...], eps: float = 1e-6) -> _JacobianError:
    """max |J_numerical - J_analytical|: central differences against reverse mode, entry by entry."""
    wrt = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.enable_grad():
        flat_out, _ = _flat_float_outputs(fn, inputs)
    # Analytical Jacobian first, row by row: perturbing the inputs below would invalidate the graph.
    analytical = torch.zeros(flat_out.numel(), sum(w.numel() for w in wrt), dtype=torch.float64)
    for k in range(flat_out.numel()):
        if not flat_out.requires_grad:
            break
        rows = torch.autograd.grad(flat_out[k], wrt, retain_graph=True, allow_unused=True)
        analytical[k] = torch.cat(
            [(torch.zeros_like(w) if r is None else r).reshape(-1).to(torch.float64) for w, r in zip(wrt, rows)]
        )
    numerical = torch.zeros_like(analytical)
    column = 0
    for w in wrt:
        flat_in = w.detach().view(-1)
        for j in range(flat_in.numel()):
            original = flat_in[j].item()
            values = []
            for delta in (eps, -eps):
                with torch.no_grad():
                    flat_in[j] = original + delta
                # Grad stays enabled: fn may itself differentiate (the second-order check).
                values.append(_flat_float_outputs(fn, inputs)[0].detach())
            with torch.no_grad():
                flat_in[j] = original
            numerical[:, column] = (values[0] - values[1]).to(torch.float64) / (2 * eps)
            column += 1
    if not numerical.numel():
        return _JacobianError(0.0, 0.0, 0.0)
    diff = (numerical - analytical).abs().reshape(-1)
    worst = int(diff.argmax())
    return _JacobianError(float(diff[worst]), float(numerical.reshape(-1)[worst]), float(analytical.reshape(-1)[worst]))


def check_function(entry: RegisteredFunction) -> CheckResult:
    """gradcheck (and gradgradcheck where declared) on ``entry``'s sample inputs, in float64.

    Never raises for a misbehaving Function: failures come back in the result.
    """
    if not entry.gradcheck:
        return CheckResult(entry.name, "skip", None, "skip", None, entry.skip_reason or "declared gradcheck=False")
    try:
        inputs = entry.sample_inputs() if entry.sample_inputs else default_sample_inputs(entry.num_inputs or 1)
        inputs = tuple(inputs)
        first_ok = torch.autograd.gradcheck(entry.apply, inputs, raise_exception=False)
        first = _max_jacobian_error(entry.apply, inputs)
    except Exception as exc:  # noqa: BLE001 - a broken Function is a failed check, not a crash
        return CheckResult(entry.name, "fail", None, "skip", None, f"{type(exc).__name__}: {exc}")
    first_verdict = "pass" if first_ok else "fail"
    first_detail = "" if first_ok else f"first order: {first}"
    if not entry.double_backward:
        return CheckResult(entry.name, first_verdict, first.error, "skip", None, first_detail)
    try:
        # Ones as cotangents, so the reported error is that of d/dx of the plain gradient.
        cotangents = [torch.ones_like(o) for o in _differentiable(entry.apply(*inputs))]
        second_ok = torch.autograd.gradgradcheck(entry.apply, inputs, raise_exception=False)

        def vjp(*args: Any) -> tuple[torch.Tensor, ...]:
            out = _differentiable(entry.apply(*args))
            wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            grads = torch.autograd.grad(out, wrt, cotangents, create_graph=True, allow_unused=True)
            return tuple(gr if gr is not None else torch.zeros_like(w).requires_grad_() for gr, w in zip(grads, wrt))

        second = _max_jacobian_error(vjp, inputs)
    except Exception as exc:  # noqa: BLE001
        return CheckResult(entry.name, first_verdict, first.error, "fail", None, f"second order: {type(exc).__name__}: {exc}")
    details = [first_detail, "" if second_ok else f"second order: {second}"]
    return CheckResult(
        entry.name, first_verdict, first.error, "pass" if second_ok else "fail", second.error, "; ".join(d for d in details if d)
    )


def format_table(results: Sequence[CheckResult]) -> str:
    """A plain-text table: function, first order (result, max abs error), second order, detail."""

    def cell(result: str, err: float | None) -> str:
        return result if err is None else f"{result} ({err:.2e})"

    rows = [("function", "first order (max abs err)", "second order (max abs err)", "detail")]
    rows += [(r.name, cell(r.first_order, r.first_error), cell(r.second_order, r.second_error), r.detail) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows)
