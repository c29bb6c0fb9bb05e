"""Execution runtime: runs registered Functions' forward and backward on one device.

Knows nothing of gRPC or protobuf, so it can be tested and benchmarked without a
network. Arguments arrive as CPU tensors (leaves, ``requires_grad`` set as the caller
asked) and Python scalars; they go to the device once. Outputs and gradients leave as
device tensors that the caller moves to the host once (when it encodes them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._checks import BackwardContractError
from ._errors import (
    Abandoned,
    FunctionError,
    FunctionNotFound,
    FunctionUnavailable,
    InvalidArgument,
    NonFinite,
    ResourceExhausted,
    VersionMismatch,
)
from ._handles import Graph, HandleStore
from ._registry import RegisteredFunction, Registry

__all__ = ["ForwardResult", "Runtime", "resolve_device"]

log = logging.getLogger(__name__)


def _always() -> bool:
    return True


def _ensure_active(is_active: Callable[[], bool], entry: RegisteredFunction, step: str) -> None:
    if not is_active():
        raise Abandoned(f"{entry.name}: caller gone (deadline passed or cancelled) before {step}; work abandoned")


def resolve_device(spec: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a device.

    ``auto`` picks ``cuda`` when a GPU is visible, else ``cpu``.

    Raises
    ------
    ValueError
        Unknown spec, or CUDA asked for where none is available (never a silent CPU
        fallback).
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return device


@dataclass(frozen=True)
class ForwardResult:
    """What a forward gives back.

    Attributes
    ----------
    outputs
        The Function's outputs, detached, on the server's device.
    returns_tuple
        Whether the Function returned a tuple rather than a bare tensor.
    differentiable
        Per output: whether a backward can flow through it.
    version
        Version of the Function that ran.
    handle
        Key of the kept graph, or ``None``.
    """

    outputs: tuple[torch.Tensor, ...]
    returns_tuple: bool
    differentiable: tuple[bool, ...]
    version: str
    handle: str | None = None
    pending: Graph | None = dataclasses.field(default=None, repr=False, compare=False)


class Runtime:
    """Runs registered Functions on one device. Thread-safe; many calls may run at once.

    Parameters
    ----------
    registry
        Functions to serve.
    device
        Where forward and backward run.
    max_handles, max_handle_bytes, handle_ttl_s
        Bounds of the store of graphs kept for a later backward: count, bytes, and
        seconds without a backward (see :class:`HandleStore`).
    check_finite
        Fail calls whose outputs or gradients hold NaN or Inf (:class:`NonFinite`).
    unavailable
        Registered names not to serve, with the reason (failed start-up checks).

    Every operation takes ``is_active``, a callable that turns False when the caller
    has gone (deadline passed, cancelled): the work is then abandoned at the next step
    boundary with :class:`Abandoned`, and no graph is kept. Python cannot interrupt a
    Function midway, so a step that has started runs to its end.
    """

    def __init__(
        self,
        registry: Registry,
        device: torch.device | str = "cpu",
        *,
        max_handles: int = 1024,
        max_handle_bytes: int = 2**31,
        handle_ttl_s: float = 300.0,
        check_finite: bool = False,
        unavailable: dict[str, str] | None = None,
    ) -> None:
        self.registry = registry
        self.device = torch.device(device)
        self.handles = HandleStore(max_handles, max_handle_bytes, handle_ttl_s)
        self.check_finite = check_finite
        self.unavailable = dict(unavailable or {})

    # -- public operations -------------------------------------------------------------

    def function(self, name: str) -> RegisteredFunction:
        """The registered Function ``name``; raises :class:`FunctionNotFound`."""
        entry = self.registry.get(name)
        if entry is None:
            known = ", ".join(f.name for f in self.registry) or "none"
            shown = repr(name) if len(name) <= 128 else f"{name[:128]!r}... ({len(name)} characters)"
            raise FunctionNotFound(f"no function named {shown}; this server serves: {known}")
        if name in self.unavailable:
            raise FunctionUnavailable(f"{name} is not served: {self.unavailable[name]}")
        return entry

    def forward(
        self,
        name: str,
        args: Sequence[Any],
        *,
        keep_graph: bool = False,
        is_active: Callable[[], bool] = _always,
        owner: str = "",
        defer_keep: bool = False,
    ) -> ForwardResult:
        """Run forward under autograd.

        Parameters
        ----------
        name
            Registered Function name.
        args
            Positional arguments: CPU tensors (``requires_grad`` as the caller wants
            gradients) and Python scalars.
        keep_graph
            Keep the graph and return a handle for :meth:`backward`.
        owner
            The caller's identity; only the same owner can use or release the handle.
        defer_keep
            Do not store the graph yet: the result carries its future handle and the
            graph in ``pending``, and :meth:`keep` stores it once the reply is sure to
            go out (a refused reply then keeps nothing and evicts nothing).

        Raises
        ------
        FunctionNotFound, FunctionUnavailable, InvalidArgument, FunctionError, NonFinite,
        ResourceExhausted, Abandoned
        """
        entry = self.function(name)
        dev_args = self._prepare(entry, args)
        outputs = self._run_forward(entry, dev_args, is_active)
        result = self._result(entry, outputs)
        _ensure_active(is_active, entry, "keeping the graph")
        if keep_graph and any(result.differentiable):
            graph = Graph(entry, dev_args, outputs[0])
            if defer_keep:
                handle = self.handles.new_handle() if self.handles.fits(graph) else None
                return dataclasses.replace(result, handle=handle, pending=graph if handle else None)
            return dataclasses.replace(result, handle=self.handles.put(graph, owner))
        return result

    def keep(self, result: ForwardResult, owner: str = "") -> None:
        """Store the graph of a ``defer_keep`` forward under its handle, for ``owner``."""
        if result.pending is not None and result.handle:
            self.handles.put(result.pending, owner, handle=result.handle)

    def backward(
        self,
        name: str,
        *,
        handle: str | None = None,
        args: Sequence[Any] | None = None,
        grad_outputs: Sequence[torch.Tensor | None] | None = None,
        version: str = "",
        is_active: Callable[[], bool] = _always,
        owner: str = "",
    ) -> list[torch.Tensor | None]:
        """Vector-Jacobian product of a forward's outputs with ``grad_outputs``.

        The graph comes from ``handle`` (released once the backward succeeds; a failed
        backward leaves it for another try; only ``owner``, the identity that made it,
        can use it) or is recomputed from ``args``; the gradients are identical either way.

        Parameters
        ----------
        grad_outputs
            One CPU tensor or None per output, shaped and typed like it; ``None`` (the
            whole sequence) means ones for every differentiable output.
        version
            Version of the Function the forward ran; when given and different from
            the one served (or the one that made the handle), :class:`VersionMismatch`.

        Returns
        -------
        list
            One entry per argument: its gradient on the device, or None where the
            argument is not a tensor requiring grad or the Function gave no gradient.

        Raises
        ------
        HandleNotFound, and what :meth:`forward` raises
        """
        if (handle is None) == (args is None):
            raise InvalidArgument("backward needs either a graph handle or the arguments to recompute, not both")
        entry = self.function(name)
        if version and version != entry.version:
            raise VersionMismatch(
                f"{name}: the forward ran version {version[:64]}, this server serves version {entry.version}; "
                "run the forward again"
            )
        if handle is not None:
            # Taken out of the store at once: of two backwards racing on one handle, the
            # second gets HandleNotFound (and recomputes), never a half-used graph.
            graph = self.handles.take(handle, owner)
            try:
                if graph.function.name != name:
                    raise InvalidArgument(f"handle belongs to function {graph.function.name!r}, not {name!r}")
                cotangents = self._check_grad_outputs(graph.function, graph.outputs, grad_outputs)
                if graph.function.version != entry.version:  # the Function was re-registered since
                    raise VersionMismatch(
                        f"{name}: the handle's graph is of version {graph.function.version}, "
                        f"this server serves version {entry.version}; run the forward again"
                    )
                # retain_graph: a backward that fails midway leaves the graph whole for another try.
                return self._vjp(graph.function, graph.args, graph.outputs, cotangents, is_active, retain_graph=True)
            except BaseException:
                self.handles.restore(handle, graph)  # only a successful backward releases the handle
                raise
        dev_args = self._prepare(entry, args or ())
        outputs, _ = self._run_forward(entry, dev_args, is_active)
        cotangents = self._check_grad_outputs(entry, outputs, grad_outputs)
        return self._vjp(entry, dev_args, outputs, cotangents, is_active)

    def forward_backward(
        self,
        name: str,
        args: Sequence[Any],
        grad_outputs: Sequence[torch.Tensor | None] | None = None,
        is_active: Callable[[], bool] = _always,
    ) -> tuple[ForwardResult, list[torch.Tensor | None]]:
        """Forward, then backward on the same graph; nothing is kept. Errors as both."""
        entry = self.function(name)
        dev_args = self._prepare(entry, args)
        outputs = self._run_forward(entry, dev_args, is_active)
        cotangents = self._check_grad_outputs(entry, outputs[0], grad_outputs)
        return self._result(entry, outputs), self._vjp(entry, dev_args, outputs[0], cotangents, is_active)

    # -- steps -------------------------------------------------------------------------

    def _prepare(self, entry: RegisteredFunction, args: Sequence[Any]) -> list[Any]:
        if entry.num_inputs is not None and len(args) != entry.num_inputs:
            raise InvalidArgument(
                f"{entry.name} takes {entry.num_inputs} argument{'s' * (entry.num_inputs != 1)}, got {len(args)}"
            )
        # Each tensor crosses to the device once and becomes a leaf there.
        return [a.detach().to(self.device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]

    def _run_forward(
        self, entry: RegisteredFunction, dev_args: list[Any], is_active: Callable[[], bool]
    ) -> tuple[tuple[torch.Tensor, ...], bool]:
        _ensure_active(is_active, entry, "forward")
        needs_grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in dev_args)
        with self._guard(entry, "forward"), torch.set_grad_enabled(needs_grad):
            out = entry.apply(*dev_args)
        if isinstance(out, torch.Tensor):
            self._check_finite(entry, "output", (out,))
            return (out,), False
        if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
            self._check_finite(entry, "output", out)
            return tuple(out), True
        got = (
            type(out).__name__
            if not isinstance(out, (tuple, list))
            else f"{type(out).__name__} of {[type(o).__name__ for o in out]}"
        )
        raise FunctionError(f"{entry.name} forward returned {got}; expected a tensor or a non-empty tuple of tensors")

    @staticmethod
    def _result(entry: RegisteredFunction, outputs: tuple[tuple[torch.Tensor, ...], bool]) -> ForwardResult:
        tensors, returns_tuple = outputs
        return ForwardResult(
            outputs=tuple(t.detach() for t in tensors),
            returns_tuple=returns_tuple,
            differentiable=tuple(t.requires_grad for t in tensors),
            version=entry.version,
        )

    def _vjp(
        self,
        entry: RegisteredFunction,
        dev_args: list[Any],
        outputs: tuple[torch.Tensor, ...],
        cotangents: Sequence[torch.Tensor | None],
        is_active: Callable[[], bool],
        retain_graph: bool = False,
    ) -> list[torch.Tensor | None]:
        _ensure_active(is_active, entry, "backward")
        pairs = [(o, g) for o, g in zip(outputs, cotangents) if g is not None and o.requires_grad]
        wanted = [i for i, a in enumerate(dev_args) if isinstance(a, torch.Tensor) and a.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(dev_args)
        if not pairs or not wanted:
            return grads
        with self._guard(entry, "backward"):
            computed = torch.autograd.grad(
                [o for o, _ in pairs],
                [dev_args[i] for i in wanted],
                [g for _, g in pairs],
                allow_unused=True,
                retain_graph=retain_graph,
            )
        for i, g in zip(wanted, computed):
            grads[i] = g
        self._check_finite(entry, "gradient", grads)
        return grads

    def _check_finite(self, entry: RegisteredFunction, what: str, tensors: Sequence[torch.Tensor | None]) -> None:
        if not self.check_finite:
            return
        for i, t in enumerate(tensors):
            if t is not None and (t.is_floating_point() or t.is_complex()):
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise NonFinite(f"{entry.name} {what} {i} holds {bad} NaN or Inf value(s) of {t.numel()} (--check-finite)")

    def _check_grad_outputs(
        self,
        entry: RegisteredFunction,
        outputs: tuple[torch.Tensor, ...],
        grad_outputs: Sequence[torch.Tensor | None] | None,
    ) -> list[torch.Tensor | None]:
        if grad_outputs is None or len(grad_outputs) == 0:
            # Ones broadcast from one element: the gradient of out.sum(), as autograd itself
            # passes it, without allocating an output-sized tensor.
            return [torch.ones((), dtype=o.dtype, device=o.device).expand_as(o) if o.requires_grad else None for o in outputs]
        if len(grad_outputs) != len(outputs):
            raise InvalidArgument(f"{entry.name} returned {len(outputs)} output(s), got {len(grad_outputs)} grad_outputs")
        checked: list[torch.Tensor | None] = []
        for i, (o, g) in enumerate(zip(outputs, grad_outputs)):
            if g is None:
                checked.append(None)
                continue
            if not o.requires_grad:
                raise InvalidArgument(
                    f"{entry.name} output {i} ({str(o.dtype).removeprefix('torch.')}) is not differentiable; "
                    "send none as its grad_output"
                )
            if g.shape != o.shape or g.dtype != o.dtype:
                raise InvalidArgument(
                    f"{entry.name} grad_outputs[{i}]: expected {str(o.dtype).removeprefix('torch.')} "
                    f"of shape {list(o.shape)}, got {str(g.dtype).removeprefix('torch.')} of shape {list(g.shape)}"
                )
            checked.append(g.to(self.device))
        return checked

    @contextlib.contextmanager
    def _guard(self, entry: RegisteredFunction, phase: str) -> Iterator[None]:
        """Turn what a user's forward or backward raises into FunctionError / ResourceExhausted."""
        try:
            yield
        except BackwardContractError as exc:
            log.warning("%s", exc)
            raise FunctionError(str(exc)) from exc
        except BaseException as exc:  # SystemExit, KeyboardInterrupt too: a Function can neither stop the server nor hang the call
            if isinstance(exc, Exception) and _is_out_of_memory(exc):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise ResourceExhausted(f"{entry.name} {phase}: out of memory on {self.device}: {exc}") from exc
            log.warning("%s %s raised", entry.name, phase, exc_info=exc)
            raise FunctionError(f"{entry.name} {phase} raised {type(exc).__name__}: {exc}") from exc


def _is_out_of_memory(exc: Exception) -> bool:
    # CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError saying so.
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
