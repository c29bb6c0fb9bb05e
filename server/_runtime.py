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
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._contract import BackwardContractError, dtype_name
from ._errors import (
    Abandoned,
    DoubleBackwardUnsupported,
    FunctionError,
    FunctionNotFound,
    FunctionUnavailable,
    InvalidArgument,
    NonFinite,
    ResourceExhausted,
    RngMismatch,
    VersionMismatch,
)
from ._handles import Graph, HandleStore
from ._registry import RegisteredFunction, Registry

__all__ = ["BackwardResult", "ForwardResult", "RngReplay", "Runtime", "resolve_device"]

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
class RngReplay:
    """How to replay a forward's randomness on a recompute (``gradserve.v1.RngReplay``).

    Attributes
    ----------
    seed
        Seed every random generator (CPU and the runtime's device) had when the
        forward started.
    device_type
        ``"cpu"`` or ``"cuda"``: the same seed gives the same numbers only on the
        same kind of generator.
    torch_version
        ``torch.__version__`` of the server that ran the forward; kernels may draw
        differently across versions.
    """

    seed: int
    device_type: str
    torch_version: str


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
    rng
        Set when the forward drew random numbers: send it with a recompute.
    """

    outputs: tuple[torch.Tensor, ...]
    returns_tuple: bool
    differentiable: tuple[bool, ...]
    version: str
    handle: str | None = None
    rng: RngReplay | None = None
    pending: Graph | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class BackwardResult:
    """What a backward gives back.

    Attributes
    ----------
    grads
        One entry per input of the graph (positional arguments, keyword arguments,
        then the lower-order cotangents for orders >= 2): the gradient on the
        device, or None where the input is not a tensor requiring grad or got none.
        With ``keep_graph``, a gradient's ``requires_grad`` tells whether it can be
        differentiated again.
    handle
        With ``keep_graph``: key of the graph of these gradients, for a backward of
        the next order; None when no gradient is differentiable.
    """

    grads: list[torch.Tensor | None]
    handle: str | None = None


@dataclass
class _Chain:
    """The graph a backward differentiates: its inputs (flat, leaves on the device) and outputs."""

    inputs: list[Any]
    outputs: tuple[torch.Tensor | None, ...]
    order: int  # 0: a forward's graph; k: the gradients of order k


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

    Exactness, as local autograd:

    - Grad mode in forward is on unless the caller asks otherwise, as in PyTorch, so a
      Function may differentiate inside its forward.
    - Randomness: a forward runs with the random generators (CPU and the device)
      seeded from the caller's seed (or one drawn from the global generator), inside
      ``torch.random.fork_rng``. When it drew numbers, the seed is returned
      (:class:`RngReplay`) and a recompute replays it, as ``torch.utils.checkpoint``'s
      ``preserve_rng_state``. The generators are process-wide, so the forwards and
      backwards of Functions that may draw random numbers run one at a time; those
      registered with ``uses_rng=False`` run concurrently, outside that lock.
      Randomness drawn in a backward is not replayed (it is not part of the
      forward's result).
    - Higher order: a backward with ``keep_graph`` runs with ``create_graph=True`` and
      keeps the graph of its gradients, for a backward of the next order, by handle
      or by recompute (``lower_order``).
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
        self._rng_lock = threading.Lock()

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
        kwargs: Mapping[str, Any] | None = None,
        *,
        keep_graph: bool = False,
        grad_enabled: bool = True,
        seed: int | None = None,
        is_active: Callable[[], bool] = _always,
        owner: str = "",
        defer_keep: bool = False,
    ) -> ForwardResult:
        """Run forward under autograd.

        Parameters
        ----------
        name
            Registered Function name.
        args, kwargs
            Positional and keyword arguments: CPU tensors (``requires_grad`` as the
            caller wants gradients) and Python scalars. Defaults fill what is left out.
        keep_graph
            Keep the graph and return a handle for :meth:`backward`.
        grad_enabled
            Grad mode during forward (the caller's ``torch.is_grad_enabled()``).
        owner
            The caller's identity; only the same owner can use or release the handle.
        defer_keep
            Do not store the graph yet: the result carries its future handle and the
            graph in ``pending``, and :meth:`keep` stores it once the reply is sure to
            go out (a refused reply then keeps nothing and evicts nothing).
        seed
            Seed of the random generators (the caller's); None draws one.

        Raises
        ------
        FunctionNotFound, FunctionUnavailable, InvalidArgument, FunctionError, NonFinite,
        ResourceExhausted, Abandoned
        """
        entry = self.function(name)
        inputs, call = self._prepare(entry, args, kwargs)
        outputs, returns_tuple, rng = self._run_forward(entry, call, is_active, grad_enabled=grad_enabled, seed=seed)
        result = self._result(entry, outputs, returns_tuple, rng)
        _ensure_active(is_active, entry, "keeping the graph")
        if keep_graph and any(result.differentiable):
            graph = Graph(entry, inputs, outputs)
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
        kwargs: Mapping[str, Any] | None = None,
        grad_outputs: Sequence[torch.Tensor | None] | None = None,
        lower_order: Sequence[Sequence[torch.Tensor | None]] = (),
        keep_graph: bool = False,
        rng: RngReplay | None = None,
        version: str = "",
        is_active: Callable[[], bool] = _always,
        owner: str = "",
    ) -> BackwardResult:
        """Vector-Jacobian product of a graph's outputs with ``grad_outputs``.

        The graph comes from ``handle`` (released once the backward succeeds; a failed
        backward leaves it for another try; only ``owner``, the identity that made it,
        can use it) or is recomputed from ``args`` and ``kwargs`` (randomness replayed
        from ``rng``); the gradients are identical either way. A graph kept with
        ``keep_graph`` belongs to ``owner`` too.

        Parameters
        ----------
        grad_outputs
            One CPU tensor or None per output of the graph, shaped and typed like it;
            ``None`` (the whole sequence) means ones for every differentiable output.
            A tensor that requires grad becomes a leaf of the kept graph.
        lower_order
            With a recompute, for a backward of order k >= 2: the cotangents of orders
            1 .. k-1; the graph of order j-1 is rebuilt and differentiated with each.
        keep_graph
            Compute with ``create_graph=True`` and keep the gradients' graph
            (:attr:`BackwardResult.handle`).
        version
            Version of the Function the forward ran; when given and different from
            the one served (or the one that made the handle), :class:`VersionMismatch`.

        Raises
        ------
        HandleNotFound, DoubleBackwardUnsupported, RngMismatch, and what :meth:`forward`
        raises
        """
        if (handle is None) == (args is None):
            raise InvalidArgument("backward needs either a graph handle or the arguments to recompute, not both")
        if handle is not None and (kwargs or lower_order or rng):
            raise InvalidArgument("keyword arguments, lower_order and rng go with a recompute, not with a handle")
        entry = self.function(name)
        if version and version != entry.version:
            raise VersionMismatch(
                f"{name}: the forward ran version {version[:64]}, this server serves version {entry.version}; "
                "run the forward again"
            )
        if (keep_graph or lower_order) and not entry.differentiable_backward:
            why = (
                "its backward is marked @once_differentiable"
                if entry.once_differentiable
                else "it is not registered with double_backward=True, so its backward is not known to be differentiable. "
                "Register it with @register(..., double_backward=True) once `gradserve check` passes its second order "
                "(gradgradcheck)"
            )
            raise DoubleBackwardUnsupported(f"{name} cannot be differentiated twice (create_graph=True): {why}")
        if handle is not None:
            # Taken out of the store at once: of two backwards racing on one handle, the
            # second gets HandleNotFound (and recomputes), never a half-used graph.
            graph = self.handles.take(handle, owner)
            try:
                if graph.function.name != name:
                    raise InvalidArgument(f"handle belongs to function {graph.function.name!r}, not {name!r}")
                cotangents = self._check_grad_outputs(graph.function, graph.outputs, grad_outputs, graph.order)
                if graph.function.version != entry.version:  # the Function was re-registered since
                    raise VersionMismatch(
                        f"{name}: the handle's graph is of version {graph.function.version}, "
                        f"this server serves version {entry.version}; run the forward again"
                    )
                chain = _Chain(graph.inputs, graph.outputs, graph.order)
                # retain_graph: a backward that fails midway leaves the graph whole for another try.
                return self._vjp(graph.function, chain, cotangents, keep_graph, is_active, owner, retain_graph=True)
            except BaseException:
                self.handles.restore(handle, graph)  # only a successful backward releases the handle
                raise
        chain = self._recompute(entry, args or (), kwargs, rng, lower_order, is_active)
        cotangents = self._check_grad_outputs(entry, chain.outputs, grad_outputs, chain.order)
        return self._vjp(entry, chain, cotangents, keep_graph, is_active, owner)

    def forward_backward(
        self,
        name: str,
        args: Sequence[Any],
        grad_outputs: Sequence[torch.Tensor | None] | None = None,
        is_active: Callable[[], bool] = _always,
        kwargs: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> tuple[ForwardResult, list[torch.Tensor | None]]:
        """Forward, then backward on the same graph; nothing is kept. Errors as both.

        The gradients are aligned with the positional, then keyword arguments.
        """
        entry = self.function(name)
        inputs, call = self._prepare(entry, args, kwargs)
        outputs, returns_tuple, rng = self._run_forward(entry, call, is_active, seed=seed)
        cotangents = self._check_grad_outputs(entry, outputs, grad_outputs, 0)
        grads = self._vjp(entry, _Chain(inputs, outputs, 0), cotangents, False, is_active).grads
        return self._result(entry, outputs, returns_tuple, rng), grads

    # -- steps -------------------------------------------------------------------------

    def _prepare(
        self, entry: RegisteredFunction, args: Sequence[Any], kwargs: Mapping[str, Any] | None
    ) -> tuple[list[Any], tuple[tuple[Any, ...], dict[str, Any]]]:
        """Device leaves for the arguments: (flat inputs, (positional, keyword) to call ``apply`` with)."""
        kwargs = dict(kwargs or {})
        try:
            entry.bind(args, kwargs)  # the caller's mistake, found before any tensor moves
        except TypeError as exc:
            raise InvalidArgument(str(exc)) from None
        # Each tensor crosses to the device once and becomes a leaf there.
        dev_args = [self._to_device(a) for a in args]
        dev_kwargs = {k: self._to_device(v) for k, v in kwargs.items()}
        return [*dev_args, *dev_kwargs.values()], entry.bind(dev_args, dev_kwargs)

    def _to_device(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return value.detach().to(self.device).requires_grad_(value.requires_grad)

    def _recompute(
        self,
        entry: RegisteredFunction,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        rng: RngReplay | None,
        lower_order: Sequence[Sequence[torch.Tensor | None]],
        is_active: Callable[[], bool],
    ) -> _Chain:
        """Rebuild the graph a backward of order ``len(lower_order) + 1`` differentiates."""
        if rng is not None and (rng.device_type != self.device.type or rng.torch_version != torch.__version__):
            raise RngMismatch(
                f"{entry.name}: the forward drew random numbers on {rng.device_type[:16]!r} "
                f"with torch {rng.torch_version[:32]!r}; "
                f"this server runs on {self.device.type} with torch {torch.__version__} and cannot draw the same numbers "
                "again. Run the forward again, or send the backward to a server like the one that ran it"
            )
        inputs, call = self._prepare(entry, args, kwargs)
        outputs, _, _ = self._run_forward(entry, call, is_active, replay=rng)
        chain = _Chain(inputs, outputs, 0)
        for k, cotangents in enumerate(lower_order):
            checked = self._check_grad_outputs(entry, chain.outputs, cotangents, chain.order, f"lower_order[{k}]")
            chain = self._differentiate(entry, chain, checked, True)
        return chain

    def _run_forward(
        self,
        entry: RegisteredFunction,
        call: tuple[tuple[Any, ...], dict[str, Any]],
        is_active: Callable[[], bool],
        *,
        grad_enabled: bool = True,
        seed: int | None = None,
        replay: RngReplay | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], bool, RngReplay | None]:
        """Run forward with seeded generators: (outputs, returned a tuple, the seed if it drew numbers)."""
        _ensure_active(is_active, entry, "forward")
        args, kwargs = call
        rng = None
        if not entry.uses_rng:  # declared deterministic: concurrent, nothing to replay
            with self._guard(entry, "forward"), torch.set_grad_enabled(grad_enabled):
                out = entry.apply(*args, **kwargs)
        else:
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with self._rng_lock:  # the generators are process-wide: one Function drawing at a time
                if replay is not None:
                    seed = replay.seed
                elif seed is None:
                    seed = int(torch.randint(0, 2**63 - 1, ()).item())
                with torch.random.fork_rng(devices=devices, device_type="cuda"):
                    torch.default_generator.manual_seed(seed)
                    if devices:
                        torch.cuda.default_generators[devices[0]].manual_seed(seed)
                    before = self._rng_states()
                    with self._guard(entry, "forward"), torch.set_grad_enabled(grad_enabled):
                        out = entry.apply(*args, **kwargs)
                    drew = not all(torch.equal(a, b) for a, b in zip(before, self._rng_states()))
            rng = RngReplay(seed, self.device.type, torch.__version__) if drew else None
        if isinstance(out, torch.Tensor):
            self._check_finite(entry, "output", (out,))
            return (out,), False, rng
        if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
            self._check_finite(entry, "output", out)
            return tuple(out), True, rng
        got = (
            type(out).__name__
            if not isinstance(out, (tuple, list))
            else f"{type(out).__name__} of {[type(o).__name__ for o in out]}"
        )
        raise FunctionError(f"{entry.name} forward returned {got}; expected a tensor or a non-empty tuple of tensors")

    def _rng_states(self) -> list[torch.Tensor]:
        states = [torch.default_generator.get_state()]
        if self.device.type == "cuda":
            states.append(torch.cuda.get_rng_state(self.device))
        return states

    @staticmethod
    def _result(
        entry: RegisteredFunction, outputs: tuple[torch.Tensor, ...], returns_tuple: bool, rng: RngReplay | None
    ) -> ForwardResult:
        return ForwardResult(
            outputs=tuple(t.detach() for t in outputs),
            returns_tuple=returns_tuple,
            differentiable=tuple(t.requires_grad for t in outputs),
            version=entry.version,
            rng=rng,
        )

    def _vjp(
        self,
        entry: RegisteredFunction,
        chain: _Chain,
        cotangents: Sequence[torch.Tensor | None],
        keep_graph: bool,
        is_active: Callable[[], bool],
        owner: str = "",
        retain_graph: bool = False,
    ) -> BackwardResult:
        _ensure_active(is_active, entry, "backward")
        result = self._differentiate(entry, chain, cotangents, keep_graph, retain_graph=retain_graph)
        self._check_finite(entry, "gradient", result.outputs[: len(chain.inputs)])
        handle = None
        if keep_graph and any(g is not None and g.requires_grad for g in result.outputs):
            _ensure_active(is_active, entry, "keeping the graph")
            handle = self.handles.put(Graph(entry, result.inputs, result.outputs, result.order), owner)
        return BackwardResult(list(result.outputs), handle)

    def _differentiate(
        self,
        entry: RegisteredFunction,
        chain: _Chain,
        cotangents: Sequence[torch.Tensor | None],
        create_graph: bool,
        retain_graph: bool = False,
    ) -> _Chain:
        """The next order: gradients of ``chain``'s outputs with respect to its inputs.

        With ``create_graph`` the gradients carry their own graph, whose inputs are
        ``chain``'s inputs followed by ``cotangents``.
        """
        pairs = [(o, g) for o, g in zip(chain.outputs, cotangents) if g is not None and o is not None and o.requires_grad]
        wanted = [i for i, a in enumerate(chain.inputs) if isinstance(a, torch.Tensor) and a.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(chain.inputs)
        if pairs and wanted:
            phase = "backward" if chain.order == 0 else f"backward of order {chain.order + 1}"
            # A backward that draws random numbers must not shift a seeded forward's stream.
            lock = self._rng_lock if entry.uses_rng else contextlib.nullcontext()
            with lock, self._guard(entry, phase), torch.enable_grad() if create_graph else contextlib.nullcontext():
                computed = torch.autograd.grad(
                    [o for o, _ in pairs],
                    [chain.inputs[i] for i in wanted],
                    [g for _, g in pairs],
                    allow_unused=True,
                    create_graph=create_graph,
                    retain_graph=retain_graph or create_graph,
                )
            for i, g in zip(wanted, computed):
                grads[i] = g
        return _Chain([*chain.inputs, *cotangents], tuple(grads), chain.order + 1)

    def _check_finite(self, entry: RegisteredFunction, what: str, tensors: Sequence[torch.Tensor | None]) -> None:
        if not self.check_finite:
            return
        for i, t in enumerate(tensors):
            if t is not None and (t.is_floating_point() or t.is_complex()):
                values = t._values() if t.layout == torch.sparse_coo else t
                if values.element_size() == 1:  # float8: torch has no isfinite for it; float16 holds every value
                    values = values.to(torch.float16)
                bad = int((~torch.isfinite(values)).sum())
                if bad:
                    raise NonFinite(
                        f"{entry.name} {what} {i} holds {bad} NaN or Inf value(s) of {values.numel()} (--check-finite)"
                    )

    def _check_grad_outputs(
        self,
        entry: RegisteredFunction,
        outputs: tuple[torch.Tensor | None, ...],
        grad_outputs: Sequence[torch.Tensor | None] | None,
        order: int,
        field: str = "grad_outputs",
    ) -> list[torch.Tensor | None]:
        what = "output" if order == 0 else f"order-{order} gradient"
        if grad_outputs is None or len(grad_outputs) == 0:
            # Ones broadcast from one element: the gradient of out.sum(), as autograd itself
            # passes it, without allocating an output-sized tensor.
            return [
                torch.ones((), dtype=o.dtype, device=o.device).expand_as(o) if o is not None and o.requires_grad else None
                for o in outputs
            ]
        if len(grad_outputs) != len(outputs):
            raise InvalidArgument(f"{entry.name} returned {len(outputs)} {what}(s), got {len(grad_outputs)} {field}")
        checked: list[torch.Tensor | None] = []
        for i, (o, g) in enumerate(zip(outputs, grad_outputs)):
            if g is None:
                checked.append(None)
                continue
            if o is None or not o.requires_grad:
                kind = "is absent (None)" if o is None else f"({dtype_name(o.dtype)}) is not differentiable"
                raise InvalidArgument(f"{entry.name} {what} {i} {kind}; send none as its entry of {field}")
            if g.shape != o.shape or g.dtype != o.dtype:
                raise InvalidArgument(
                    f"{entry.name} {field}[{i}]: expected {dtype_name(o.dtype)} "
                    f"of shape {list(o.shape)}, got {dtype_name(g.dtype)} of shape {list(g.shape)}"
                )
            checked.append(self._to_device(g))
        return checked

    @contextlib.contextmanager
    def _guard(self, entry: RegisteredFunction, phase: str) -> Iterator[None]:
        """Turn what a user's forward or backward raises into FunctionError / ResourceExhausted."""
        try:
            yield
        except BackwardContractError as exc:
            log.warning("%s", exc)
            raise FunctionError(str(exc)) from exc
        except (
            BaseException
        ) as exc:  # SystemExit, KeyboardInterrupt too: a Function can neither stop the server nor hang the call
            if isinstance(exc, Exception) and _is_out_of_memory(exc):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise ResourceExhausted(f"{entry.name} {phase}: out of memory on {self.device}: {exc}") from exc
            log.warning("%s %s raised", entry.name, phase, exc_info=exc)
            raise FunctionError(f"{entry.name} {phase} raised {type(exc).__name__}: {exc}") from exc


def _is_out_of_memory(exc: Exception) -> bool:
    # CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError saying so.
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
