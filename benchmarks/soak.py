#!/usr/bin/env python
"""Soak test: many concurrent callers, some hostile, against one gradserve server.

Not run in CI (``tests/test_soak.py`` runs ``--quick`` only). By default it starts
``gradserve serve --port 0 --device cpu`` as a subprocess, then makes 20,000 calls from
32 threads; 5% of the calls are malformed, spread evenly over many kinds, each with the
status code it must get. Good calls use the built-in Functions with random inputs and
compare outputs and gradients with local autograd computed here. Between a warm-up
phase (the first 10% of the calls) and the end it reads the server's resident memory
(VmRSS from /proc/<pid>/status).

Targets, each printed PASS/FAIL (exit status 1 if any fails, 2 if the soak cannot run):

- wrong answers: 0 (an output or gradient differs from local autograd);
- unexpected status codes: 0 (a good call that fails counts, and so does a malformed
  call answered with a code other than its expected one, or accepted);
- server RSS growth from after warm-up to the end: under 10% (skipped for ``--target``
  without ``--server-pid``);
- the server is still up and serving at the end.

``--chaos`` (issue 10) starts a server with tokens and tight limits, then runs good
callers (the SDK, with a token, retrying only when told the server is busy) beside every
hostile pattern at once, for ``--duration-s``: streams that send a header and nothing
more, reflection without a token, 24 MiB streamed uploads against
``--max-inflight-bytes``, a gzip bomb, unary uploads cancelled midway, 200,000
arguments, outputs over ``--max-tensor-bytes``, Functions raising SystemExit and
KeyboardInterrupt, missing and wrong tokens, names with newlines and ANSI escapes,
another identity's handles, and the malformed calls above. A prober checks health every
0.1 s and a sampler reads the server's RSS every 0.25 s. Targets: 0 wrong answers, every
good call answered right, health SERVING within 1 s throughout, peak RSS under the
baseline (after a good-only warm-up) plus the budget (in-flight bytes + kept graphs +
4 tensor-sized temporaries per compute slot), every hostile call answered with its
expected code, and the server still serving.

Usage::

    .venv/bin/python benchmarks/soak.py                  # 20,000 calls, about a minute on 2 cores
    .venv/bin/python benchmarks/soak.py --quick          # 1,000 calls, a few seconds
    .venv/bin/python benchmarks/soak.py --target 127.0.0.1:50051 --server-pid 1234
    .venv/bin/python benchmarks/soak.py --chaos          # 3 minutes of chaos
    .venv/bin/python benchmarks/soak.py --chaos --quick  # 12 s (the suite runs 8 s)
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
import torch.nn.functional as F

from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import GradientClient, GradServeError
from gradserve.v1 import codec, streaming
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class WrongAnswer(Exception):
    """An output or gradient from the server differs from local autograd."""


class UnexpectedCode(Exception):
    """A call got a status code other than the one it must get."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


@dataclass
class Ctx:
    """What one call needs: the SDK client, a raw stub (for malformed requests), randomness."""

    client: GradientClient
    stub: pb_grpc.GradientServiceStub
    rng: random.Random
    gen: torch.Generator
    timeout_s: float


# -- checking against local autograd ---------------------------------------------------------


def _tol(dtype: torch.dtype) -> dict[str, float]:
    # Same math, possibly a different summation order (matmul, logsumexp) or formula
    # (softplus): float32 differs in the last bits; a real bug differs by far more.
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-7, "atol": 1e-9}


def _close(what: str, actual: Any, expected: torch.Tensor | None) -> None:
    if expected is None:
        if actual is not None:
            raise WrongAnswer(f"{what}: expected no gradient (None), got {_describe(actual)}")
        return
    if not isinstance(actual, torch.Tensor):
        raise WrongAnswer(f"{what}: expected a {expected.dtype} tensor of shape {list(expected.shape)}, got {_describe(actual)}")
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise WrongAnswer(f"{what}: expected {expected.dtype} {list(expected.shape)}, got {actual.dtype} {list(actual.shape)}")
    if expected.is_floating_point():
        ok = torch.allclose(actual, expected, **_tol(expected.dtype))
    else:
        ok = torch.equal(actual, expected)
    if not ok:
        diff = (actual.double() - expected.double()).abs().max().item()
        raise WrongAnswer(f"{what}: max abs difference {diff:.3g} from local autograd")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def _reference(fn: Callable[..., Any], args: Sequence[Any], grad_outputs: Sequence[torch.Tensor | None] | None):
    """Local outputs and gradients (None where an argument gets none), as the server defines them."""
    leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    with torch.enable_grad():
        out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(o) if o.requires_grad else None for o in outs]
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
    wanted = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor) and a.requires_grad]
    grads: list[torch.Tensor | None] = [None] * len(leaves)
    if pairs and wanted:
        computed = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs], allow_unused=True)
        for i, g in zip(wanted, computed):
            grads[i] = g
    detached = tuple(o.detach() for o in outs)
    return (detached if isinstance(out, tuple) else detached[0]), grads


def _check_result(name: str, result: Any, expected_out: Any, expected_grads: Sequence[torch.Tensor | None]) -> None:
    if isinstance(expected_out, tuple):
        if not isinstance(result.outputs, tuple) or len(result.outputs) != len(expected_out):
            raise WrongAnswer(f"{name}: expected {len(expected_out)} outputs, got {_describe(result.outputs)}")
        for i, (a, e) in enumerate(zip(result.outputs, expected_out)):
            _close(f"{name} output {i}", a, e)
    else:
        _close(f"{name} output", result.outputs, expected_out)
    if len(result.grads) != len(expected_grads):
        raise WrongAnswer(f"{name}: {len(result.grads)} gradients for {len(expected_grads)} arguments")
    for i, (a, e) in enumerate(zip(result.grads, expected_grads)):
        _close(f"{name} gradient {i}", a, e)


