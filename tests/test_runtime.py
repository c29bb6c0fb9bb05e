"""Runtime without a network: seed values, handle vs recompute, grad_outputs, errors, the handle store."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from gradserve.server import Runtime, registry, resolve_device
from gradserve.server._errors import FunctionError, FunctionNotFound, HandleNotFound, InvalidArgument

SERVER = Path(__file__).resolve().parent.parent / "server"


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(registry, "cpu", max_handles=4, handle_ttl_s=60)


def leaf(value: object) -> torch.Tensor:
    return torch.tensor(value, requires_grad=True)


def test_runtime_imports_no_grpc() -> None:
    for name in ("_runtime.py", "_registry.py", "_errors.py", "examples.py"):
        tree = ast.parse((SERVER / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m.startswith(("grpc", "google")) for m in imported), name


def test_seed_values(runtime: Runtime) -> None:
    result, grads = runtime.forward_backward("square", [leaf(1.0)])
    assert result.outputs[0].item() == 1.0 and grads[0].item() == 2.0
    result, grads = runtime.forward_backward("cube_plus_square", [leaf(2.0), leaf(3.0)])
    assert [result.outputs[0].item(), grads[0].item(), grads[1].item()] == [17.0, 12.0, 6.0]


def test_each_output_gets_its_own_cotangent(runtime: Runtime) -> None:
    """two_outputs: x -> (2x, x + 1), so the gradient is 2 * g1 + g2, by handle, recomputed and in one call."""
    x = [leaf([1.0, 2.0])]
    g1, g2 = torch.tensor([1.0, 10.0]), torch.tensor([100.0, 1000.0])
    want = [102.0, 1020.0]
    handle = runtime.forward("two_outputs", x, keep_graph=True).handle
    assert runtime.backward("two_outputs", handle=handle, grad_outputs=[g1, g2]).grads[0].tolist() == want
    assert runtime.backward("two_outputs", args=x, grad_outputs=[g1, g2]).grads[0].tolist() == want
    assert runtime.forward_backward("two_outputs", x, [g1, g2])[1][0].tolist() == want
    assert runtime.backward("two_outputs", args=x, grad_outputs=[None, g2]).grads[0].tolist() == [100.0, 1000.0]


def test_handle_and_recompute_give_identical_gradients(runtime: Runtime) -> None:
    g = torch.Generator().manual_seed(1)
    args = [
        torch.randn(5, 3, generator=g).requires_grad_(),
        torch.randn(4, 3, generator=g).requires_grad_(),
        torch.randn(4, generator=g),
    ]
    upstream = [torch.randn(5, 4, generator=g)]
    forwarded = runtime.forward("linear", args, keep_graph=True)
    assert forwarded.handle
    by_handle = runtime.backward("linear", handle=forwarded.handle, grad_outputs=upstream).grads
    by_recompute = runtime.backward("linear", args=args, grad_outputs=upstream).grads
    assert by_handle[2] is None and by_recompute[2] is None  # bias did not require grad
    for a, b in zip(by_handle[:2], by_recompute[:2]):
        assert torch.equal(a, b)
    torch.testing.assert_close(by_handle[0], upstream[0] @ args[1].detach())


def test_handle_is_released_after_backward(runtime: Runtime) -> None:
    handle = runtime.forward("square", [leaf([1.0, 2.0])], keep_graph=True).handle
    assert len(runtime.handles) == 1
    runtime.backward("square", handle=handle)
    assert len(runtime.handles) == 0
    with pytest.raises(HandleNotFound, match="send the arguments again"):
        runtime.backward("square", handle=handle)


def test_no_handle_without_differentiable_outputs(runtime: Runtime) -> None:
    assert runtime.forward("square", [torch.tensor([1.0])], keep_graph=True).handle is None


def test_handle_store_evicts_least_recently_used_and_expires() -> None:
    rt = Runtime(registry, "cpu", max_handles=2, handle_ttl_s=60)
    h1, h2, h3 = (rt.forward("square", [leaf([1.0])], keep_graph=True).handle for _ in range(3))
    with pytest.raises(HandleNotFound):
        rt.backward("square", handle=h1)
    assert rt.backward("square", handle=h3).grads[0].tolist() == [2.0]
    short = Runtime(registry, "cpu", handle_ttl_s=0.05)
    now = [100.0]
    short.handles.clock = lambda: now[0]  # an injected clock: no sleep
    h = short.forward("square", [leaf([1.0])], keep_graph=True).handle
    now[0] += 0.05
    with pytest.raises(HandleNotFound):
        short.backward("square", handle=h)


def test_handle_of_another_function_is_refused(runtime: Runtime) -> None:
    handle = runtime.forward("square", [leaf([1.0])], keep_graph=True).handle
    with pytest.raises(InvalidArgument, match="belongs to function 'square', not 'softplus'"):
        runtime.backward("softplus", handle=handle)
    assert runtime.backward("square", handle=handle).grads[0].tolist() == [2.0]  # still usable


def test_grad_outputs_are_checked(runtime: Runtime) -> None:
    x = leaf([1.0, 2.0])
    with pytest.raises(InvalidArgument, match=r"grad_outputs\[0\]: expected float32 of shape \[2\], got float32 of shape \[3\]"):
        runtime.forward_backward("square", [x], [torch.ones(3)])
    with pytest.raises(InvalidArgument, match="returned 1 output"):
        runtime.forward_backward("square", [x], [torch.ones(2), torch.ones(2)])
    with pytest.raises(InvalidArgument, match="output 1 .int64. is not differentiable"):
        runtime.forward_backward("max_with_index", [leaf([[1.0, 2.0]])], [torch.ones(1), torch.ones(1, dtype=torch.int64)])


def test_custom_grad_outputs_and_none_cotangent(runtime: Runtime) -> None:
    x = leaf([1.0, 2.0])
    _, grads = runtime.forward_backward("two_outputs", [x], [torch.tensor([1.0, 10.0]), None])
    assert grads[0].tolist() == [2.0, 20.0]
    result, grads = runtime.forward_backward("max_with_index", [leaf([[1.0, 5.0, 2.0]])])
    assert result.differentiable == (True, False) and result.returns_tuple
    assert grads[0].tolist() == [[0.0, 1.0, 0.0]]


def test_gradients_only_for_inputs_that_require_grad(runtime: Runtime) -> None:
    _, grads = runtime.forward_backward("cube_plus_square", [leaf(2.0), torch.tensor(3.0)])
    assert grads[0].item() == 12.0 and grads[1] is None
    _, grads = runtime.forward_backward("scale", [leaf([1.0]), 4.0])
    assert grads[0].tolist() == [4.0] and grads[1] is None


def test_errors_name_the_function(runtime: Runtime) -> None:
    with pytest.raises(FunctionNotFound, match="no function named 'nope'"):
        runtime.forward("nope", [])
    with pytest.raises(InvalidArgument, match="square takes 1 argument, got 2"):
        runtime.forward("square", [leaf(1.0), leaf(1.0)])
    with pytest.raises(FunctionError, match="forward_raises forward raised ValueError: x must be positive"):
        runtime.forward("forward_raises", [leaf(1.0)])
    with pytest.raises(FunctionError, match="returns_string forward returned str"):
        runtime.forward("returns_string", [leaf(1.0)])


def test_article_backward_with_one_gradient_for_two_inputs_is_an_error(runtime: Runtime) -> None:
    with pytest.raises(FunctionError, match="article_cube_plus_square backward returned 1 gradient for 2 inputs"):
        runtime.forward_backward("article_cube_plus_square", [leaf(2.0), leaf(3.0)])
    assert runtime.forward_backward("square", [leaf(1.0)])[1][0].item() == 2.0  # still serving


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
