"""Runtime, exactly: device choice, deferred keeps, and recomputes (keyword arguments, replayed
randomness, higher orders, refused replays) against hand-computed gradients."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from gradserve.server import Runtime, registry, resolve_device
from gradserve.server._errors import (
    Abandoned,
    DoubleBackwardUnsupported,
    FunctionError,
    FunctionNotFound,
    HandleNotFound,
    InvalidArgument,
    NonFinite,
    ResourceExhausted,
    RngMismatch,
    VersionMismatch,
)
from gradserve.server._registry import Registry
from gradserve.server._runtime import RngReplay


def x64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(registry, "cpu", max_handles=4, handle_ttl_s=60)


def test_device_choice_with_and_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("auto") == torch.device("cpu") or torch.cuda.is_available()
    with pytest.raises(ValueError, match=re.escape("--device must be auto, cpu, cuda or cuda:N, got 'mps'") + "$"):
        resolve_device("mps")
    with pytest.raises(ValueError, match=re.escape("--device must be auto, cpu, cuda or cuda:N, got 'gpu'") + "$"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=re.escape("--device cuda:2: only 2 CUDA device(s) visible") + "$"):
        resolve_device("cuda:2")


def test_a_deferred_graph_is_kept_only_by_keep(runtime: Runtime) -> None:
    x = x64(3.0)
    result = runtime.forward("square", [x], keep_graph=True, defer_keep=True)
    assert result.handle and len(runtime.handles) == 0
    runtime.keep(result)
    assert len(runtime.handles) == 1
    assert runtime.backward("square", handle=result.handle).grads[0].tolist() == [6.0]
    kept = runtime.forward("square", [x], keep_graph=True)  # kept at once: keep() has nothing to do
    runtime.keep(kept)
    assert len(runtime.handles) == 1


def test_recompute_uses_the_keyword_arguments(runtime: Runtime) -> None:
    x = x64(1.0, 2.0)
    g = torch.tensor([1.0, -2.0], dtype=torch.float64)
    grads = runtime.backward("scale", args=[x], kwargs={"k": 3.0}, grad_outputs=[g]).grads
    assert grads[0].tolist() == [3.0, -6.0]


def test_recompute_replays_the_forwards_random_numbers(runtime: Runtime) -> None:
    x = x64(*([1.0] * 64))
    forward = runtime.forward("dropout", [x], keep_graph=True)
    by_handle = runtime.backward("dropout", handle=forward.handle).grads[0]
    for _ in range(3):  # other draws between forward and recompute must not matter
        torch.rand(10)
        again = runtime.backward("dropout", args=[x], rng=forward.rng).grads[0]
        assert torch.equal(again, by_handle)
    assert 0 < int((by_handle == 0).sum()) < 64


def test_a_replay_from_another_device_or_torch_is_refused(runtime: Runtime) -> None:
    x = x64(1.0)
    tail = (
        f"this server runs on cpu with torch {torch.__version__} and cannot draw the same numbers again. "
        "Run the forward again, or send the backward to a server like the one that ran it"
    )
    other_device = RngReplay(seed=1, device_type="cuda-but-longer-than-16", torch_version=torch.__version__)
    message = f"dropout: the forward drew random numbers on 'cuda-but-longer-' with torch {torch.__version__!r}; {tail}"
    with pytest.raises(RngMismatch, match="^" + re.escape(message) + "$"):
        runtime.backward("dropout", args=[x], rng=other_device)
    other_torch = RngReplay(seed=1, device_type="cpu", torch_version="9" * 40)
    message = f"dropout: the forward drew random numbers on 'cpu' with torch {'9' * 32!r}; {tail}"
    with pytest.raises(RngMismatch, match="^" + re.escape(message) + "$"):
        runtime.backward("dropout", args=[x], rng=other_torch)
    same = RngReplay(seed=1, device_type="cpu", torch_version=torch.__version__)
    assert runtime.backward("dropout", args=[x], rng=same).grads[0].shape == (1,)


def test_second_order_by_recompute_matches_hand_computed_values(runtime: Runtime) -> None:
    # y = x^2; first order d = 2 x g; the backward of d with cotangent w gives
    # d/dx = 2 g w and d/dg = 2 x w.
    x = x64(1.5, -2.0)
    g = torch.tensor([3.0, 0.5], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 4.0], dtype=torch.float64)
    grads = runtime.backward("square", args=[x], lower_order=[[g]], grad_outputs=[w]).grads
    assert [t.tolist() for t in grads] == [[6.0, 4.0], [3.0, -16.0]]
    by_handle = runtime.backward(
        "square", handle=runtime.forward("square", [x], keep_graph=True).handle, grad_outputs=[g], keep_graph=True
    )
    again = runtime.backward("square", handle=by_handle.handle, grad_outputs=[w]).grads
    assert [t.tolist() for t in again] == [[6.0, 4.0], [3.0, -16.0]]


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_backward_requests_must_be_either_by_handle_or_by_recompute(runtime: Runtime) -> None:
    x = x64(1.0)
    handle = runtime.forward("square", [x], keep_graph=True).handle
    either = "backward needs either a graph handle or the arguments to recompute, not both"
    with pytest.raises(InvalidArgument, match=exactly(either)):
        runtime.backward("square", handle=handle, args=[x])
    with pytest.raises(InvalidArgument, match=exactly(either)):
        runtime.backward("square")
    extras = "keyword arguments, lower_order and rng go with a recompute, not with a handle"
    for extra in ({"kwargs": {"k": 1.0}}, {"lower_order": [[None]]}, {"rng": RngReplay(1, "cpu", torch.__version__)}):
        with pytest.raises(InvalidArgument, match=exactly(extras)):
            runtime.backward("square", handle=handle, **extra)
    assert runtime.backward("square", handle=handle).grads[0].tolist() == [2.0]  # still there after the refusals


def test_a_backward_for_another_version_is_refused(runtime: Runtime) -> None:
    served = registry.get("square").version
    message = f"square: the forward ran version {'v' * 64}, this server serves version {served}; run the forward again"
    with pytest.raises(VersionMismatch, match=exactly(message)):
        runtime.backward("square", args=[x64(1.0)], version="v" * 70)
    assert runtime.backward("square", args=[x64(1.0)], version=served).grads[0].tolist() == [2.0]


def test_double_backward_is_refused_with_the_reason(runtime: Runtime) -> None:
    prefix = "cannot be differentiated twice (create_graph=True): "
    not_registered = (
        "it is not registered with double_backward=True, so its backward is not known to be differentiable. "
        "Register it with @register(..., double_backward=True) once `gradserve check` passes its second order (gradgradcheck)"
    )
    with pytest.raises(DoubleBackwardUnsupported, match=exactly(f"max_with_index {prefix}{not_registered}")):
        runtime.backward("max_with_index", args=[x64(1.0, 2.0)], keep_graph=True)
    with pytest.raises(DoubleBackwardUnsupported, match=exactly(f"max_with_index {prefix}{not_registered}")):
        runtime.backward("max_with_index", args=[x64(1.0, 2.0)], lower_order=[[torch.ones((), dtype=torch.float64), None]])
    with pytest.raises(
        DoubleBackwardUnsupported,
        match=exactly(f"once_differentiable_square {prefix}its backward is marked @once_differentiable"),
    ):
        runtime.backward("once_differentiable_square", args=[x64(1.0)], keep_graph=True)


def test_a_handle_is_for_its_owner_only(runtime: Runtime) -> None:
    handle = runtime.forward("square", [x64(2.0)], keep_graph=True, owner="alice").handle
    with pytest.raises(HandleNotFound):
        runtime.backward("square", handle=handle, owner="bob")
    assert runtime.backward("square", handle=handle, owner="alice").grads[0].tolist() == [4.0]


def test_keep_graph_off_keeps_nothing_and_deferred_keeps_need_room() -> None:
    small = Runtime(registry, "cpu", max_handles=4, max_handle_bytes=8, handle_ttl_s=60)
    assert small.forward("square", [x64(1.0)]).handle is None
    deferred = small.forward("square", [x64(1.0, 2.0)], keep_graph=True, defer_keep=True)  # 32 bytes: over 8
    assert deferred.handle is None and deferred.pending is None
    fits = small.forward("square", [torch.tensor([1.0], requires_grad=True)], keep_graph=True, defer_keep=True)  # 8 bytes
    assert fits.handle and fits.pending is not None
    small.keep(fits, owner="o")
    assert small.backward("square", handle=fits.handle, owner="o").grads[0].tolist() == [2.0]


def test_check_finite_names_the_output_and_counts_bad_values() -> None:
    checking = Runtime(registry, "cpu", check_finite=True)
    with pytest.raises(NonFinite, match=exactly("log output 0 holds 2 NaN or Inf value(s) of 3 (--check-finite)")):
        checking.forward("log", [torch.tensor([-1.0, 0.0, 1.0])])
    assert Runtime(registry, "cpu").forward("log", [torch.tensor([-1.0])]).outputs[0].isnan().all()


def test_runtime_defaults() -> None:
    default = Runtime(registry)
    assert default.device == torch.device("cpu") and default.check_finite is False
    assert (default.handles.max_handles, default.handles.ttl_s) == (1024, 300.0)


class Leaves:
    """An ``is_active`` that says the caller is there for the first ``n`` questions, then gone."""

    def __init__(self, n: int) -> None:
        self.left = n

    def __call__(self) -> bool:
        self.left -= 1
        return self.left >= 0


def test_abandoned_work_says_at_which_step(runtime: Runtime) -> None:
    x = x64(1.0)
    for n, step in [(0, "backward"), (1, "keeping the graph")]:
        handle = runtime.forward("square", [x], keep_graph=True).handle
        message = f"square: caller gone (deadline passed or cancelled) before {step}; work abandoned"
        with pytest.raises(Abandoned, match=exactly(message)):
            runtime.backward("square", handle=handle, keep_graph=True, is_active=Leaves(n))
        assert runtime.backward("square", handle=handle).grads[0].tolist() == [2.0]  # restored after the refusal
    asked = Leaves(10**6)
    runtime.forward("square", [x], keep_graph=True, is_active=asked)
    forward_questions = 10**6 - asked.left
    message = "square: caller gone (deadline passed or cancelled) before keeping the graph; work abandoned"
    with pytest.raises(Abandoned, match=exactly(message)):
        runtime.forward("square", [x], keep_graph=True, is_active=Leaves(forward_questions - 1))
    assert len(runtime.handles) == 1


def test_a_kept_gradient_graph_is_kept_for_its_owner_only_when_differentiable(runtime: Runtime) -> None:
    x = x64(3.0)
    handle = runtime.forward("square", [x], keep_graph=True, owner="o").handle
    first = runtime.backward("square", handle=handle, keep_graph=True, owner="o")
    assert first.grads[0].tolist() == [6.0] and first.grads[0].requires_grad and first.handle
    with pytest.raises(HandleNotFound):
        runtime.backward("square", handle=first.handle, owner="")
    second = runtime.backward("square", handle=first.handle, grad_outputs=[torch.ones(1, dtype=torch.float64)], owner="o")
    assert second.grads[0].tolist() == [2.0] and second.grads[1] is None and second.handle is None
    plain = runtime.backward("square", args=[x64(1.0)])
    assert plain.handle is None and not plain.grads[0].requires_grad
    frozen = runtime.backward("square", args=[torch.tensor([1.0], dtype=torch.float64)], keep_graph=True)
    assert frozen.grads == [None] and frozen.handle is None and len(runtime.handles) == 0


def test_check_finite_names_gradients_too() -> None:
    checking = Runtime(registry, "cpu", check_finite=True)
    message = "square gradient 0 holds 1 NaN or Inf value(s) of 2 (--check-finite)"
    with pytest.raises(NonFinite, match=exactly(message)):
        checking.backward(
            "square", args=[torch.tensor([1.0, 1.0], requires_grad=True)], grad_outputs=[torch.tensor([1.0, float("inf")])]
        )


def test_forward_backward_uses_kwargs_seed_and_grad_outputs(runtime: Runtime) -> None:
    result, grads = runtime.forward_backward(
        "scale", [x64(1.0, 2.0)], [torch.tensor([1.0, -1.0], dtype=torch.float64)], kwargs={"k": 3.0}
    )
    assert result.outputs[0].tolist() == [3.0, 6.0] and grads[0].tolist() == [3.0, -3.0] and grads[1] is None
    x = x64(*([1.0] * 32))
    a, ga = runtime.forward_backward("dropout", [x], seed=7)
    b, gb = runtime.forward_backward("dropout", [x], seed=7)
    assert a.rng == b.rng and a.rng.seed == 7 and a.rng.device_type == "cpu"
    assert torch.equal(a.outputs[0], b.outputs[0]) and torch.equal(ga[0], gb[0])
    again = runtime.backward("dropout", args=[x], rng=a.rng).grads[0]
    assert torch.equal(again, ga[0])


class Boom(torch.autograd.Function):
    """Forward raises a RuntimeError with the message it is given."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, message: str) -> torch.Tensor:
        raise RuntimeError(message)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        return g, None