def _randn(ctx: Ctx, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = (scale * torch.randn(shape, generator=ctx.gen, dtype=torch.float64)).to(dtype)
    return t.requires_grad_(grad)


def _dtype(ctx: Ctx) -> torch.dtype:
    return torch.float64 if ctx.rng.random() < 0.3 else torch.float32


def _shape(ctx: Ctx, max_dims: int = 3, max_size: int = 8) -> tuple[int, ...]:
    return tuple(ctx.rng.randint(1, max_size) for _ in range(ctx.rng.randint(0, max_dims)))


def _maybe_grad_outputs(ctx: Ctx, like: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None] | None:
    """Half the time None (ones for every differentiable output), else random cotangents."""
    if ctx.rng.random() < 0.5:
        return None
    return [None if t is None else torch.randn(t.shape, generator=ctx.gen, dtype=torch.float64).to(t.dtype) for t in like]


def _forward_backward(ctx: Ctx, name: str, local: Callable[..., Any], args: Sequence[Any], out_like: Callable[[], Sequence[Any]]) -> None:
    """forward_backward on the server against local autograd, with random or default cotangents."""
    grad_outputs = _maybe_grad_outputs(ctx, out_like())
    expected_out, expected_grads = _reference(local, args, grad_outputs)
    result = ctx.client.forward_backward(name, *args, grad_outputs=grad_outputs, timeout=ctx.timeout_s)
    _check_result(name, result, expected_out, expected_grads)


# -- good calls -------------------------------------------------------------------------------


def good_square(ctx: Ctx) -> None:
    x = _randn(ctx, *_shape(ctx), dtype=_dtype(ctx))
    _forward_backward(ctx, "square", lambda x: x * x, [x], lambda: [x])


def good_cube_plus_square(ctx: Ctx) -> None:
    dtype = _dtype(ctx)
    shape = _shape(ctx, max_dims=2) or (3,)
    x = _randn(ctx, *shape, dtype=dtype)
    # Sometimes y broadcasts against x (its gradient is then summed back to y's shape),
    # sometimes y needs no gradient (its gradient must come back None, not zeros).
    y_shape = shape[-1:] if ctx.rng.random() < 0.3 else shape
    y = _randn(ctx, *y_shape, dtype=dtype, grad=ctx.rng.random() < 0.8)
    _forward_backward(ctx, "cube_plus_square", lambda x, y: x**3 + y**2, [x, y], lambda: [x])


def good_linear(ctx: Ctx) -> None:
    dtype = _dtype(ctx)
    batch, n_in, n_out = ctx.rng.randint(1, 16), ctx.rng.randint(1, 16), ctx.rng.randint(1, 16)
    x = _randn(ctx, batch, n_in, dtype=dtype)
    w = _randn(ctx, n_out, n_in, dtype=dtype)
    b = _randn(ctx, n_out, dtype=dtype) if ctx.rng.random() < 0.8 else None
    _forward_backward(ctx, "linear", lambda x, w, b: F.linear(x, w, b), [x, w, b], lambda: [torch.empty(batch, n_out, dtype=dtype)])


def good_softplus(ctx: Ctx) -> None:
    x = _randn(ctx, *_shape(ctx), dtype=_dtype(ctx), scale=30.0)  # well into both tails
    _forward_backward(ctx, "softplus", lambda x: torch.logaddexp(x, torch.zeros_like(x)), [x], lambda: [x])


def good_logsumexp(ctx: Ctx) -> None:
    shape = _shape(ctx, max_dims=2) + (ctx.rng.randint(1, 10),)
    x = _randn(ctx, *shape, dtype=_dtype(ctx), scale=5.0)
    _forward_backward(ctx, "logsumexp", lambda x: torch.logsumexp(x, dim=-1), [x], lambda: [x.sum(-1)])


def good_max_with_index(ctx: Ctx) -> None:
    shape = _shape(ctx, max_dims=2) + (ctx.rng.randint(1, 10),)
    x = _randn(ctx, *shape, dtype=_dtype(ctx))
    # Two outputs; the integer indices are not differentiable, so their cotangent is None.
    _forward_backward(ctx, "max_with_index", lambda x: tuple(x.max(dim=-1)), [x], lambda: [x.amax(-1), None])


def good_scale(ctx: Ctx) -> None:
    x = _randn(ctx, *_shape(ctx), dtype=_dtype(ctx))
    k = ctx.rng.uniform(-4.0, 4.0)
    _forward_backward(ctx, "scale", lambda x, k: x * k, [x, k], lambda: [x])


def good_forward_only(ctx: Ctx) -> None:
    x = _randn(ctx, ctx.rng.randint(1, 6), ctx.rng.randint(1, 10), dtype=_dtype(ctx), grad=False)
    _close("logsumexp forward", ctx.client.forward("logsumexp", x, timeout=ctx.timeout_s), torch.logsumexp(x, dim=-1))


def good_remote_step(ctx: Ctx) -> None:
    """The autograd step: Forward keeps the graph under a handle, loss.backward() sends Backward."""
    dtype = _dtype(ctx)
    x = _randn(ctx, ctx.rng.randint(1, 8), ctx.rng.randint(1, 8), dtype=dtype)
    w = _randn(ctx, ctx.rng.randint(1, 8), x.shape[1], dtype=dtype)
    b = _randn(ctx, w.shape[0], dtype=dtype)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = ctx.client.function("linear", timeout=ctx.timeout_s)(xr, wr, br)
    (ctx.client.function("square", timeout=ctx.timeout_s)(y) * 0.5).sum().backward()
    with torch.enable_grad():
        expected = (F.linear(x, w, b) ** 2 * 0.5).sum()
    ex, ew, eb = torch.autograd.grad(expected, [x, w, b])
    _close("remote step output", y.detach(), F.linear(x, w, b).detach())
    for what, got, want in (("x", xr.grad, ex), ("weight", wr.grad, ew), ("bias", br.grad, eb)):
        _close(f"remote step gradient of {what}", got, want)


GOOD: dict[str, Callable[[Ctx], None]] = {
    "square": good_square,
    "cube_plus_square": good_cube_plus_square,
    "linear": good_linear,
    "softplus": good_softplus,
    "logsumexp": good_logsumexp,
    "max_with_index": good_max_with_index,
    "scale": good_scale,
    "forward_only": good_forward_only,
    "remote_step": good_remote_step,
}

# -- malformed calls --------------------------------------------------------------------------


def _raw(dtype: int = pb.DTYPE_FLOAT32, shape: Sequence[int] = (2,), data: bytes | None = None, requires_grad: bool = False) -> pb.Value:
    if data is None:
        data = b"\0" * (math.prod(shape) * 4)
    return pb.Value(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data, requires_grad=requires_grad))


def _good_x(ctx: Ctx, n: int | None = None) -> torch.Tensor:
    return _randn(ctx, n or ctx.rng.randint(1, 8))


def _expect(ctx: Ctx, method: Callable[..., Any], request: Any, code: grpc.StatusCode) -> None:
    """Send a raw request that must fail with ``code``."""
    try:
        method(request, timeout=ctx.timeout_s)
    except grpc.RpcError as err:
        if err.code() != code:
            raise UnexpectedCode(err.code(), err.details() or "") from None
        return
    raise UnexpectedCode(OK, f"malformed request accepted; expected {code.name}")


def _ok(ctx: Ctx, method: Callable[..., Any], request: Any) -> Any:
    """Send a raw request that must succeed."""
    try:
        return method(request, timeout=ctx.timeout_s)
    except grpc.RpcError as err:
        raise UnexpectedCode(err.code(), err.details() or "") from None


def bad_dtype_unspecified(ctx: Ctx) -> None:
    _expect(ctx, ctx.stub.Forward, pb.ForwardRequest(function="square", args=[_raw(pb.DTYPE_UNSPECIFIED)]), INVALID)


def bad_dtype_unknown(ctx: Ctx) -> None:
    dtype = ctx.rng.choice([13, 42, 1000, -1])
    _expect(ctx, ctx.stub.Forward, pb.ForwardRequest(function="square", args=[_raw(dtype)]), INVALID)


def bad_byte_count(ctx: Ctx) -> None:
    shape = [ctx.rng.randint(1, 64), ctx.rng.randint(1, 64), 2]
    nbytes = math.prod(shape) * 4
    data = b"\0" * ctx.rng.choice([0, 1, 8, nbytes - 1, nbytes + 4])
    _expect(ctx, ctx.stub.ForwardBackward, pb.ForwardBackwardRequest(function="square", args=[_raw(shape=shape, data=data, requires_grad=True)]), INVALID)


