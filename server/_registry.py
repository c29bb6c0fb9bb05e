"""The registry of Functions a server can run: ``@register`` and module loading."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

from ._contract import contract_checked

__all__ = ["DEFAULT_MODULE", "ENTRY_POINT_GROUP", "RegisteredFunction", "Registry", "RegistrationError", "register", "registry"]

log = logging.getLogger(__name__)

DEFAULT_MODULE = "gradserve.server.examples"
ENTRY_POINT_GROUP = "gradserve.functions"

F = TypeVar("F")

# Every @once_differentiable backward is the same wrapper function (functools.wraps hides its name).
_ONCE_DIFFERENTIABLE_CODE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__


class RegistrationError(ValueError):
    """A Function cannot be registered: duplicate name, or not a Function or callable."""


@dataclass(frozen=True)
class RegisteredFunction:
    """One servable Function.

    Attributes
    ----------
    name
        Name callers use.
    target
        The ``torch.autograd.Function`` subclass or plain callable, as registered.
    apply
        What the runtime calls with the positional arguments: ``target.apply`` for a
        Function subclass, ``target`` itself for a callable.
    kind
        ``"autograd.Function"`` or ``"callable"``.
    num_inputs
        Most positional arguments forward takes, or ``None`` when it takes ``*args``.
    required_inputs
        Arguments without a default: a call must give at least these.
    signature
        forward's parameters as Python writes them, without ``ctx`` and annotations:
        ``"(x, k=3.0)"``.
    doc
        First paragraph of the docstring.
    version
        Declared version, else the first 12 hex digits of the SHA-256 of the source.
    sample_inputs
        Callable returning a tuple of float64 arguments for ``gradserve check``; None
        means the elementwise default (see ``_checks.default_sample_inputs``).
    double_backward
        Whether the Function's backward may itself be differentiated
        (``create_graph=True``); gradgradcheck is run. Plain callables always may
        (autograd derives their backward).
    uses_rng
        Whether the Function may draw random numbers (the default). Such Functions run
        one at a time, with seeded generators whose seed a recompute replays; register
        a deterministic Function with ``uses_rng=False`` to let its calls run
        concurrently (``gradserve check`` verifies it draws none).
    supports_complex
        Whether the Function accepts complex inputs; ``gradserve check`` then also runs
        gradcheck on complex128 inputs (PyTorch's conjugate Wirtinger convention).
    gradcheck
        False for Functions whose gradient is deliberately not the derivative (a
        straight-through estimator, say); ``skip_reason`` says why.
    """

    name: str
    target: Any
    apply: Callable[..., Any] = field(repr=False)
    kind: str
    num_inputs: int | None
    doc: str
    version: str
    sample_inputs: Callable[[], tuple[Any, ...]] | None = field(default=None, repr=False)
    double_backward: bool = False
    uses_rng: bool = True
    supports_complex: bool = False
    gradcheck: bool = True
    skip_reason: str = ""
    required_inputs: int = 0
    signature: str = ""
    _signature: inspect.Signature | None = field(default=None, repr=False, compare=False)

    @property
    def once_differentiable(self) -> bool:
        """Whether the Function class's backward is decorated ``@once_differentiable``."""
        backward = getattr(self.target, "backward", None) if self.kind == "autograd.Function" else None
        return getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE

    @property
    def differentiable_backward(self) -> bool:
        """Whether a backward may be run with ``create_graph=True``: a plain callable, or a
        Function class registered with ``double_backward=True`` whose backward is not
        ``@once_differentiable``."""
        return self.kind == "callable" or (self.double_backward and not self.once_differentiable)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Check arguments against forward's signature, as Python would; returns what to call ``apply`` with.

        A Function class takes positional arguments only (``Function.apply``), so its
        keyword arguments are moved into their positions, defaults filling any gap.
        Omitted trailing defaults stay omitted, as in a local ``apply(x)``.

        Raises
        ------
        TypeError
            Too many or too few arguments, an unknown or repeated keyword; the message
            names the Function and its signature.
        """
        if self._signature is None:
            return tuple(args), dict(kwargs)
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            given = f"{len(args)}" + (f" positional and {len(kwargs)} keyword" if kwargs else "")
            if self.num_inputs is not None and self.required_inputs > self.num_inputs:  # keyword-only parameters
                raise TypeError(f"{self.name}{self.signature}: {exc} (got {given} arguments)") from None
            most = "any number of" if self.num_inputs is None else str(self.num_inputs)
            counts = most if self.required_inputs == self.num_inputs else f"{self.required_inputs} to {most}"
            noun = "argument" if counts == "1" else "arguments"
            raise TypeError(
                f"{self.name} takes {counts} {noun}, got {given}: {exc}; signature {self.name}{self.signature}"
            ) from None
        if self.kind == "autograd.Function" and kwargs:
            bound.apply_defaults()
            return tuple(bound.args), {}
        return tuple(args), dict(kwargs)

    @property
    def origin(self) -> str:
        """``module.qualname`` of the registered object."""
        return f"{self.target.__module__}.{self.target.__qualname__}"


def _is_function_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, torch.autograd.Function)


def _signature(obj: Any) -> inspect.Signature | None:
    """forward's signature without ``ctx`` and annotations, or None where Python cannot tell it."""
    fn = obj.forward if _is_function_class(obj) else obj
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    # Old-style forward(ctx, ...) takes ctx first; with a setup_context override it does not.
    if _is_function_class(obj) and obj.setup_context is torch.autograd.Function.setup_context:
        params = params[1:]
    empty = inspect.Parameter.empty
    return inspect.Signature([p.replace(annotation=empty) for p in params])


def _arity(sig: inspect.Signature | None) -> tuple[int | None, int]:
    """(most positional arguments or None for ``*args``, arguments without a default)."""
    if sig is None:
        return None, 0
    params = list(sig.parameters.values())
    required = sum(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None, required
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params), required


def _version(obj: Any) -> str:
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return "unknown"
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def _first_paragraph(obj: Any) -> str:
    # The object's own docstring: inspect.getdoc would fall back to torch.autograd.Function's.
    doc = inspect.cleandoc(obj.__dict__.get("__doc__") or "" if isinstance(obj, type) else obj.__doc__ or "")
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


class Registry:
    """Name -> :class:`RegisteredFunction`. Thread-safe for reads once loading is done."""

    def __init__(self) -> None:
        self._functions: dict[str, RegisteredFunction] = {}

    def register(self, name: str | None = None, **options: Any) -> Callable[[F], F]:
        """Decorator registering a ``torch.autograd.Function`` subclass or a callable.

        Parameters
        ----------
        name
            Name callers use; defaults to the object's ``__name__``.
        **options
            ``version``, ``sample_inputs``, ``double_backward``, ``uses_rng``,
            ``supports_complex``, ``gradcheck``, ``skip_reason``: see :class:`RegisteredFunction`.

        Raises
        ------
        RegistrationError
            The name is already taken by another object, or the object is neither a
            Function subclass nor callable.
        """

        def decorate(obj: F) -> F:
            self.add(obj, name=name, **options)
            return obj

        return decorate

    def add(self, obj: Any, *, name: str | None = None, version: str | None = None, **options: Any) -> RegisteredFunction:
        """Register ``obj`` (see :meth:`register`) and return its entry.

        A Function subclass is served through :func:`_contract.contract_checked`, so what
        its backward returns is checked on every call; ``obj`` itself is unchanged.
        """
        name = name or getattr(obj, "__name__", "")
        if _is_function_class(obj):
            kind, apply = "autograd.Function", contract_checked(obj, name).apply
        elif callable(obj) and not isinstance(obj, type):
            kind, apply = "callable", obj
        else:
            raise RegistrationError(f"cannot register {obj!r}: expected a torch.autograd.Function subclass or a callable")
        sig = _signature(obj)
        num_inputs, required = _arity(sig)
        entry = RegisteredFunction(
            name=name,
            target=obj,
            apply=apply,
            kind=kind,
            num_inputs=num_inputs,
            required_inputs=required,
            signature=str(sig) if sig is not None else "(...)",
            _signature=sig,
            doc=_first_paragraph(obj),
            version=version or _version(obj),
            **options,
        )
        existing = self._functions.get(name)
        if existing is not None:
            if existing.origin == entry.origin:  # the same object re-imported (importlib.reload)
                self._functions[name] = entry
                return entry
            raise RegistrationError(
                f"function name {name!r} registered twice: by {existing.origin} and by {entry.origin}. "
                'Names must be unique: rename one (@register("another_name")), or stop loading one of the '
                "two modules (drop it from --functions / GRADSERVE_FUNCTIONS, or do not import it)"
            )
        self._functions[name] = entry
        return entry

    def get(self, name: str) -> RegisteredFunction | None:
        """The entry named ``name``, or None."""
        return self._functions.get(name)

    def __iter__(self) -> Iterator[RegisteredFunction]:
        return iter(sorted(self._functions.values(), key=lambda f: f.name))

    def __len__(self) -> int:
        return len(self._functions)

    def __contains__(self, name: object) -> bool:
        return name in self._functions


registry = Registry()
"""The process-wide registry that :func:`register` fills and ``gradserve serve`` serves."""


def register(name: str | None = None, **options: Any) -> Callable[[F], F]:
    """Register a ``torch.autograd.Function`` subclass or a differentiable callable.

    Example::

        from gradserve.server import register

        @register("square", sample_inputs=lambda: (torch.rand(3, dtype=torch.float64, requires_grad=True),))
        class Square(torch.autograd.Function):
            ...

    Parameters and errors are those of :meth:`Registry.register`; a duplicate name is an
    error when the second module is imported (at server load time). ``options``:
    ``version``, ``sample_inputs``, ``double_backward``, ``uses_rng``, ``supports_complex``,
    ``gradcheck``, ``skip_reason`` (see :class:`RegisteredFunction`).
    """
    return registry.register(name, **options)


def _import(module: str) -> None:
    """Import a dotted module name, or a ``.py`` file by path (``./my_functions.py``)."""
    if not module.endswith(".py"):
        importlib.import_module(module)
        return
    path = Path(module).resolve()
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ModuleNotFoundError(f"no such file: {path}")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = loaded
    spec.loader.exec_module(loaded)


def load_modules(modules: Iterable[str], *, entry_points: bool = True) -> Registry:
    """Import modules that register Functions, then the ``gradserve.functions`` entry points.

    Parameters
    ----------
    modules
        Dotted module names, importable from ``sys.path`` (the ``gradserve`` command
        puts the current directory first), or paths of ``.py`` files. Empty means
        :data:`DEFAULT_MODULE`, the built-in examples.
    entry_points
        Also load every entry point in the ``gradserve.functions`` group.

    Returns
    -------
    Registry
        The process-wide :data:`registry`.

    Raises
    ------
    ImportError
        A module fails to import; the message names it.
    RegistrationError
        Two modules register the same name.
    """
    names = list(modules) or [DEFAULT_MODULE]
    for module in names:
        try:
            _import(module)
        except RegistrationError:
            raise
        except Exception as exc:
            raise ImportError(f"cannot import functions module {module!r}: {type(exc).__name__}: {exc}") from exc
    if entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            log.info("loading functions from entry point %s = %s", ep.name, ep.value)
            try:
                ep.load()
            except RegistrationError:
                raise
            except Exception as exc:
                raise ImportError(f"cannot load entry point {ep.name!r} ({ep.value}): {type(exc).__name__}: {exc}") from exc
    return registry