class Inner(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return 2 * g

    @staticmethod
    def backward(ctx: Any, h: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no second order here")


class Outer(torch.autograd.Function):
    """2x, whose backward (2g, through Inner) cannot itself be differentiated."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return Inner.apply(g)


def test_function_errors_say_which_step_raised_and_out_of_memory_is_resource_exhausted() -> None:
    reg = Registry()
    reg.add(Boom, name="boom")
    reg.add(Outer, name="outer", double_backward=True)
    rt = Runtime(reg, "cpu")
    with pytest.raises(FunctionError, match=exactly("boom forward raised RuntimeError: bad input")):
        rt.forward("boom", [x64(1.0), "bad input"])
    oom = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"
    with pytest.raises(ResourceExhausted, match=exactly(f"boom forward: out of memory on cpu: {oom}")):
        rt.forward("boom", [x64(1.0), oom])
    x, g = x64(1.0), torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    assert rt.backward("outer", args=[x], grad_outputs=[g]).grads[0].tolist() == [2.0]
    with pytest.raises(FunctionError, match=exactly("outer backward of order 2 raised RuntimeError: no second order here")):
        rt.backward("outer", args=[x], lower_order=[[g]], grad_outputs=[torch.ones(1, dtype=torch.float64)])


class Pair(torch.autograd.Function):
    """(x, log x): two outputs, the second NaN or -Inf where x <= 0."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 1.0, torch.log(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return g


def returning_value(value: Any) -> type[torch.autograd.Function]:
    class Returns(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> Any:
            return value(x)

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return g

    return Returns


def test_forward_results_exactly() -> None:
    rt = Runtime(registry, "cpu")
    plain = rt.forward("square", [x64(1.0, 2.0)])
    assert plain.handle is None and plain.rng is None and plain.returns_tuple is False
    assert plain.version == registry.get("square").version and plain.outputs[0].shape == (2,)
    message = "square: caller gone (deadline passed or cancelled) before forward; work abandoned"
    with pytest.raises(Abandoned, match=exactly(message)):
        rt.forward("square", [x64(1.0)], is_active=Leaves(0))
    x = x64(*([1.0] * 16))
    a, b = rt.forward("dropout", [x], seed=7), rt.forward("dropout", [x], seed=7)
    assert a.rng.seed == b.rng.seed == 7 and torch.equal(a.outputs[0], b.outputs[0])
    assert max(rt.forward("dropout", [x]).rng.seed for _ in range(5)) > 2**32  # drawn from all of int64


def test_tuple_outputs_are_checked_and_bad_outputs_named() -> None:
    reg = Registry()
    reg.add(Pair, name="pair")
    reg.add(returning_value(lambda x: (x * 1.0, "s")), name="mixed")
    reg.add(returning_value(lambda x: "s"), name="text")
    reg.add(returning_value(lambda x: ()), name="empty")
    checking = Runtime(reg, "cpu", check_finite=True)
    with pytest.raises(NonFinite, match=exactly("pair output 1 holds 1 NaN or Inf value(s) of 2 (--check-finite)")):
        checking.forward("pair", [torch.tensor([1.0, 0.0])])
    assert checking.forward("pair", [torch.tensor([1.0, 2.0])]).returns_tuple is True
    tail = "; expected a tensor or a non-empty tuple of tensors"
    with pytest.raises(FunctionError, match=exactly("mixed forward returned tuple of ['Tensor', 'str']" + tail)):
        checking.forward("mixed", [x64(1.0)])
    with pytest.raises(FunctionError, match=exactly("text forward returned str" + tail)):
        checking.forward("text", [x64(1.0)])
    with pytest.raises(FunctionError, match=exactly("empty forward returned tuple of []" + tail)):
        checking.forward("empty", [x64(1.0)])


def test_unknown_names_are_shown_cut_at_128_characters() -> None:
    with pytest.raises(FunctionNotFound, match=exactly("no function named 'x'; this server serves: none")):
        Runtime(Registry(), "cpu").function("x")
    rt = Runtime(registry, "cpu")
    known = ", ".join(f.name for f in registry)
    with pytest.raises(FunctionNotFound, match=exactly(f"no function named {'a' * 128!r}; this server serves: {known}")):
        rt.function("a" * 128)
    shown = f"{'a' * 128!r}... (129 characters)"
    with pytest.raises(FunctionNotFound, match=exactly(f"no function named {shown}; this server serves: {known}")):
        rt.function("a" * 129)


def test_cotangents_are_checked_with_the_order_and_field_named(runtime: Runtime) -> None:
    x = x64(1.0, 2.0)
    one = torch.ones(2, dtype=torch.float64)
    with pytest.raises(InvalidArgument, match=exactly("square returned 1 output(s), got 2 grad_outputs")):
        runtime.backward("square", args=[x], grad_outputs=[one, one])
    with pytest.raises(InvalidArgument, match=exactly("square returned 1 output(s), got 2 lower_order[0]")):
        runtime.backward("square", args=[x], lower_order=[[one, one]])
    with pytest.raises(InvalidArgument, match=exactly("square returned 1 order-1 gradient(s), got 2 grad_outputs")):
        runtime.backward("square", args=[x], lower_order=[[one]], grad_outputs=[one, one])
    with pytest.raises(
        InvalidArgument, match=exactly("scale order-1 gradient 1 is absent (None); send none as its entry of grad_outputs")
    ):
        runtime.backward("scale", args=[x, 2.0], lower_order=[[one]], grad_outputs=[None, one])
    not_differentiable = "max_with_index output 1 (int64) is not differentiable; send none as its entry of grad_outputs"
    with pytest.raises(InvalidArgument, match=exactly(not_differentiable)):
        runtime.backward(
            "max_with_index", args=[x], grad_outputs=[torch.ones((), dtype=torch.float64), torch.ones((), dtype=torch.int64)]
        )
    first = runtime.backward("square", handle=runtime.forward("square", [x], keep_graph=True).handle, keep_graph=True)
    wrong = "square grad_outputs[0]: expected float64 of shape [2], got float64 of shape [3]"
    with pytest.raises(InvalidArgument, match=exactly(wrong)):
        runtime.backward("square", handle=first.handle, grad_outputs=[torch.ones(3, dtype=torch.float64)])
    # No cotangent at all: the gradient of out.sum(), in the output's dtype.
    assert runtime.backward("square", args=[torch.tensor([3.0], requires_grad=True)]).grads[0].tolist() == [6.0]
    assert runtime.backward("square", args=[x], grad_outputs=[None]).grads == [None]


def test_a_backward_that_fails_after_differentiating_can_be_tried_again() -> None:
    checking = Runtime(registry, "cpu", check_finite=True)
    handle = checking.forward("square", [torch.tensor([1.0], requires_grad=True)], keep_graph=True).handle
    with pytest.raises(NonFinite):
        checking.backward("square", handle=handle, grad_outputs=[torch.tensor([float("inf")])])
    assert checking.backward("square", handle=handle, grad_outputs=[torch.tensor([2.0])]).grads[0].tolist() == [4.0]


class BackwardFails(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no gradient today")


def test_more_backward_paths_exactly(runtime: Runtime) -> None:
    # A kept graph of gradients from a recompute belongs to the caller who asked for it.
    kept = runtime.backward("square", args=[x64(2.0)], keep_graph=True, owner="o")
    with pytest.raises(HandleNotFound):
        runtime.backward("square", handle=kept.handle, owner="")
    assert runtime.backward("square", handle=kept.handle, owner="o").grads[0].tolist() == [2.0]
    # The graph of order 1 keeps its order: its cotangents are checked as order-1 gradients.
    first = runtime.backward("square", handle=runtime.forward("square", [x64(1.0)], keep_graph=True).handle, keep_graph=True)
    with pytest.raises(InvalidArgument, match=exactly("square returned 1 order-1 gradient(s), got 2 grad_outputs")):
        runtime.backward("square", handle=first.handle, grad_outputs=[torch.ones(1, dtype=torch.float64)] * 2)
    # Default cotangents skip a missing gradient: x**3 + y**2 with y a constant.
    x, y = x64(2.0), torch.tensor([3.0], dtype=torch.float64)
    order1 = runtime.backward(
        "cube_plus_square", handle=runtime.forward("cube_plus_square", [x, y], keep_graph=True).handle, keep_graph=True
    )
    assert order1.grads[1] is None
    order2 = runtime.backward("cube_plus_square", handle=order1.handle).grads
    assert order2[0].tolist() == [12.0] and order2[1:] == [None, None]  # d(3x^2)/dx = 6x = 12
    # forward_backward's backward is the first order.
    reg = Registry()
    reg.add(BackwardFails, name="fails")
    with pytest.raises(FunctionError, match=exactly("fails backward raised RuntimeError: no gradient today")):
        Runtime(reg, "cpu").forward_backward("fails", [x64(1.0)])


def test_check_finite_counts_the_stored_values_of_a_sparse_gradient() -> None:
    checking = Runtime(registry, "cpu", check_finite=True)
    weight = torch.ones(3, 2, requires_grad=True)
    cotangent = torch.tensor([[1.0, float("inf")], [1.0, 1.0]])
    with pytest.raises(NonFinite, match=exactly("embedding_sparse gradient 1 holds 1 NaN or Inf value(s) of 4 (--check-finite)")):
        checking.backward("embedding_sparse", args=[torch.tensor([0, 2]), weight], grad_outputs=[cotangent])


def test_deterministic_functions_errors_and_no_replay_without_draws() -> None:
    reg = Registry()
    reg.add(Boom, name="boom_det", uses_rng=False)
    reg.add(returning_value(lambda x: 3 * x), name="no_draws")  # may draw (uses_rng defaults to True), does not
    rt = Runtime(reg, "cpu")
    with pytest.raises(FunctionError, match=exactly("boom_det forward raised RuntimeError: bad input")):
        rt.forward("boom_det", [x64(1.0), "bad input"])
    assert rt.forward("no_draws", [x64(1.0)]).rng is None


def test_default_grad_outputs_of_a_complex_output_are_complex_ones(runtime: Runtime) -> None:
    # autograd refuses a real grad_output for a complex output: the default ones take the output's dtype
    x = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64, requires_grad=True)
    _, (grad,) = runtime.forward_backward("square", [x])
    assert grad.dtype == torch.complex64 and grad.tolist() == [2 - 4j, 6 + 2j]  # conj(2x)


def test_forward_backward_keeps_no_graph(runtime: Runtime) -> None:
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    _, (grad,) = runtime.forward_backward("square", [x])
    assert grad.tolist() == [2.0, -4.0] and not grad.requires_grad
    assert len(runtime.handles) == 0