def bad_negative_dim(ctx: Ctx) -> None:
    shape = ctx.rng.choice([(2, -3), (-1,), (4, 0, -2)])
    _expect(ctx, ctx.stub.Forward, pb.ForwardRequest(function="square", args=[_raw(shape=shape, data=b"")]), INVALID)


def bad_int64_overflow(ctx: Ctx) -> None:
    request = pb.ForwardRequest(function="square", args=[_raw(shape=(2**40, 2**40), data=b"")])
    _expect(ctx, ctx.stub.Forward, request, EXHAUSTED)


def bad_over_tensor_limit(ctx: Ctx) -> None:
    # 4 TiB declared, 0 bytes sent: over the default 256 MiB --max-tensor-bytes, refused before allocation.
    request = pb.ForwardRequest(function="square", args=[_raw(shape=(2**20, 2**20), data=b"")])
    _expect(ctx, ctx.stub.Forward, request, EXHAUSTED)


def bad_unknown_function(ctx: Ctx) -> None:
    name = ctx.rng.choice(["nope", "Square", "square ", "", f"fn_{secrets.token_hex(4)}"])
    _expect(ctx, ctx.stub.ForwardBackward, pb.ForwardBackwardRequest(function=name, args=[codec.encode_value(_good_x(ctx))]), NOT_FOUND)


def bad_wrong_arg_count(ctx: Ctx) -> None:
    x = codec.encode_value(_good_x(ctx, 3))
    name, args = ctx.rng.choice([("square", [x, x]), ("square", []), ("cube_plus_square", [x]), ("linear", [x, x, x, x])])
    _expect(ctx, ctx.stub.ForwardBackward, pb.ForwardBackwardRequest(function=name, args=args), INVALID)


def bad_empty_value(ctx: Ctx) -> None:
    _expect(ctx, ctx.stub.Forward, pb.ForwardRequest(function="square", args=[pb.Value()]), INVALID)


def bad_requires_grad_on_int(ctx: Ctx) -> None:
    dtype, itemsize = ctx.rng.choice([(pb.DTYPE_INT64, 8), (pb.DTYPE_INT32, 4), (pb.DTYPE_UINT8, 1)])
    request = pb.ForwardBackwardRequest(function="square", args=[_raw(dtype, (3,), b"\1" * 3 * itemsize, requires_grad=True)])
    _expect(ctx, ctx.stub.ForwardBackward, request, INVALID)


def bad_requires_grad_on_bool(ctx: Ctx) -> None:
    request = pb.ForwardRequest(function="square", args=[_raw(pb.DTYPE_BOOL, (2,), b"\1\0", requires_grad=True)])
    _expect(ctx, ctx.stub.Forward, request, INVALID)


def bad_bool_byte(ctx: Ctx) -> None:
    request = pb.ForwardRequest(function="square", args=[_raw(pb.DTYPE_BOOL, (3,), bytes([1, ctx.rng.randint(2, 255), 0]))])
    _expect(ctx, ctx.stub.Forward, request, INVALID)


def bad_grad_outputs_shape(ctx: Ctx) -> None:
    x = _good_x(ctx)
    g = torch.ones(x.shape[0] + ctx.rng.randint(1, 3))
    request = pb.ForwardBackwardRequest(function="square", args=[codec.encode_value(x)], grad_outputs=[codec.encode_maybe_tensor(g)])
    _expect(ctx, ctx.stub.ForwardBackward, request, INVALID)


def bad_grad_outputs_dtype(ctx: Ctx) -> None:
    x = _good_x(ctx)
    request = pb.ForwardBackwardRequest(
        function="square", args=[codec.encode_value(x)], grad_outputs=[codec.encode_maybe_tensor(torch.ones(x.shape, dtype=torch.float64))]
    )
    _expect(ctx, ctx.stub.ForwardBackward, request, INVALID)


def bad_grad_outputs_count(ctx: Ctx) -> None:
    x = _good_x(ctx)
    g = codec.encode_maybe_tensor(torch.ones(x.shape))
    request = pb.ForwardBackwardRequest(function="square", args=[codec.encode_value(x)], grad_outputs=[g, g])
    _expect(ctx, ctx.stub.ForwardBackward, request, INVALID)


def bad_grad_output_for_int_output(ctx: Ctx) -> None:
    x = _randn(ctx, 2, 3)
    grad_outputs = [codec.encode_maybe_tensor(torch.ones(2)), codec.encode_maybe_tensor(torch.ones(2, dtype=torch.int64))]
    request = pb.ForwardBackwardRequest(function="max_with_index", args=[codec.encode_value(x)], grad_outputs=grad_outputs)
    _expect(ctx, ctx.stub.ForwardBackward, request, INVALID)


def bad_unknown_handle(ctx: Ctx) -> None:
    request = pb.BackwardRequest(function="square", handle=secrets.token_urlsafe(18))
    _expect(ctx, ctx.stub.Backward, request, NOT_FOUND)


def bad_backward_without_graph(ctx: Ctx) -> None:
    _expect(ctx, ctx.stub.Backward, pb.BackwardRequest(function="square"), INVALID)


def bad_recompute_args(ctx: Ctx) -> None:
    request = pb.BackwardRequest(function="square", recompute=pb.Arguments(values=[_raw(shape=(4,), data=b"\0" * 12, requires_grad=True)]))
    _expect(ctx, ctx.stub.Backward, request, INVALID)


def _keep(ctx: Ctx, x: torch.Tensor) -> str:
    reply = _ok(ctx, ctx.stub.Forward, pb.ForwardRequest(function="square", args=[codec.encode_value(x)], keep_graph=True))
    if not reply.handle:
        raise WrongAnswer("square forward with keep_graph returned no handle")
    return reply.handle


def _backward_by_handle(ctx: Ctx, x: torch.Tensor, handle: str) -> None:
    reply = _ok(ctx, ctx.stub.Backward, pb.BackwardRequest(function="square", handle=handle))
    _close("square gradient by handle", codec.decode_maybe_tensor(reply.grads[0]), 2 * x.detach())


def bad_handle_reused(ctx: Ctx) -> None:
    """A handle is released by its Backward; a second Backward with it is NOT_FOUND."""
    x = _good_x(ctx)
    handle = _keep(ctx, x)
    _backward_by_handle(ctx, x, handle)
    _expect(ctx, ctx.stub.Backward, pb.BackwardRequest(function="square", handle=handle), NOT_FOUND)


def bad_handle_wrong_function(ctx: Ctx) -> None:
    """A handle sent with another function's name is INVALID_ARGUMENT and survives; then it is used (and freed)."""
    x = _good_x(ctx)
    handle = _keep(ctx, x)
    _expect(ctx, ctx.stub.Backward, pb.BackwardRequest(function="softplus", handle=handle), INVALID)
    _backward_by_handle(ctx, x, handle)


