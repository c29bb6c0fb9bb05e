"""Registry: Function classes and callables, arity, duplicates, module and entry-point loading."""

from __future__ import annotations

import sys
import types
from importlib import metadata
from typing import Any

import pytest
import torch

from gradserve.server import RegistrationError, Registry, _registry, load_modules, registry


def test_function_class_and_callable() -> None:
    reg = Registry()

    @reg.register("double")
    class Double(torch.autograd.Function):
        """Doubles x.

        More text."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return 2 * g

    @reg.register()
    def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    double, add_entry = reg.get("double"), reg.get("add")
    assert double.kind == "autograd.Function" and double.num_inputs == 1 and double.doc == "Doubles x."
    assert double.apply(torch.tensor(3.0)).item() == 6.0
    assert add_entry.kind == "callable" and add_entry.num_inputs == 2
    assert len(double.version) == 12

    @reg.register("undocumented")
    class Undocumented(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x

    assert reg.get("undocumented").doc == ""  # not torch.autograd.Function's own docstring
    assert [f.name for f in reg] == ["add", "double", "undocumented"]


def test_arity_with_setup_context_and_varargs() -> None:
    reg = Registry()

    @reg.register("new_style")
    class NewStyle(torch.autograd.Function):
        @staticmethod
        def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x * y

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            pass

    @reg.register("varargs")
    def varargs(*xs: torch.Tensor) -> torch.Tensor:
        return sum(xs)

    assert reg.get("new_style").num_inputs == 2
    assert reg.get("varargs").num_inputs is None


def test_duplicate_name_is_an_error_naming_both() -> None:
    reg = Registry()
    reg.add(lambda x: x, name="f")

    def other(x: torch.Tensor) -> torch.Tensor:
        return x

    with pytest.raises(RegistrationError, match="'f' registered twice"):
        reg.add(other, name="f")


def test_not_a_function() -> None:
    with pytest.raises(RegistrationError, match="expected a torch.autograd.Function subclass or a callable"):
        Registry().add(42, name="x")
    with pytest.raises(RegistrationError):
        Registry().add(int, name="x")


def test_load_modules_imports_and_reports_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("gs_tmp_mod")
    exec("from gradserve.server import register\n@register('gs_tmp_fn')\ndef f(x):\n    return x\n", module.__dict__)
    monkeypatch.setitem(sys.modules, "gs_tmp_mod", module)
    assert "gs_tmp_fn" in load_modules(["gs_tmp_mod"], entry_points=False)
    with pytest.raises(ImportError, match="cannot import functions module 'no_such_module_xyz'"):
        load_modules(["no_such_module_xyz"], entry_points=False)
    monkeypatch.delitem(registry._functions, "gs_tmp_fn")


def test_default_module_is_the_examples() -> None:
    assert "square" in load_modules([], entry_points=False)


def test_entry_points_are_discovered(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = []
    ep = metadata.EntryPoint(name="mine", value="gs_ep_mod", group=_registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(metadata.EntryPoint, "load", lambda self: loaded.append(self.value))
    monkeypatch.setattr(_registry.metadata, "entry_points", lambda group: [ep] if group == _registry.ENTRY_POINT_GROUP else [])
    load_modules([], entry_points=True)
    assert loaded == ["gs_ep_mod"]
