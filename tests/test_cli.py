"""``gradserve`` as a user runs it: a subprocess server, list/call, SIGTERM drain, restart mid-graph."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from conftest import TESTS, ServerProcess, free_port, metric_value, wait_until

from gradserve.client import FunctionFailedError, GradientClient, UnavailableError


def cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    return subprocess.run(
        [sys.executable, "-m", "gradserve.server._cli", *args], capture_output=True, text=True, timeout=timeout_s, env=env
    )


@pytest.fixture(scope="module")
def proc() -> ServerProcess:
    with ServerProcess("--functions", "gradserve.server.examples", "--functions", "gradserve_test_functions") as p:
        yield p


def test_list_and_call(proc: ServerProcess) -> None:
    listed = cli("list", "--target", proc.target)
    assert listed.returncode == 0, listed.stderr
    assert "cube_plus_square" in listed.stdout and "slow_square" in listed.stdout
    called = cli("call", "cube_plus_square", "2", "3", "--target", proc.target)
    assert called.returncode == 0, called.stderr
    assert "output 0: 17.0" in called.stdout and "grad 0:   12.0" in called.stdout and "grad 1:   6.0" in called.stdout
    scaled = cli("call", "scale", "[1, 2]", "s:0.5", "--target", proc.target)
    assert "output 0: [0.5, 1.0]" in scaled.stdout and "grad 1:   none" in scaled.stdout


def test_call_errors_exit_nonzero_with_the_message(proc: ServerProcess) -> None:
    missing = cli("call", "nope", "1", "--target", proc.target)
    assert missing.returncode == 1 and "NOT_FOUND: no function named 'nope'" in missing.stderr
    ragged = cli("call", "square", "[[1,2],[3]]", "--target", proc.target)
    assert ragged.returncode != 0 and "Traceback" not in ragged.stderr
    assert ragged.stderr.strip().splitlines() == [
        "gradserve call: argument '[[1,2],[3]]' is not a torch.float32 tensor: expected sequence of length 2 at dim 1 (got 1)"
    ]


def test_client_sdk_against_the_subprocess(proc: ServerProcess) -> None:
    with GradientClient(proc.target, timeout=30) as client:
        x = torch.tensor(1.0, requires_grad=True)
        y = client.function("square")(x)
        y.backward()
        assert (y.item(), x.grad.item()) == (1.0, 2.0)


def test_bad_functions_module_stops_startup_with_one_line() -> None:
    result = cli("serve", "--port", str(free_port()), "--functions", "no_such_module_xyz", timeout_s=60)
    assert result.returncode == 2
    assert "cannot import functions module 'no_such_module_xyz'" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_drains_in_flight_calls() -> None:
    metrics_port = free_port()
    with ServerProcess(
        "--functions", "gradserve_test_functions", "--grace-period-s", "20", "--metrics-port", str(metrics_port)
    ) as p:
        results: list[object] = []
        with GradientClient(p.target, timeout=30) as client:
            call = threading.Thread(target=lambda: results.append(client.forward("slow_square", torch.tensor([3.0]), 1.5)))
            call.start()
            assert wait_until(
                lambda: metric_value(metrics_port, "gradserve_calls_in_flight") == 1, timeout_s=20
            )  # the call is being served
            p.proc.send_signal(signal.SIGTERM)
            call.join(timeout=30)
            assert p.proc.wait(timeout=30) == 0
            assert [r.tolist() for r in results] == [[9.0]]  # the in-flight call finished
            with pytest.raises(UnavailableError):
                client.forward("square", torch.tensor([1.0]), timeout=2)


def test_backward_after_server_restart_recomputes() -> None:
    port = free_port()
    first = ServerProcess(port=port)
    with GradientClient(first.target, timeout=30) as client:
        x = torch.tensor([1.0, -2.0], requires_grad=True)
        w = torch.tensor([[0.5, 1.0], [2.0, -1.0], [1.0, 1.0]], requires_grad=True)
        y = client.function("linear")(x[None], w, None)
        first.terminate()
        with ServerProcess(port=port):  # a fresh server: the forward's graph is gone
            assert wait_until(lambda: _ready(client), timeout_s=30)
            (y**2).sum().backward()
    upstream = 2 * (x.detach()[None] @ w.detach().T)
    torch.testing.assert_close(w.grad, upstream.T @ x.detach()[None])
    torch.testing.assert_close(x.grad, (upstream @ w.detach())[0])


def _ready(client: GradientClient) -> bool:
    try:
        client.list_functions(timeout=2)
        return True
    except UnavailableError:
        return False


def test_check_passes_the_examples() -> None:
    result = cli("check", timeout_s=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 passed, 1 skipped, 0 failed" in result.stdout
    assert "straight_through_sign  skip" in result.stdout


def test_check_reports_broken_functions() -> None:
    result = cli("check", "--functions", "gradserve_broken_functions", timeout_s=120)
    assert result.returncode == 1
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line and not line.startswith("function")}
    # gradcheck's own words: at x = 2 the numerical Jacobian of x**3 is 12, the wrong backward's 8.
    assert rows["wrong_cube"].split()[1:3] == ["fail", "skip"]
    assert "numerical:tensor([[12.0000]]" in rows["wrong_cube"] and "analytical:tensor([[8.]]" in rows["wrong_cube"]
    assert rows["ctx_attribute_square"].split()[1:3] == ["pass", "fail"]
    assert "second order (float64): Jacobian mismatch" in rows["ctx_attribute_square"]
    assert "analytical:tensor([[0.]]" in rows["ctx_attribute_square"]
    assert "got shape [2, 5], expected [3, 4]" in rows["bad_grad_shape"]


def test_serve_check_withholds_failing_functions_only() -> None:
    with ServerProcess("--check", "--functions", "gradserve.server.examples", "--functions", "gradserve_broken_functions") as p:
        with GradientClient(p.target, timeout=30) as client:
            info = {f.name: f for f in client.list_functions()}
            assert "failed gradcheck" in info["wrong_cube"].unavailable_reason
            assert info["square"].unavailable_reason == ""
            with pytest.raises(FunctionFailedError, match="wrong_cube is not served: failed gradcheck") as err:
                client.forward("wrong_cube", torch.tensor([2.0]))
            assert err.value.reason == "FUNCTION_UNAVAILABLE"
            assert client.forward("square", torch.tensor([3.0])).tolist() == [9.0]
        listed = cli("list", "--target", p.target)
        assert "[unavailable: failed gradcheck" in listed.stdout


def test_every_check_result_decides_what_is_served() -> None:
    """serve --check (in process): each way a check fails withholds the Function; passing and skipped ones are served."""
    import gradserve_broken_functions as broken
    import gradserve_test_functions as tf

    from gradserve.server import Registry, ServerConfig, create_server, examples

    reg = Registry()
    reg.add(examples.Square, name="square", uses_rng=False, double_backward=True, supports_complex=True)
    reg.add(examples.StraightThroughSign, name="straight_through_sign", uses_rng=False, gradcheck=False, skip_reason="STE")
    reg.add(broken.WrongCube, name="wrong_cube", sample_inputs=broken._x2)  # first order fails
    reg.add(  # first order passes, gradgradcheck fails
        broken.CtxAttributeSquare,
        name="ctx_attribute_square",
        double_backward=True,
        sample_inputs=lambda: (torch.tensor([1.0], dtype=torch.float64, requires_grad=True),),
    )
    reg.add(tf.deterministic_liar, name="deterministic_liar", uses_rng=False)  # breaks its RNG promise
    reg.add(  # right for real inputs, wrong for complex ones
        broken.UnconjugatedSquare,
        name="unconjugated_square",
        double_backward=True,
        supports_complex=True,
        sample_inputs=lambda: (torch.tensor([1.0], dtype=torch.float64, requires_grad=True),),
    )
    running = create_server(ServerConfig(port=0, device="cpu", check=True), reg)
    try:
        with GradientClient(f"127.0.0.1:{running.port}", timeout=30) as client:
            reasons = {f.name: f.unavailable_reason for f in client.list_functions()}
            assert client.forward("square", torch.tensor([3.0])).tolist() == [9.0]
    finally:
        running.stop(0)
    assert (reasons["square"], reasons["straight_through_sign"]) == ("", "")
    prefix = "failed gradcheck at start-up: "
    assert reasons["wrong_cube"].startswith(prefix + "first order (float64): Jacobian mismatch")
    assert reasons["ctx_attribute_square"].startswith(prefix + "second order (float64): Jacobian mismatch")
    assert reasons["deterministic_liar"] == (
        prefix + "declared uses_rng=False, but its forward drew random numbers: register it without uses_rng=False"
    )
    assert reasons["unconjugated_square"].startswith(prefix + "first order (complex128): ")
    assert "float64" not in reasons["unconjugated_square"]  # real inputs pass


def test_health_command(proc: ServerProcess) -> None:
    ok = cli("health", "--target", proc.target)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    assert cli("health", "--target", proc.target, "--service", "gradserve.v1.GradientService").returncode == 0
    unknown = cli("health", "--target", proc.target, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    down = cli("health", "--target", f"127.0.0.1:{free_port()}", "--timeout-s", "2")
    assert down.returncode == 1


def test_functions_from_the_current_directory_or_a_file(tmp_path) -> None:
    (tmp_path / "my_functions.py").write_text(
        "import torch\nfrom gradserve.server import register\n\n@register('triple')\ndef triple(x):\n    return 3 * x\n"
    )
    env = dict(os.environ, PYTHONPATH="")
    for spec in ("my_functions", str(tmp_path / "my_functions.py")):
        run = subprocess.run(
            [sys.executable, "-m", "gradserve.server._cli", "check", "--functions", spec],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=env,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "triple" in run.stdout and "1 passed, 0 skipped, 0 failed" in run.stdout