MALFORMED: dict[str, Callable[[Ctx], None]] = {
    "dtype_unspecified": bad_dtype_unspecified,
    "dtype_unknown": bad_dtype_unknown,
    "byte_count": bad_byte_count,
    "negative_dim": bad_negative_dim,
    "int64_overflow": bad_int64_overflow,
    "over_tensor_limit": bad_over_tensor_limit,
    "unknown_function": bad_unknown_function,
    "wrong_arg_count": bad_wrong_arg_count,
    "empty_value": bad_empty_value,
    "requires_grad_on_int": bad_requires_grad_on_int,
    "requires_grad_on_bool": bad_requires_grad_on_bool,
    "bool_byte_not_0_or_1": bad_bool_byte,
    "grad_outputs_shape": bad_grad_outputs_shape,
    "grad_outputs_dtype": bad_grad_outputs_dtype,
    "grad_outputs_count": bad_grad_outputs_count,
    "grad_output_for_int_output": bad_grad_output_for_int_output,
    "unknown_handle": bad_unknown_handle,
    "backward_without_graph": bad_backward_without_graph,
    "recompute_byte_count": bad_recompute_args,
    "handle_reused": bad_handle_reused,
    "handle_wrong_function": bad_handle_wrong_function,
}

EXPECTED_CODE = {
    "dtype_unspecified": INVALID, "dtype_unknown": INVALID, "byte_count": INVALID, "negative_dim": INVALID,
    "int64_overflow": EXHAUSTED, "over_tensor_limit": EXHAUSTED, "unknown_function": NOT_FOUND,
    "wrong_arg_count": INVALID, "empty_value": INVALID, "requires_grad_on_int": INVALID,
    "requires_grad_on_bool": INVALID, "bool_byte_not_0_or_1": INVALID, "grad_outputs_shape": INVALID,
    "grad_outputs_dtype": INVALID, "grad_outputs_count": INVALID, "grad_output_for_int_output": INVALID,
    "unknown_handle": NOT_FOUND, "backward_without_graph": INVALID, "recompute_byte_count": INVALID,
    "handle_reused": NOT_FOUND, "handle_wrong_function": INVALID,
}
assert set(EXPECTED_CODE) == set(MALFORMED)

# -- the server -------------------------------------------------------------------------------


def read_rss_bytes(pid: int) -> int | None:
    """VmRSS of a process, in bytes; None if it cannot be read (gone, or not Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class ServerProcess:
    """``gradserve serve --port 0 --device cpu`` as a subprocess; ``stop()`` always ends it."""

    def __init__(self, extra: Sequence[str], start_timeout_s: float = 120.0) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="gradserve-soak-", suffix=".log", delete=False)
        command = [sys.executable, "-m", "gradserve.server._cli", "serve", "--port", "0", "--device", "cpu",
                   "--log-level", "WARNING", *extra]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        self.pid = self.proc.pid
        self.target = self._wait_listening(start_timeout_s)

    def _wait_listening(self, timeout_s: float) -> str:
        found: list[str] = []
        ready = threading.Event()

        def read() -> None:  # keeps draining stdout after the line, so the pipe never fills
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                m = re.search(r"gradserve listening on (\S+):(\d+)", line)
                if m and not found:
                    found.append(f"127.0.0.1:{m.group(2)}")
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True, name="server-stdout").start()
        if not ready.wait(timeout_s) or not found:
            raise RuntimeError(f"server did not report a listening port within {timeout_s:.0f} s:\n{self.log_tail()}")
        return found[0]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = Path(self.log.name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 40.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: drain, then exit
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()
        return self.proc.returncode


def still_serves(target: str, timeout_s: float) -> str | None:
    """None if the server answers a good square call right; else what went wrong."""
    try:
        with GradientClient(target, timeout=timeout_s) as client:
            grads = client.forward_backward("square", torch.tensor([1.0, 2.0], requires_grad=True)).grads
        if grads[0] is None or grads[0].tolist() != [2.0, 4.0]:
            return f"wrong gradient {grads[0]}"
    except GradServeError as exc:
        return str(exc)
    return None


# -- the soak ---------------------------------------------------------------------------------


@dataclass
class Stats:
    """Results, filled by the caller threads under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    done: int = 0
    latencies_s: dict[str, list[float]] = field(default_factory=lambda: {"good": [], "malformed": []})
    calls_by_kind: Counter = field(default_factory=Counter)
    wrong: Counter = field(default_factory=Counter)
    unexpected: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    soak_errors: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    rss_samples: list[tuple[int, int]] = field(default_factory=list)

    def example(self, kind: str, text: str) -> None:
        # At most two per kind, so one noisy kind does not hide the others.
        if len(self.examples) < 20 and sum(e.startswith(f"[{kind}]") for e in self.examples) < 2:
            self.examples.append(" ".join(f"[{kind}] {text}".split())[:300])


def plan(calls: int, malformed_fraction: float, seed: int) -> list[str]:
    """The kind of every call, in order: malformed kinds round-robin, good kinds round-robin, shuffled."""
    n_bad = round(calls * malformed_fraction)
    bad, good = sorted(MALFORMED), sorted(GOOD)
    kinds = [bad[i % len(bad)] for i in range(n_bad)] + [good[i % len(good)] for i in range(calls - n_bad)]
    random.Random(seed).shuffle(kinds)
    return kinds


def run_phase(kinds: list[str], start: int, stop: int, callers: int, make_ctx: Callable[[int], Ctx], stats: Stats,
              checkpoints: set[int], server_pid: int | None, seed: int) -> None:
    """Calls ``start`` .. ``stop`` - 1 of the plan, from ``callers`` threads pulling the next index."""
    next_index = [start]
    index_lock = threading.Lock()

    def caller(worker: int) -> None:
        ctx = make_ctx(worker)
        while True:
            with index_lock:
                i = next_index[0]
                if i >= stop:
                    return
                next_index[0] += 1
            kind = kinds[i]
            ctx.rng.seed(seed * 1_000_000_007 + i)  # call i gets the same inputs whichever thread makes it
            ctx.gen.manual_seed(seed * 1_000_000_007 + i)
            bad = kind in MALFORMED
            t0 = time.perf_counter()
            outcome = None
            try:
                (MALFORMED[kind] if bad else GOOD[kind])(ctx)
            except WrongAnswer as exc:
                outcome = ("wrong", str(exc))
            except UnexpectedCode as exc:
                outcome = ("unexpected", exc.code.name, str(exc))
            except GradServeError as exc:  # a good call that failed
                outcome = ("unexpected", exc.code.name, str(exc))
            except grpc.RpcError as exc:
                outcome = ("unexpected", exc.code().name, exc.details() or "")
            except Exception as exc:  # noqa: BLE001 - a fault of the soak itself, or a client-side error
                outcome = ("soak", f"{type(exc).__name__}: {exc}")
            elapsed = time.perf_counter() - t0
            with stats.lock:
                stats.latencies_s["malformed" if bad else "good"].append(elapsed)
                stats.calls_by_kind[kind] += 1
                if outcome is not None:
                    if outcome[0] == "wrong":
                        stats.wrong[kind] += 1
                        stats.example(kind, f"wrong answer: {outcome[1]}")
                    elif outcome[0] == "unexpected":
                        stats.unexpected[kind][outcome[1]] += 1
                        expected = EXPECTED_CODE[kind].name if bad else "OK"
                        stats.example(kind, f"expected {expected}, got {outcome[2]}")
                    else:
                        stats.soak_errors[kind] += 1
                        stats.example(kind, f"error in the soak client: {outcome[1]}")
                stats.done += 1
                done = stats.done
            if server_pid is not None and done in checkpoints:
                rss = read_rss_bytes(server_pid)
                if rss is not None:
                    with stats.lock:
                        stats.rss_samples.append((done, rss))

    threads = [threading.Thread(target=caller, args=(w,), name=f"caller-{w}", daemon=True) for w in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


# -- chaos: good callers beside every hostile pattern at once ----------------------------------------

CHAOS_TOKENS = ("good-caller-token", "thief-token")
CHAOS_SERVER_ARGS = [
    "--functions", "gradserve.server.examples", "--functions", str(ROOT / "benchmarks" / "chaos_functions.py"),
    "--max-workers", "4", "--max-concurrent-rpcs", "48", "--idle-stream-timeout-s", "2",
    "--max-inflight-bytes", str(128 << 20), "--max-request-bytes", str(32 << 20), "--max-tensor-bytes", str(16 << 20),
    "--max-handle-bytes", str(32 << 20), "--grace-period-s", "5",
]
CANCELLED, UNAUTH, DENIED = grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
FAILED, DEADLINE = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED


def chaos_budget_bytes() -> int:
    """What the server may hold beyond its baseline: in-flight bytes, kept graphs, and the
    Functions' own temporaries (up to 4 tensor-sized buffers in each of the 4 compute slots)."""
    return (128 << 20) + (32 << 20) + 4 * 4 * (16 << 20)


@dataclass
class ChaosStats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    good: Counter = field(default_factory=Counter)  # calls, answered, wrong, failed, retries
    hostile: Counter = field(default_factory=Counter)  # calls by pattern
    hostile_unexpected: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    examples: list[str] = field(default_factory=list)
    health_max_s: float = 0.0
    health_checks: int = 0
    health_failures: int = 0
    health_p99_s: float = 0.0
    health_over_1s: int = 0
    rss: list[int] = field(default_factory=list)

    def example(self, text: str) -> None:
        with self.lock:
            if len(self.examples) < 20:
                self.examples.append(" ".join(text.split())[:300])


def _good_with_retry(kind: str, ctx: Ctx, stats: ChaosStats, deadline_s: float) -> None:
    """One good call; retried when the server says it is busy (RESOURCE_EXHAUSTED), as its message asks."""
    give_up = time.monotonic() + deadline_s
    backoff = 0.05
    while True:
        try:
            GOOD[kind](ctx)
            with stats.lock:
                stats.good["answered"] += 1
            return
        except WrongAnswer as exc:
            with stats.lock:
                stats.good["wrong"] += 1
            stats.example(f"[good {kind}] wrong answer: {exc}")
            return
        except GradServeError as exc:
            if exc.code is EXHAUSTED and time.monotonic() + backoff < give_up:
                with stats.lock:
                    stats.good["retries"] += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            with stats.lock:
                stats.good["failed"] += 1
            stats.example(f"[good {kind}] {exc.code.name}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001
            with stats.lock:
                stats.good["failed"] += 1
            stats.example(f"[good {kind}] {type(exc).__name__}: {exc}")
            return


def _expect_codes(stats: ChaosStats, pattern: str, allowed: set[grpc.StatusCode], fn: Callable[[], Any]) -> Any:
    """Run one hostile call; a code outside ``allowed`` (OK included only if listed) is counted unexpected."""
    with stats.lock:
        stats.hostile[pattern] += 1
    try:
        result = fn()
        code = OK
    except grpc.RpcError as err:
        code, result = err.code(), None
        if code not in allowed:
            stats.example(f"[hostile {pattern}] {code.name}: {err.details()}")
    if code not in allowed:
        with stats.lock:
            stats.hostile_unexpected[pattern][code.name] += 1
    return result


def _hostile_patterns(target: str, stop: threading.Event, stats: ChaosStats, scale: int) -> list[Callable[[], None]]:
    good_md = [("authorization", f"Bearer {CHAOS_TOKENS[0]}")]
    thief_md = [("authorization", f"Bearer {CHAOS_TOKENS[1]}")]
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

    def stub() -> pb_grpc.GradientServiceStub:
        return pb_grpc.GradientServiceStub(grpc.insecure_channel(target, options=options))

    x_small = codec.encode_value(torch.ones(4, requires_grad=True))
    declared = pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1024]))

    def idle_streams() -> None:  # header, then nothing: cancelled by the idle-stream timeout
        s = stub()
        while not stop.is_set():
            hold = threading.Event()

            def header_then_silence() -> Any:
                yield pb.StreamRequest(forward=pb.ForwardRequest(function="square", args=[declared]))
                hold.wait(10)

            calls = [s.StreamCall(header_then_silence(), metadata=good_md, timeout=10) for _ in range(8 * scale)]
            for c in calls:
                _expect_codes(stats, "idle_stream", {CANCELLED, EXHAUSTED}, lambda c=c: list(c))
            hold.set()

    def reflection_without_token() -> None:
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        channel = grpc.insecure_channel(target)
        r = reflection_pb2_grpc.ServerReflectionStub(channel)
        while not stop.is_set():
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            _expect_codes(stats, "reflection_no_token", {UNAUTH}, lambda: list(r.ServerReflectionInfo(iter([request]), timeout=5)))
            stop.wait(0.05)

    def big_uploads() -> None:  # 24 MiB streamed uploads: admitted against --max-inflight-bytes
        s = stub()
        payload = torch.ones(6 << 20)
        while not stop.is_set():
            payloads: list[torch.Tensor] = []
            header = pb.StreamRequest(forward=pb.ForwardRequest(function="square", args=[codec.encode_value(payload, payloads=payloads)]))

            def messages() -> Any:
                yield header
                for chunk in streaming.chunks(payloads):
                    yield pb.StreamRequest(data=bytes(chunk))

            _expect_codes(stats, "big_upload", {OK, EXHAUSTED, DEADLINE}, lambda: list(s.StreamCall(messages(), metadata=good_md, timeout=15)))

    def compressed_bomb() -> None:  # 30 MiB of zeros gzip-compressed to about 30 KB
        s = stub()
        request = pb.ForwardRequest(function="square", args=[codec.encode_value(torch.zeros(30 << 18))])
        while not stop.is_set():
            _expect_codes(stats, "gzip_bomb", {OK, EXHAUSTED, DEADLINE},
                          lambda: s.Forward(request, metadata=good_md, timeout=15, compression=grpc.Compression.Gzip))

    def cancelled_uploads() -> None:  # 16 MiB unary uploads cancelled midway
        s = stub()
        request = pb.ForwardRequest(function="square", args=[codec.encode_value(torch.ones(4 << 20))])
        while not stop.is_set():
            with stats.lock:
                stats.hostile["cancelled_upload"] += 1
            f = s.Forward.future(request, metadata=good_md, timeout=15)
            stop.wait(0.02)
            f.cancel()

    def many_arguments() -> None:
        s = stub()
        request = pb.ForwardRequest(function="square")
        request.args.extend([x_small] * 200_000)
        while not stop.is_set():
            _expect_codes(stats, "many_arguments", {INVALID}, lambda: s.Forward(request, metadata=good_md, timeout=15))
            stop.wait(0.2)

    def huge_output() -> None:  # [N, 1] and [1, N] inputs: an output over --max-tensor-bytes from an 8 KB request
        s = stub()
        n = 2100
        args = [codec.encode_value(torch.ones(n, 1, requires_grad=True)), codec.encode_value(torch.ones(1, n, requires_grad=True))]
        while not stop.is_set():
            _expect_codes(stats, "huge_output", {EXHAUSTED},
                          lambda: s.Forward(pb.ForwardRequest(function="cube_plus_square", args=args, keep_graph=True), metadata=good_md, timeout=15))
            stop.wait(0.1)

    def exiting_functions() -> None:
        s = stub()
        while not stop.is_set():
            for name in ("chaos_exit", "chaos_interrupt"):
                _expect_codes(stats, f"function_{name}", {FAILED},
                              lambda name=name: s.ForwardBackward(pb.ForwardBackwardRequest(function=name, args=[x_small]), metadata=good_md, timeout=15))
            stop.wait(0.05)

    def bad_tokens() -> None:
        s = stub()
        while not stop.is_set():
            _expect_codes(stats, "no_token", {UNAUTH}, lambda: s.Forward(pb.ForwardRequest(function="square", args=[x_small]), timeout=5))
            _expect_codes(stats, "wrong_token", {DENIED}, lambda: s.Forward(
                pb.ForwardRequest(function="square", args=[x_small]), metadata=[("authorization", f"Bearer guess-{secrets.token_hex(4)}")], timeout=5))

    def hostile_names() -> None:  # names with newlines and escapes: NOT_FOUND, and no forged log lines
        s = stub()
        while not stop.is_set():
            _expect_codes(stats, "hostile_name", {NOT_FOUND}, lambda: s.Forward(
                pb.ForwardRequest(function="square\n2026 INFO forged code=OK\x1b[2J", args=[x_small]), metadata=good_md, timeout=5))
            stop.wait(0.02)

    def handle_theft() -> None:  # the thief knows a good caller's handle: NOT_FOUND, and the owner still gets its gradient
        s = stub()
        while not stop.is_set():
            x = torch.rand(8) + 0.5
            reply = _expect_codes(stats, "theft_forward", {OK, EXHAUSTED}, lambda: s.Forward(
                pb.ForwardRequest(function="square", args=[codec.encode_value(x.requires_grad_())], keep_graph=True), metadata=good_md, timeout=15))
            if reply is None or not reply.handle:
                continue
            _expect_codes(stats, "theft_backward", {NOT_FOUND}, lambda: s.Backward(
                pb.BackwardRequest(function="square", handle=reply.handle), metadata=thief_md, timeout=5))
            released = _expect_codes(stats, "theft_release", {OK}, lambda: s.ReleaseHandles(
                pb.ReleaseHandlesRequest(handles=[reply.handle]), metadata=thief_md, timeout=5))
            if released is not None and released.released != 0:
                stats.example("[hostile theft_release] the thief released another identity's handle")
                with stats.lock:
                    stats.hostile_unexpected["theft_release"]["RELEASED"] += 1
            owner = _expect_codes(stats, "owner_backward", {OK, EXHAUSTED, NOT_FOUND}, lambda: s.Backward(
                pb.BackwardRequest(function="square", handle=reply.handle), metadata=good_md, timeout=15))
            if owner is not None:
                got = codec.decode_maybe_tensor(owner.grads[0])
                if not torch.allclose(got, 2 * x.detach()):
                    with stats.lock:
                        stats.good["wrong"] += 1
                    stats.example("[handle_theft] the owner's gradient was wrong after a theft attempt")

    def malformed() -> None:  # the soak's classic malformed calls, with the good token
        client = GradientClient(target, timeout=10, token=CHAOS_TOKENS[0])
        channel = grpc.insecure_channel(target, options=options)
        authed = pb_grpc.GradientServiceStub(channel)

        class _Authed:
            def __getattr__(self, name: str) -> Any:
                method = getattr(authed, name)
                return lambda request, timeout: method(request, timeout=timeout, metadata=good_md)

        ctx = Ctx(client, _Authed(), random.Random(7), torch.Generator().manual_seed(7), 10.0)  # type: ignore[arg-type]
        kinds = sorted(MALFORMED)
        i = 0
        while not stop.is_set():
            kind = kinds[i % len(kinds)]
            i += 1
            with stats.lock:
                stats.hostile[f"malformed_{kind}"] += 1
            try:
                MALFORMED[kind](ctx)
            except UnexpectedCode as exc:
                if exc.code is not EXHAUSTED:  # busy is an honest answer under chaos
                    with stats.lock:
                        stats.hostile_unexpected[f"malformed_{kind}"][exc.code.name] += 1
                    stats.example(f"[hostile malformed_{kind}] {exc}")
            except (WrongAnswer, GradServeError) as exc:
                stats.example(f"[hostile malformed_{kind}] {exc}")

    return [idle_streams, reflection_without_token, big_uploads, compressed_bomb, cancelled_uploads, many_arguments,
            huge_output, exiting_functions, bad_tokens, hostile_names, handle_theft, malformed]


def probe_health(target: str, duration_s: float, interval_s: float = 0.1) -> int:
    """Check health every ``interval_s`` for ``duration_s``; print the count, failures and worst latency."""
    checks = failures = 0
    worst = 0.0
    latencies: list[float] = []
    end = time.monotonic() + duration_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                ok = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            worst = max(worst, latencies[-1])
            checks += 1
            failures += not ok
            time.sleep(interval_s)
    over = sum(t >= 1.0 for t in latencies)
    print(f"checks {checks} failures {failures} max_s {worst:.4f} p99_s {percentile(latencies, 99):.4f} over_1s {over}", flush=True)
    return 0


def run_chaos(args: argparse.Namespace) -> int:
    duration_s = args.duration_s if args.duration_s is not None else (12.0 if args.quick else 180.0)
    scale = 1 if args.quick else 2
    os.environ["GRADSERVE_AUTH_TOKENS"] = ",".join(CHAOS_TOKENS)  # for the server; kept out of ps
    server = None
    passed = False
    try:
        try:
            server = ServerProcess([*CHAOS_SERVER_ARGS, *args.server_arg])
        except RuntimeError as exc:
            print(f"soak: {exc}", file=sys.stderr)
            return 2
        target = server.target
        stats = ChaosStats()
        stop = threading.Event()
        client = GradientClient(target, timeout=30, token=CHAOS_TOKENS[0])
        good_kinds = sorted(GOOD)

        def good_caller(worker: int) -> None:
            ctx = Ctx(client, None, random.Random(worker), torch.Generator().manual_seed(worker), 30.0)  # type: ignore[arg-type]
            i = 0
            while not stop.is_set():
                kind = good_kinds[(worker + i) % len(good_kinds)]
                i += 1
                with stats.lock:
                    stats.good["calls"] += 1
                _good_with_retry(kind, ctx, stats, 30.0)

        def prober() -> None:
            # In a process of its own: in this one, the callers' threads would hold the GIL
            # and the prober would measure its own waits, not the server's.
            proc = subprocess.run(
                [sys.executable, __file__, "--probe-health", target, "--duration-s", str(duration_s)],
                capture_output=True, text=True, timeout=duration_s + 60,
            )
            m = re.search(r"checks (\d+) failures (\d+) max_s ([0-9.]+) p99_s ([0-9.]+) over_1s (\d+)", proc.stdout)
            with stats.lock:
                if m is None:
                    stats.health_failures += 1
                    stats.example(f"[health prober] {proc.stdout[-200:]} {proc.stderr[-300:]}")
                else:
                    stats.health_checks, stats.health_failures = int(m.group(1)), int(m.group(2))
                    stats.health_max_s = float(m.group(3))
                    stats.health_p99_s, stats.health_over_1s = float(m.group(4)), int(m.group(5))

        def sampler() -> None:
            while not stop.is_set():
                rss = read_rss_bytes(server.pid)
                if rss is not None:
                    with stats.lock:
                        stats.rss.append(rss)
                stop.wait(0.25)

        # Baseline: the server after a short good-only warm-up.
        warm = Ctx(client, None, random.Random(0), torch.Generator().manual_seed(0), 30.0)  # type: ignore[arg-type]
        for kind in good_kinds * 3:
            GOOD[kind](warm)
        baseline = read_rss_bytes(server.pid) or 0
        budget = chaos_budget_bytes()
        print(f"soak --chaos: {duration_s:.0f} s against {target} (pid {server.pid}); RSS baseline {mib(baseline)}, "
              f"budget {mib(budget)}", flush=True)
        threads = [threading.Thread(target=good_caller, args=(w,), daemon=True) for w in range(args.good_callers)]
        threads += [threading.Thread(target=prober, daemon=True), threading.Thread(target=sampler, daemon=True)]
        patterns = [p for p in _hostile_patterns(target, stop, stats, scale) if p.__name__ not in args.chaos_skip]
        threads += [threading.Thread(target=p, daemon=True, name=p.__name__) for p in patterns]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        stop.wait(duration_s)
        stop.set()
        for t in threads:
            t.join(timeout=40)
        elapsed = time.perf_counter() - t0
        stuck = [t.name for t in threads if t.is_alive()]
        serving_problem = None
        try:
            with GradientClient(target, timeout=10, token=CHAOS_TOKENS[0]) as c:
                if c.forward_backward("square", torch.tensor([1.0, 2.0], requires_grad=True)).grads[0].tolist() != [2.0, 4.0]:
                    serving_problem = "wrong gradient at the end"
        except GradServeError as exc:
            serving_problem = str(exc)
        if not server.alive():
            serving_problem = f"server process exited with status {server.proc.returncode}"
        client.close()

        g = stats.good
        peak = max(stats.rss) if stats.rss else 0
        n_unexpected = sum(sum(c.values()) for c in stats.hostile_unexpected.values())
        lines = [
            "",
            "== gradserve chaos soak ==",
            f"duration            {elapsed:.1f} s, {args.good_callers} good callers beside {len(patterns)} hostile patterns"
            + (f" (skipped: {', '.join(args.chaos_skip)})" if args.chaos_skip else ""),
            f"good calls          {g['calls']} made, {g['answered']} answered right, {g['failed']} failed, {g['retries']} busy retries",
            f"wrong answers       {g['wrong']}",
            f"hostile calls       {sum(stats.hostile.values())}: " + ", ".join(f"{k}={n}" for k, n in sorted(stats.hostile.items()) if not k.startswith("malformed_"))
            + f", malformed={sum(n for k, n in stats.hostile.items() if k.startswith('malformed_'))}",
            f"hostile unexpected  {n_unexpected}" + (f"  {dict((k, dict(v)) for k, v in stats.hostile_unexpected.items())}" if n_unexpected else ""),
            f"health              {stats.health_checks} checks, p99 {1e3 * stats.health_p99_s:.0f} ms, max {1e3 * stats.health_max_s:.0f} ms, "
            f"{stats.health_over_1s} took 1 s or more, {stats.health_failures} not SERVING or failed",
            f"server RSS          baseline {mib(baseline)}, peak {mib(peak)}, budget {mib(budget)}: peak - baseline = {mib(peak - baseline)}",
        ]
        if stuck:
            lines.append(f"threads still running: {stuck}")
        if stats.examples:
            lines.append("first problems:")
            lines += [f"    {e}" for e in stats.examples]
        targets = [
            ("wrong answers = 0", g["wrong"] == 0),
            ("every good call answered", g["calls"] > 0 and g["answered"] == g["calls"]),
            ("health within 1 s throughout", stats.health_max_s < 1.0 and stats.health_failures == 0),
            ("server RSS under baseline + budget", peak < baseline + budget),
            ("hostile calls got the expected codes", n_unexpected == 0),
            ("server still serving", serving_problem is None),
        ]
        lines.append("targets:")
        lines += [f"    {'PASS' if ok else 'FAIL'}  {name}" for name, ok in targets]
        if serving_problem:
            lines.append(f"server problem: {serving_problem}")
        passed = all(ok for _, ok in targets)
        lines.append(f"result: {'PASS' if passed else 'FAIL'}")
        print("\n".join(lines), flush=True)
        if not passed:
            print(f"server log ({server.log.name}), last lines:\n{server.log_tail()}", flush=True)
        return 0 if passed else 1
    finally:
        if server is not None:
            status = server.stop()
            if status not in (0, None):
                print(f"soak: server exited with status {status} on SIGTERM", file=sys.stderr)
            if passed:
                os.unlink(server.log.name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=None, help="total calls (default 20000; 1000 with --quick)")
    parser.add_argument("--callers", type=int, default=32, help="concurrent caller threads (default %(default)s)")
    parser.add_argument("--malformed-fraction", type=float, default=0.05, help="share of malformed calls (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=None, help="calls before the first RSS reading (default: 10%% of --calls)")
    parser.add_argument("--rss-growth-limit-pct", type=float, default=10.0, help="RSS growth target, percent (default %(default)s)")
    parser.add_argument("--target", default=None, help="HOST:PORT of a running server (default: start one)")
    parser.add_argument("--server-pid", type=int, default=None, help="PID of the --target server, to read its RSS")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each RPC in seconds (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the call plan and inputs (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="1000 calls, or with --chaos 12 s (for tests/test_soak.py)")
    parser.add_argument("--chaos", action="store_true",
                        help="good callers beside every hostile pattern at once, for --duration-s (starts its own server)")
    parser.add_argument("--duration-s", type=float, default=None, help="--chaos: seconds to run (default 180; 12 with --quick)")
    parser.add_argument("--good-callers", type=int, default=8, help="--chaos: good caller threads (default %(default)s)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the started server, e.g. --server-arg=--max-workers=4 (repeatable)")
    parser.add_argument("--chaos-skip", action="append", default=[], metavar="PATTERN",
                        help="--chaos: leave out a hostile pattern (idle_streams, big_uploads, ...); repeatable")
    parser.add_argument("--probe-health", metavar="TARGET", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_health:
        return probe_health(args.probe_health, args.duration_s or 10.0)
    if args.chaos:
        torch.set_num_threads(1)
        return run_chaos(args)
    calls = args.calls if args.calls is not None else (1000 if args.quick else 20000)
    warmup = args.warmup if args.warmup is not None else calls // 10
    if not (0 < warmup < calls) or args.callers < 1 or not 0 <= args.malformed_fraction <= 1:
        parser.error("need 0 < --warmup < --calls, --callers >= 1 and 0 <= --malformed-fraction <= 1")
    torch.set_num_threads(1)  # 32 caller threads on a few cores: no intra-op threads on top

    server: ServerProcess | None = None
    passed = False
    try:
        t_start = time.perf_counter()
        if args.target is None:
            try:
                server = ServerProcess(args.server_arg)
            except RuntimeError as exc:
                print(f"soak: {exc}", file=sys.stderr)
                return 2
            target, pid = server.target, server.pid
        else:
            target, pid = args.target, args.server_pid
        if pid is not None and read_rss_bytes(pid) is None:
            print(f"soak: cannot read /proc/{pid}/status; RSS is skipped", file=sys.stderr)
            pid = None
        startup_s = time.perf_counter() - t_start

        kinds = plan(calls, args.malformed_fraction, args.seed)
        client = GradientClient(target, timeout=args.timeout_s)  # one shared client: it is thread-safe
        channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)])
        stub = pb_grpc.GradientServiceStub(channel)

        def make_ctx(worker: int) -> Ctx:
            return Ctx(client, stub, random.Random(), torch.Generator(), args.timeout_s)

        stats = Stats()
        checkpoints = {warmup + (calls - warmup) * k // 10 for k in range(1, 10)}
        print(f"soak: {calls} calls from {args.callers} callers against {target} "
              f"({'started here, pid %d' % pid if server else 'existing server'}); warm-up {warmup} calls", flush=True)
        t0 = time.perf_counter()
        run_phase(kinds, 0, warmup, args.callers, make_ctx, stats, set(), None, args.seed)
        t_warm = time.perf_counter()
        rss_warm = read_rss_bytes(pid) if pid is not None else None
        run_phase(kinds, warmup, calls, args.callers, make_ctx, stats, checkpoints, pid, args.seed)
        t_end = time.perf_counter()
        rss_end = read_rss_bytes(pid) if pid is not None else None
        serving_problem = still_serves(target, args.timeout_s)
        if server is not None and not server.alive():
            serving_problem = f"server process exited with status {server.proc.returncode}"
        client.close()
        channel.close()

        # -- report ------------------------------------------------------------------------------
        n_bad = sum(n for k, n in stats.calls_by_kind.items() if k in MALFORMED)
        n_wrong = sum(stats.wrong.values())
        n_unexpected = sum(sum(c.values()) for c in stats.unexpected.values())
        n_soak = sum(stats.soak_errors.values())
        all_lat = stats.latencies_s["good"] + stats.latencies_s["malformed"]
        elapsed = t_end - t0
        lines = [
            "",
            "== gradserve soak ==",
            f"target              {target}{'' if server is None else f' (started here in {startup_s:.1f} s)'}",
            f"calls               {stats.done} of {calls} ({args.callers} callers, warm-up {warmup})",
            f"good calls          {stats.done - n_bad} over {len(GOOD)} kinds: "
            + ", ".join(f"{k}={stats.calls_by_kind[k]}" for k in sorted(GOOD)),
            f"malformed           {n_bad} ({100 * n_bad / max(stats.done, 1):.1f}%) over {len(MALFORMED)} kinds: "
            + ", ".join(f"{k}={stats.calls_by_kind[k]}" for k in sorted(MALFORMED)),
            f"wrong answers       {n_wrong}" + (f"  {dict(stats.wrong)}" if n_wrong else ""),
            f"unexpected codes    {n_unexpected}",
        ]
        for kind in sorted(stats.unexpected):
            expected = EXPECTED_CODE[kind].name if kind in MALFORMED else "OK"
            got = ", ".join(f"{code}={n}" for code, n in sorted(stats.unexpected[kind].items()))
            lines.append(f"    {kind:<28} expected {expected:<18} got {got}")
        if n_soak:
            lines.append(f"soak client errors  {n_soak}  {dict(stats.soak_errors)}")
        lines += [
            f"throughput          {stats.done / elapsed:.0f} calls/s ({elapsed:.1f} s)",
            f"latency (all)       p50 {1e3 * percentile(all_lat, 50):.1f} ms, p99 {1e3 * percentile(all_lat, 99):.1f} ms",
            f"latency (good)      p50 {1e3 * percentile(stats.latencies_s['good'], 50):.1f} ms, "
            f"p99 {1e3 * percentile(stats.latencies_s['good'], 99):.1f} ms",
            f"latency (malformed) p50 {1e3 * percentile(stats.latencies_s['malformed'], 50):.1f} ms, "
            f"p99 {1e3 * percentile(stats.latencies_s['malformed'], 99):.1f} ms",
        ]
        growth_pct = None
        if rss_warm is not None and rss_end is not None:
            growth_pct = 100 * (rss_end - rss_warm) / rss_warm
            lines.append(f"server RSS          {mib(rss_warm)} after warm-up ({t_warm - t0:.1f} s), {mib(rss_end)} at the end: "
                         f"{growth_pct:+.1f}%")
            trend = ", ".join(f"{n}:{r / 2**20:.0f}" for n, r in sorted(stats.rss_samples))
            lines.append(f"RSS trend (call:MiB) {trend}")
        else:
            lines.append("server RSS          skipped (no server PID; pass --server-pid with --target)")
        if stats.examples:
            lines.append("first problems:")
            lines += [f"    {e}" for e in stats.examples]

        targets = [
            ("wrong answers = 0", n_wrong == 0),
            ("unexpected codes = 0", n_unexpected == 0),
            ("soak client errors = 0", n_soak == 0),
            ("all calls made", stats.done == calls),
            ("server still serving", serving_problem is None),
        ]
        if growth_pct is not None:
            targets.append((f"RSS growth < {args.rss_growth_limit_pct:g}%", growth_pct < args.rss_growth_limit_pct))
        lines.append("targets:")
        for name, ok in targets:
            lines.append(f"    {'PASS' if ok else 'FAIL'}  {name}")
        if growth_pct is None:
            lines.append("    SKIP  RSS growth (no server PID)")
        if serving_problem:
            lines.append(f"server problem: {serving_problem}")
        passed = all(ok for _, ok in targets)
        lines.append(f"result: {'PASS' if passed else 'FAIL'}")
        print("\n".join(lines), flush=True)
        if server is not None and (not passed or not server.alive()):
            print(f"server log ({server.log.name}), last lines:\n{server.log_tail()}", flush=True)
        return 0 if passed else 1
    finally:
        if server is not None:
            status = server.stop()
            if args.target is None and status not in (0, None):
                print(f"soak: server exited with status {status} on SIGTERM", file=sys.stderr)
            if passed:
                os.unlink(server.log.name)
            else:
                print(f"soak: server log kept at {server.log.name}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
