#!/usr/bin/env python
"""gradserve against its limits and its peer, in one run over loopback.

For float32 tensors of 1, 1e3, 1e5, 1e6 and 1e7 elements (and 2.5e8, about 1 GB, with
``--huge``) it times y = x**2 forward + backward five ways:

  (a) local      local autograd (``examples.Square``), no network: the limit
  (b) echo       a raw gRPC unary echo of the same bytes (generic handler, bytes in and
                 out, no size limits): the transport limit
  (c) gs F+B     gradserve ``client.function("square")(x).backward(ones)``: a Forward that
                 keeps the graph, then a Backward by handle
  (d) gs FB      gradserve ``client.forward_backward("square", x)``: one round trip
  (e) torch rpc  ``torch.distributed.rpc`` (TensorPipe, TCP over loopback) with
                 ``dist_autograd``: a remote ``x * x`` in a second process, backward
                 through it, gradients fetched: the peer

and, where the gradserve under test has the feature (``Features``):

  (f) gs F+B shm as (c), ``GradientClient(target, shared_memory=True)``: tensors from 256 KiB
                 (the client's default threshold; 1 byte in ``--smoke``) through /dev/shm
  (g) gs FB unix as (d), to a second gradserve server on ``--host unix:PATH``

Every server is a separate process (127.0.0.1, ephemeral ports, or a unix socket in a
fresh /tmp folder), as the client would see it in production: ``gradserve serve``, the
echo server and the rpc worker are all this script or the gradserve CLI in a subprocess,
shut down when the run ends, whatever happens. It also measures calls/s with 1, 8 and 32
threads sharing one client on a small tensor (gradserve ForwardBackward beside the echo
server); calls/s of ``--load-procs`` client processes x ``--load-threads`` threads against
the echo server and gradserve with ``--workers 1`` and ``--workers 2`` (each gradserve load
process opening ``LOAD_CONNECTIONS`` connections, 2 per worker, as the kernel hashes a
connection to one worker); and the gradserve server's peak RSS (VmHWM) for one big round
trip in a fresh server process. All processes start together, so their imports overlap.

It prints medians (p90 in brackets), ratios against (a), (b) and (e) and the issue's
targets, and writes ``latency.csv``, ``throughput.csv``, ``load.csv``, ``memory.csv``,
``goals.csv``, ``report.txt`` (with the load average at start, after the latency sweep and
at the end: the machine may be shared) and ``bench.png`` (matplotlib, the ``bench`` extra) to ``--out`` (benchmarks/out/).

    .venv/bin/python benchmarks/bench.py             # about 2 minutes
    .venv/bin/python benchmarks/bench.py --huge      # also 2.5e8 elements; ~10 GB of RAM
    .venv/bin/python benchmarks/bench.py --smoke     # seconds; what CI runs

Timings are wall-clock medians after warm-up; repeat counts scale with the cost of a call
(``--budget-s`` seconds per method and size) and the methods take turns in rounds so that
a noisy neighbour hits all of them alike. The exit status is 1 when a measurement failed
(the run goes on and the table says ERR), 0 otherwise; missed targets are printed, not
failed: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "out"

ECHO_SERVICE = "gradserve.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
ECHO_MIN_BYTES = 64
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
RPC_WORKER = "rpc_worker"
HUGE_N = 250_000_000
LISTENING = r"listening on (\S+)"  # gradserve serve and the echo server print their target (HOST:PORT or unix:PATH) when up
GRPC_MAX_INT = 2**31 - 1
MiB = 1024 * 1024

METHODS = ("local", "echo", "gs_fwd_bwd", "gs_fb", "torch_rpc")
# Methods measured only when the code under test has the feature (Features): run() appends them to METHODS.
OPTIONAL_METHODS = {"gs_shm": "shared_memory", "gs_unix": "unix"}
LOAD_WORKERS = (1, 2)  # --workers of the multi-process load's gradserve servers
# Client connections per load process: at least 2 per worker, since the kernel hashes each
# connection to one SO_REUSEPORT worker and a few connections can land on the same one.
LOAD_CONNECTIONS = 2 * max(LOAD_WORKERS)
LABELS = {
    "local": "(a) local",
    "echo": "(b) echo",
    "gs_fwd_bwd": "(c) gs F+B",
    "gs_fb": "(d) gs FB",
    "torch_rpc": "(e) torch rpc",
    "gs_shm": "(f) gs F+B shm",
    "gs_unix": "(g) gs FB unix",
}
LEGEND = {
    "local": "local autograd forward + backward of examples.Square (no network): the limit",
    "echo": "raw gRPC unary echo of the tensor's bytes (at least 64 B), generic handler: the transport limit",
    "gs_fwd_bwd": "gradserve client.function('square')(x).backward(ones): Forward (graph kept), then Backward",
    "gs_fb": "gradserve client.forward_backward('square', x): one ForwardBackward round trip",
    "torch_rpc": "torch.distributed.rpc + dist_autograd: remote x * x, dist_autograd.backward, get_gradients",
    "gs_shm": "as (c), with GradientClient(target, shared_memory=True): tensors through same-host shared memory",
    "gs_unix": "as (d), to a second gradserve server on --host unix:PATH (a unix socket) instead of TCP loopback",
}


# --------------------------------------------------------------------------- helpers


def fmt_n(n: int) -> str:
    if n < 1000:
        return str(n)
    exp = int(math.floor(math.log10(n)))
    mant = n / 10**exp
    return f"1e{exp}" if mant == 1 else f"{mant:g}e{exp}"


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def echo_payload(x: Any) -> bytes:
    """What the echo server gets for tensor ``x``: its bytes, at least 64 (about a 1-element ForwardBackward request)."""
    raw = x.detach().numpy().tobytes()
    return raw if len(raw) >= ECHO_MIN_BYTES else raw.ljust(ECHO_MIN_BYTES, b"\0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / VmPeak of a process, in bytes (Linux /proc)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmPeak"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (runnable tasks; above the CPU count means a busy machine)."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
            mem = f", {kib / 1024**2:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    quota = ""
    try:
        quota_text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota_text[0] != "max":
            quota = f", cgroup CPU quota {int(quota_text[0]) / int(quota_text[1]):g}"
    except (OSError, ValueError, IndexError):
        pass
    import grpc
    import torch

    return (
        f"{cpu}, {os.cpu_count()} CPUs{quota}{mem}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), grpcio {grpc.__version__}"
    )


def code_state() -> str:
    """The commit measured, and whether client/, server/ or protos/ had uncommitted edits (read-only git calls)."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", *argv], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "code: not a git checkout"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "client", "server", "protos").splitlines()]
    edits = f" + uncommitted edits to {len(dirty)} file(s) in client/ server/ protos/" if dirty else ", clean"
    return f"code: commit {head}{edits}"


class Report:
    """Prints lines and keeps them for report.txt."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


# --------------------------------------------------------------------------- subprocess roles


def echo_server_main(workers: int) -> int:
    """``bench.py --echo-server``: a minimal grpcio echo server on 127.0.0.1:<ephemeral>."""
    from concurrent import futures

    import grpc

    def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=UNLIMITED)
    handler = grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"echo listening on 127.0.0.1:{port}", flush=True)
    stop.wait()
    server.stop(0).wait()
    return 0


def _rpc_square(x: Any) -> Any:
    """The torch rpc peer's remote function: y = x * x (runs in the worker)."""
    return x * x


def rpc_options(port: int, transports: str, timeout_s: float) -> Any:
    import torch.distributed.rpc as rpc

    kwargs: dict[str, Any] = {}
    if transports != "default":
        kwargs["_transports"] = transports.split(",")
    return rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=16, rpc_timeout=timeout_s, init_method=f"tcp://127.0.0.1:{port}", **kwargs
    )


def rpc_env(port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("TP_SOCKET_IFNAME", "lo")  # TensorPipe's TCP transport on loopback


def rpc_worker_main(port: int, transports: str, timeout_s: float) -> int:
    """``bench.py --rpc-worker PORT``: rank 1 of a 2-process torch rpc group; serves until the master shuts down."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    import torch.distributed.rpc as rpc

    rpc_env(port)
    rpc.init_rpc(RPC_WORKER, rank=1, world_size=2, rpc_backend_options=rpc_options(port, transports, timeout_s))
    print("rpc worker ready", flush=True)
    rpc.shutdown()  # graceful: returns once the master has shut down too
    return 0


def load_client_main(args: argparse.Namespace) -> int:
    """``bench.py --load-client``: one of the load processes, kept for the whole run. For each line
    ``KIND TARGET CONNECTIONS SECONDS`` on stdin (KIND echo or gs) it connects, warms up, prints
    "ready", waits for "go", runs ``--load-threads`` threads of calls for SECONDS, prints the count
    and closes the connection; an empty line or "quit" ends it. A failure prints "error ..." instead."""
    import torch

    x = torch.rand(args.small_n).add_(0.5).requires_grad_()
    for line in sys.stdin:
        if line.strip() in ("", "quit"):
            return 0
        kind, target, connections, seconds = line.split()
        with ExitStack() as stack:
            try:
                call = load_call(stack, kind, target, int(connections), x)
                for _ in range(20):  # connect and warm up before the others are told to go
                    call()
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                print(f"error {type(exc).__name__}: {exc}".splitlines()[0], flush=True)
                continue
            print("ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                return 1
            try:
                calls, elapsed = measure_throughput(call, args.load_threads, float(seconds))
            except Exception as exc:  # noqa: BLE001
                print(f"error {type(exc).__name__}: {exc}".splitlines()[0], flush=True)
                continue
            print(f"calls {calls} seconds {elapsed:.6f}", flush=True)
    return 0


def load_call(stack: ExitStack, kind: str, target: str, connections: int, x: Any) -> Callable[[], Any]:
    """One call of a load process: a raw echo of ``x``'s bytes, or a gradserve ForwardBackward of it."""
    if kind == "echo":
        import grpc

        channel = stack.enter_context(grpc.insecure_channel(target, options=UNLIMITED))
        stub = channel.unary_unary(ECHO_METHOD)
        payload = echo_payload(x)
        return lambda: stub(payload, timeout=60)
    from gradserve.client import GradientClient

    kwargs = {"connections": connections} if connections > 1 else {}
    client = stack.enter_context(GradientClient(target, timeout=60, **kwargs))
    return lambda: client.forward_backward("square", x)


def local_rss_main(n: int) -> int:
    """``bench.py --local-rss N``: peak RSS of local ``examples.Square`` forward + backward (upstream
    gradient: broadcast ones, as ForwardBackward's default) in this fresh process: the math's own floor.
    It imports and warms up, prints "ready", and measures when "go" arrives on stdin (so that its
    start-up overlaps the run's and its measurement does not)."""
    import torch

    from gradserve.server.examples import Square

    Square.apply(torch.ones(4, requires_grad=True)).backward(torch.ones(4))  # warm the code paths
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    before = proc_status(os.getpid())["VmRSS"]
    x = torch.rand(n).add_(0.5).requires_grad_()  # as the server's decoded argument
    Square.apply(x).backward(torch.ones(()).expand(n))
    print(f"rss before {before} peak {proc_status(os.getpid())['VmHWM']}", flush=True)
    return 0


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            match = re.search(pattern, text)
            if match:
                return match
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{text[-2000:]}")
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log}")

    def stop(self, timeout_s: float = 15) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=30)


def end_process(popen: subprocess.Popen[Any]) -> None:
    """Kill ``popen`` if it is still running, and reap it."""
    if popen.poll() is None:
        popen.kill()
        popen.wait(timeout=30)


@contextmanager
def spawn(name: str, argv: list[str], out: Path, env: dict[str, str] | None = None) -> Iterator[Proc]:
    log = out / f"{name}.log"
    with open(log, "wb") as f:
        popen = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    proc = Proc(name, popen, log)
    try:
        yield proc
    finally:
        proc.stop()


def gradserve_argv(max_bytes: int, device: str = "cpu", extra: tuple[str, ...] = (), host: str = "127.0.0.1") -> list[str]:
    """``gradserve serve`` of the examples on ``host`` (an ephemeral port, or ``unix:PATH``), sizes up to ``max_bytes``."""
    return [
        sys.executable, "-m", "gradserve.server._cli", "serve",
        "--host", host, "--port", "0", "--device", device,
        "--functions", "gradserve.server.examples",
        "--max-request-bytes", str(max_bytes), "--max-tensor-bytes", str(max_bytes),
        "--grace-period-s", "0", *extra,
    ]


@contextmanager
def gradserve_server(
    out: Path, max_bytes: int, name: str = "gradserve-server", device: str = "cpu", extra: tuple[str, ...] = ()
) -> Iterator[tuple[Proc, str]]:
    with spawn(name, gradserve_argv(max_bytes, device, extra), out) as proc:
        yield proc, proc.wait_for_line(LISTENING, timeout_s=120).group(1)


# --------------------------------------------------------------------------- features of the code measured


@dataclass(frozen=True)
class Features:
    """What the gradserve under test offers; a goal needing a missing feature prints "n/a (feature not present)"."""

    workers: bool  # gradserve serve --workers N
    connections: bool  # GradientClient(target, connections=N)
    shared_memory: bool  # GradientClient(target, shared_memory=True)
    unix: bool  # unix: targets (the server's --help mentions them)

    @classmethod
    def detect(cls) -> Features:
        import inspect

        from gradserve.client import GradientClient
        from gradserve.server._config import add_serve_arguments

        parser = argparse.ArgumentParser(prog="gradserve serve")
        add_serve_arguments(parser)
        serve_help = parser.format_help()
        params = inspect.signature(GradientClient).parameters
        return cls(
            workers=re.search(r"--workers\b", serve_help) is not None,
            connections="connections" in params,
            shared_memory="shared_memory" in params,
            unix="unix:" in serve_help,
        )

    def describe(self) -> str:
        return ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in dataclasses.asdict(self).items())


# --------------------------------------------------------------------------- methods


@dataclass
class Case:
    """One method at one size: ``call()`` returns the seconds one timed call took."""

    call: Callable[[], float]
    verify: Callable[[], None]


@dataclass
class Env:
    args: argparse.Namespace
    features: Features
    gs_target: str = ""
    echo_target: str = ""
    unix_target: str = ""  # a second gradserve server, on a unix socket (Features.unix)
    workers_targets: dict[int, str] = field(default_factory=dict)  # --workers N servers of the load section (N > 1)
    gs_client: Any = None
    shm_client: Any = None
    unix_client: Any = None
    echo_channel: Any = None
    echo_stub: Any = None
    rpc_ready: bool = False
    rpc_error: str = ""

    def method_available(self, method: str) -> str:
        """'' when the method can run, else why not."""
        if method == "torch_rpc" and not self.rpc_ready:
            return self.rpc_error or "torch rpc not started"
        return ""


def make_case(env: Env, method: str, x: Any, ones: Any) -> Case:
    import torch

    perf = time.perf_counter
    timeout = env.args.call_timeout_s
    expected = lambda: 2 * x.detach()  # noqa: E731

    def check(got: Any, what: str) -> None:
        if got is None or not torch.allclose(got, expected(), rtol=1e-6, atol=0):
            raise AssertionError(f"{method}: wrong {what}")

    if method == "local":
        from gradserve.server.examples import Square

        def call() -> float:
            x.grad = None
            t0 = perf()
            Square.apply(x).backward(ones)
            return perf() - t0

        return Case(call, lambda: check(x.grad, "x.grad"))

    if method == "echo":
        payload = echo_payload(x)
        state: dict[str, Any] = {}

        def call() -> float:
            t0 = perf()
            reply = env.echo_stub(payload, timeout=timeout)
            dt = perf() - t0
            state["reply"] = reply
            return dt

        def verify() -> None:
            if state["reply"] != payload:
                raise AssertionError("echo: reply differs from the request")
            state.clear()

        return Case(call, verify)

    if method in ("gs_fwd_bwd", "gs_shm"):
        square = (env.shm_client if method == "gs_shm" else env.gs_client).function("square")

        def call() -> float:
            x.grad = None
            t0 = perf()
            square(x).backward(ones)
            return perf() - t0

        def verify_shm() -> None:
            check(x.grad, "x.grad")
            if method == "gs_shm" and env.shm_client.transport != "shared_memory":  # not the network measured twice
                raise AssertionError(f"gs_shm: the client's transport is {env.shm_client.transport!r}, not shared_memory")

        return Case(call, verify_shm)

    if method in ("gs_fb", "gs_unix"):
        state = {}
        client = env.unix_client if method == "gs_unix" else env.gs_client

        def call() -> float:
            t0 = perf()
            result = client.forward_backward("square", x)
            dt = perf() - t0
            state["grad"] = result.grads[0]
            return dt

        def verify() -> None:
            check(state.pop("grad"), "grads[0]")

        return Case(call, verify)

    if method == "torch_rpc":
        import torch.distributed.autograd as dist_autograd
        import torch.distributed.rpc as rpc

        state = {}

        def call() -> float:
            t0 = perf()
            with dist_autograd.context() as context_id:
                y = rpc.rpc_sync(RPC_WORKER, _rpc_square, args=(x,), timeout=timeout)
                dist_autograd.backward(context_id, [y.sum()])
                grad = dist_autograd.get_gradients(context_id)[x]
            dt = perf() - t0
            state["grad"] = grad
            return dt

        def verify() -> None:
            check(state.pop("grad"), "dist_autograd gradient")

        return Case(call, verify)

    raise ValueError(method)


# --------------------------------------------------------------------------- measurements


@dataclass
class Stat:
    method: str
    n: int
    times: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def p90(self) -> float:
        return p90(self.times)


def reps_for(seconds_per_call: float, args: argparse.Namespace, n: int) -> int:
    if n >= HUGE_N:
        return max(1, min(3, int(args.budget_s * 3 / max(seconds_per_call, 1e-9))))
    wanted = int(args.budget_s / max(seconds_per_call, 1e-9))
    return max(args.min_reps, min(args.max_reps, wanted))


def measure_size(env: Env, n: int, report: Report) -> dict[str, Stat]:
    import torch

    args = env.args
    torch.manual_seed(n % 1000)
    x = torch.rand(n, dtype=torch.float32).add_(0.5).requires_grad_()  # float32; away from 0
    ones = torch.ones(n, dtype=torch.float32)
    stats = {m: Stat(m, n) for m in METHODS}
    cases: dict[str, Case] = {}
    warm = 1 if (n >= HUGE_N or args.smoke) else args.warmup
    reps: dict[str, int] = {}
    sequential = n >= HUGE_N  # one method at a time, freed in between: memory

    def fail(method: str, exc: BaseException) -> None:
        stats[method].error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        cases.pop(method, None)
        report(f"  ! {LABELS[method]} at n={fmt_n(n)} failed: {stats[method].error}")
        if args.verbose:
            traceback.print_exc()

    def prepare(method: str) -> None:
        why = env.method_available(method)
        if why:
            stats[method].error = f"unavailable: {why}"
            return
        try:
            case = make_case(env, method, x, ones)
            warm_times = [case.call() for _ in range(warm)]
            case.verify()
            cases[method] = case
            reps[method] = reps_for(statistics.median(warm_times), args, n)
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            fail(method, exc)

    def run(method: str, count: int) -> None:
        if method not in cases:
            return
        try:
            case = cases[method]
            stats[method].times.extend(case.call() for _ in range(count))
        except Exception as exc:  # noqa: BLE001
            fail(method, exc)

    if sequential:
        for method in METHODS:
            prepare(method)
            run(method, reps.get(method, 0))
            cases.pop(method, None)
            x.grad = None
            gc.collect()
    else:
        for method in METHODS:
            prepare(method)
        rounds = args.rounds
        for r in range(rounds):
            order = METHODS[r % len(METHODS):] + METHODS[: r % len(METHODS)]  # take turns
            for method in order:
                if method in reps:
                    run(method, math.ceil(reps[method] / rounds))
    for method in METHODS:
        if stats[method].error == "" and not stats[method].times:
            stats[method].error = "no measurement"
    done = ", ".join(
        f"{LABELS[m].split()[0]} {fmt_ms(stats[m].median)} ms x{len(stats[m].times)}"
        for m in METHODS if stats[m].times
    )
    report(f"  n={fmt_n(n):>6} ({fmt_bytes(4 * n)}): {done}")
    return stats


@dataclass
class Throughput:
    method: str
    callers: int
    calls: int
    seconds: float
    error: str = ""

    @property
    def per_s(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0


def measure_throughput(call: Callable[[], Any], callers: int, duration_s: float) -> tuple[int, float]:
    """Calls completed by ``callers`` threads looping ``call`` for about ``duration_s``; (calls, seconds)."""
    stop = threading.Event()
    start = threading.Barrier(callers + 1)
    counts = [0] * callers
    errors: list[BaseException] = []

    def loop(i: int) -> None:
        start.wait()
        done = 0
        try:
            while not stop.is_set():
                call()
                done += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()
        counts[i] = done

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    stop.wait(duration_s)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(counts), elapsed


def throughput_section(env: Env, report: Report) -> list[Throughput]:
    import torch

    args = env.args
    n = args.small_n
    x = torch.rand(n).add_(0.5).requires_grad_()
    payload = echo_payload(x)
    timeout = args.call_timeout_s
    calls = {
        "echo": lambda: env.echo_stub(payload, timeout=timeout),
        "gs_fb": lambda: env.gs_client.forward_backward("square", x),
    }
    results: list[Throughput] = []
    for callers in args.callers:
        for method, call in calls.items():
            try:
                measure_throughput(call, callers, min(0.3, args.throughput_s / 4))  # warm-up
                count, seconds = measure_throughput(call, callers, args.throughput_s)
                results.append(Throughput(method, callers, count, seconds))
            except Exception as exc:  # noqa: BLE001
                results.append(Throughput(method, callers, 0, 0.0, f"{type(exc).__name__}: {exc}".splitlines()[0]))
        pair = {r.method: r for r in results if r.callers == callers}
        report(
            f"  {callers:>2} callers: "
            + ", ".join(f"{LABELS[m]} {pair[m].per_s:,.0f} calls/s" if not pair[m].error else f"{LABELS[m]} ERR"
                        for m in calls)
        )
    return results


@dataclass
class Load:
    """Calls/s of several client processes, each with several threads, against one server."""

    name: str  # echo, gs (--workers 1), gs_workers2
    what: str
    per_s: float = 0.0
    error: str = ""


class LoadPool:
    """The ``--load-client`` processes of the multi-process load, started once (their imports
    overlap the servers' start-up) and given one run after another."""

    def __init__(self, args: argparse.Namespace) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--load-client",
                "--load-threads", str(args.load_threads), "--small-n", str(args.small_n)]
        self.popens = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
                       for _ in range(args.load_procs)]

    def reply(self, p: subprocess.Popen[str]) -> str:
        line = p.stdout.readline().strip()
        if not line or line.startswith("error"):
            raise RuntimeError(f"load client: {line or f'exited with {p.wait(timeout=30)}'}")
        return line

    def rate(self, kind: str, target: str, seconds: float, connections: int = 1) -> float:
        """Calls/s of all processes calling ``target`` together once all are connected and warm: the sum
        of each process's own rate. ``kind`` is echo or gs; ``connections`` per process (gs)."""
        for p in self.popens:
            p.stdin.write(f"{kind} {target} {connections} {seconds}\n")
            p.stdin.flush()
        for p in self.popens:
            if self.reply(p) != "ready":
                raise RuntimeError("load client: expected ready")
        for p in self.popens:
            p.stdin.write("go\n")
            p.stdin.flush()
        rate = 0.0
        for p in self.popens:
            match = re.match(r"calls (\d+) seconds ([\d.]+)", self.reply(p))
            if not match:
                raise RuntimeError("load client: expected a count")
            rate += int(match.group(1)) / float(match.group(2))
        return rate

    def close(self) -> None:
        for p in self.popens:
            if p.poll() is None:
                try:
                    p.stdin.write("quit\n")
                    p.stdin.close()
                    p.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    p.kill()
                    p.wait(timeout=30)


def load_section(env: Env, pool: LoadPool, report: Report) -> list[Load]:
    """Calls/s of --load-procs x --load-threads callers: the raw echo server, then gradserve with
    --workers 1 and 2 (LOAD_WORKERS; servers started with the others), every gradserve load process
    opening LOAD_CONNECTIONS connections so that one client reaches every worker."""
    args = env.args
    results: list[Load] = []
    connections = LOAD_CONNECTIONS if env.features.connections else 1

    def one(name: str, what: str, kind: str, target: str, conns: int = 1) -> None:
        load = Load(name, what)
        if not target:
            load.error = "n/a (feature not present)"
            report(f"  {what}: {load.error}")
        else:
            try:
                load.per_s = pool.rate(kind, target, args.throughput_s, conns)
                report(f"  {what}: {load.per_s:,.0f} calls/s")
            except Exception as exc:  # noqa: BLE001
                load.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                report(f"  {what}: ERR {load.error}")
        results.append(load)

    one("echo", "(b) echo, one process", "echo", env.echo_target)
    for workers in LOAD_WORKERS:
        target = env.gs_target if workers == 1 else env.workers_targets.get(workers, "")
        one("gs" if workers == 1 else f"gs_workers{workers}",
            f"(d) gs FB, --workers {workers}, {connections} connection(s) per process", "gs", target, connections)
    return results


@dataclass
class Memory:
    method: str
    n: int
    baseline: int = 0
    peak: int = 0
    fresh: bool = True
    error: str = ""

    @property
    def nbytes(self) -> int:
        return 4 * self.n


def one_round_trip(client: Any, method: str, x: Any, ones: Any) -> None:
    if method == "gs_fb":
        client.forward_backward("square", x)
    else:
        x.grad = None
        client.function("square")(x).backward(ones)
        x.grad = None


def memory_section(
    env: Env, out: Path, n: int, max_bytes: int, report: Report, main_pid: int | None, local_proc: subprocess.Popen[str]
) -> list[Memory]:
    """Peak RSS (VmHWM) of a gradserve server for one round trip of n float32 elements, and of the same
    math locally in ``local_proc`` (``--local-rss n``, started early; measures when told to)."""
    import torch

    from gradserve.client import GradientClient

    results: list[Memory] = []
    x = torch.rand(n).add_(0.5).requires_grad_()
    ones = torch.ones(n)
    small = torch.ones(4, requires_grad=True)
    for method in ("gs_fwd_bwd", "gs_fb"):
        mem = Memory(method, n, fresh=main_pid is None)
        try:
            with ExitStack() as stack:
                if main_pid is None:  # a fresh server, so VmHWM is this round trip's alone
                    proc, target = stack.enter_context(gradserve_server(out, max_bytes, f"gradserve-rss-{method}"))
                    client = stack.enter_context(GradientClient(target, timeout=env.args.call_timeout_s))
                    pid = proc.pid
                else:  # --smoke: the shared server (its peak includes the latency sweep)
                    client, pid = env.gs_client, main_pid
                one_round_trip(client, method, small, torch.ones(4))  # connect, warm the code paths
                mem.baseline = proc_status(pid)["VmRSS"]
                one_round_trip(client, method, x, ones)
                mem.peak = proc_status(pid)["VmHWM"]
        except Exception as exc:  # noqa: BLE001
            mem.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        results.append(mem)
        if mem.error:
            report(f"  {LABELS[method]}: ERR {mem.error}")
        else:
            report(
                f"  {LABELS[method]}: n={fmt_n(n)} ({fmt_bytes(mem.nbytes)}), server RSS before {fmt_bytes(mem.baseline)}, "
                f"peak {fmt_bytes(mem.peak)} = {mem.peak / mem.nbytes:.2f}x the tensor "
                f"(peak - before = {(mem.peak - mem.baseline) / mem.nbytes:.2f}x)"
                + ("" if mem.fresh else "  [shared server: peak includes the latency sweep]")
            )
        gc.collect()
    local = Memory("local", n, fresh=True)
    try:
        ready = local_proc.stdout.readline().strip() == "ready"
        stdout, stderr = local_proc.communicate("go\n" if ready else "", timeout=900)
        match = re.search(r"rss before (\d+) peak (\d+)", stdout)
        if not match:
            raise RuntimeError(f"exit {local_proc.returncode}: {stderr.strip()[-300:]}")
        local.baseline, local.peak = int(match.group(1)), int(match.group(2))
        report(f"  {LABELS['local']} in a fresh process (the math's own floor): peak {fmt_bytes(local.peak)} = "
               f"{local.peak / local.nbytes:.2f}x the tensor "
               f"(peak - before = {(local.peak - local.baseline) / local.nbytes:.2f}x)")
    except Exception as exc:  # noqa: BLE001
        local.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        report(f"  {LABELS['local']}: ERR {local.error}")
    results.append(local)
    return results


# --------------------------------------------------------------------------- GPU


def cuda_section(sizes: list[int], report: Report) -> list[dict[str, Any]]:
    """Host-device transfers (pinned and pageable) and the VJP of examples.Square on the GPU, against
    the time its memory traffic takes at the device's own copy bandwidth. Medians of CUDA-event timings."""
    import torch

    from gradserve.server.examples import Square

    dev = torch.device("cuda")
    report(f"GPU: {torch.cuda.get_device_name(dev)}, CUDA {torch.version.cuda}")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn: Callable[[], Any], reps: int) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def one_size(n: int) -> dict[str, Any]:
        nbytes = 4 * n
        reps = 20 if n <= 10_000_000 else 5
        pinned, pageable = torch.rand(n).pin_memory(), torch.rand(n)
        pinned_out, pageable_out = torch.empty(n, pin_memory=True), torch.empty(n)
        d, d2 = torch.empty(n, device=dev), torch.empty(n, device=dev)
        row: dict[str, Any] = {"n": n, "nbytes": nbytes}
        row["h2d_pinned_s"] = timed(lambda: d.copy_(pinned, non_blocking=True), reps)
        row["h2d_pageable_s"] = timed(lambda: d.copy_(pageable), reps)
        row["d2h_pinned_s"] = timed(lambda: pinned_out.copy_(d, non_blocking=True), reps)
        row["d2h_pageable_s"] = timed(lambda: pageable_out.copy_(d), reps)
        row["d2d_s"] = timed(lambda: d2.copy_(d), reps)  # reads and writes nbytes
        x = d.add(0.5).requires_grad_()
        ones = torch.ones((), device=dev).expand(n)

        def vjp() -> None:
            x.grad = None
            Square.apply(x).backward(ones)

        row["vjp_s"] = timed(vjp, reps)
        # Square forward reads x and writes y; backward reads x, writes the product and scales it in
        # place (a read and a write): 6 x nbytes of traffic (broadcast ones are not read from memory).
        row["vjp_bound_s"] = 6 * nbytes / (2 * nbytes / row["d2d_s"])
        return row

    rows = []
    for n in sizes:
        row = one_size(n)
        torch.cuda.empty_cache()
        nbytes = row["nbytes"]
        gbps = {k: nbytes / row[k] / 1e9 for k in ("h2d_pinned_s", "h2d_pageable_s", "d2h_pinned_s", "d2h_pageable_s")}
        report(f"  n={fmt_n(n)} ({fmt_bytes(nbytes)}): H2D pinned {gbps['h2d_pinned_s']:.1f} GB/s, pageable "
               f"{gbps['h2d_pageable_s']:.1f} GB/s; D2H pinned {gbps['d2h_pinned_s']:.1f} GB/s, pageable "
               f"{gbps['d2h_pageable_s']:.1f} GB/s")
        report(f"    VJP (examples.Square forward + backward) {fmt_ms(row['vjp_s'])} ms against {fmt_ms(row['vjp_bound_s'])} ms "
               f"bandwidth-bound = {row['vjp_s'] / row['vjp_bound_s']:.2f}x "
               f"(device copy {2 * nbytes / row['d2d_s'] / 1e9:.0f} GB/s)")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- output


def latency_tables(stats: dict[int, dict[str, Stat]], report: Report) -> None:
    sizes = sorted(stats)
    width = 17
    report("Latency per call, median ms (p90 ms)")
    report(f"{'n':>7} {'bytes':>10} " + "".join(f"{LABELS[m]:>{width}}" for m in METHODS))
    for n in sizes:
        cells = []
        for m in METHODS:
            s = stats[n][m]
            cells.append(f"{fmt_ms(s.median)} ({fmt_ms(s.p90)})" if s.times else ("n/a" if "unavailable" in s.error else "ERR"))
        report(f"{fmt_n(n):>7} {fmt_bytes(4 * n):>10} " + "".join(f"{c:>{width}}" for c in cells))
    for base in ("local", "echo", "torch_rpc"):
        report()
        report(f"Ratio of medians vs {LABELS[base]}")
        others = [m for m in METHODS if m != base]
        report(f"{'n':>7} {'bytes':>10} " + "".join(f"{LABELS[m]:>{width}}" for m in others))
        for n in sizes:
            b = stats[n][base]
            cells = []
            for m in others:
                s = stats[n][m]
                cells.append(f"{s.median / b.median:.2f}x" if (s.times and b.times) else "n/a")
            report(f"{fmt_n(n):>7} {fmt_bytes(4 * n):>10} " + "".join(f"{c:>{width}}" for c in cells))


@dataclass
class Results:
    """Everything one run measured: what the goals are computed from."""

    args: argparse.Namespace
    features: Features
    stats: dict[int, dict[str, Stat]]
    tput: list[Throughput]
    load: list[Load]
    mem: list[Memory]

    def median(self, n: int, method: str) -> float | None:
        s = self.stats.get(n, {}).get(method)
        return s.median if s is not None and s.times else None

    def latency_ratio(self, n: int, method: str, base: str) -> tuple[float | None, str]:
        """Ratio of medians of ``method`` over ``base`` at n elements, or why there is none."""
        feature = OPTIONAL_METHODS.get(method)
        if feature and not getattr(self.features, feature):
            return None, "n/a (feature not present)"
        if n not in self.stats:
            return None, f"not measured: needs n={fmt_n(n)} in --sizes"
        a, b = self.median(n, method), self.median(n, base)
        if a is None or b is None:
            return None, "not measured: " + (self.stats[n][method].error or self.stats[n][base].error)
        return a / b, ""

    def load_ratio(self, name: str, base: str) -> tuple[float | None, str]:
        by = {x.name: x for x in self.load}
        a, b = by.get(name), by.get(base)
        if a is None or b is None:
            return None, "not measured"
        if a.error or b.error:
            return None, a.error if a.error.startswith("n/a") else f"not measured: {a.error or b.error}"
        return a.per_s / b.per_s, ""

    def rss_ratio(self, method: str) -> tuple[float | None, str]:
        m = next((m for m in self.mem if m.method == method), None)
        if m is None or m.error:
            return None, f"not measured: {m.error if m else 'no memory run'}"
        value = m.peak / m.nbytes
        if m.nbytes < 900 * MiB or not m.fresh:  # the idle interpreter's ~300 MiB would dwarf a small tensor
            return value, (f"NOT JUDGED at {fmt_bytes(m.nbytes)}: needs --huge or --rss-n 2.5e8 "
                           f"(growth over the idle server: {(m.peak - m.baseline) / m.nbytes:.2f}x)")
        return value, f"growth over the idle server: {(m.peak - m.baseline) / m.nbytes:.2f}x"


@dataclass(frozen=True)
class Goal:
    """One goal: a ratio measured side by side in this run, and its limit (op None: measured, no limit)."""

    name: str
    ratio: Callable[[Results], tuple[float | None, str]]
    op: str | None = "<="
    limit: float = 1.0

    def verdict(self, value: float | None, note: str) -> str:
        if value is None:
            return note or "not measured"
        if self.op is None or note.startswith("NOT JUDGED"):
            return "measured" if self.op is None else "not judged"
        return "met" if (value <= self.limit if self.op == "<=" else value >= self.limit) else "missed"


# The goals of issue 13 (and the one of issue 4 still standing), in the order. A new
# measure is one entry here (and, if it needs a new measurement, a method or a load run).
GOALS = (
    Goal("ForwardBackward, 1 element, vs a raw gRPC unary echo of 64 B",
         lambda r: r.latency_ratio(1, "gs_fb", "echo"), "<=", 1.2),
    Goal("ForwardBackward, 1e6 float32, vs a raw echo of the same 4 MB",
         lambda r: r.latency_ratio(1_000_000, "gs_fb", "echo"), "<=", 1.5),
    Goal("client.function forward + backward, 1e7 float32, vs torch.distributed.rpc + dist_autograd",
         lambda r: r.latency_ratio(10_000_000, "gs_fwd_bwd", "torch_rpc"), "<=", 1.0),
    Goal("the same with same-host shared memory",
         lambda r: r.latency_ratio(10_000_000, "gs_shm", "torch_rpc"), "<=", 0.4),
    Goal("calls/s, 4 client processes x 8 threads, --workers 2, vs the single-process raw echo server",
         lambda r: r.load_ratio("gs_workers2", "echo"), ">=", 0.8),
    Goal("the same with --workers 1 (one server process)",
         lambda r: r.load_ratio("gs", "echo"), None),
    # Unix sockets: the issue asks for a measurement against TCP loopback, not a number (informational).
    Goal("ForwardBackward, 1 element, unix socket vs TCP loopback (informational)",
         lambda r: r.latency_ratio(1, "gs_unix", "gs_fb"), None),
    Goal("ForwardBackward, 1e6 float32, unix socket vs TCP loopback (informational)",
         lambda r: r.latency_ratio(1_000_000, "gs_unix", "gs_fb"), None),
    Goal("server peak RSS, ForwardBackward on a 1 GiB tensor, / tensor size",
         lambda r: r.rss_ratio("gs_fb"), "<=", 3.0),
    Goal("ForwardBackward, 1 element, vs torch rpc forward + backward (issue 4)",
         lambda r: r.latency_ratio(1, "gs_fb", "torch_rpc"), "<=", 0.6),
)


def goals(results: Results, report: Report) -> list[tuple[Goal, float | None, str, str]]:
    """Print each goal as a ratio from this run with its verdict; returns (goal, value, verdict, note) rows."""
    report("Goals (issue 13), ratios of medians from this run")
    rows = []
    for goal in GOALS:
        value, note = goal.ratio(results)
        verdict = goal.verdict(value, note)
        shown = f"{value:.2f}x" if value is not None else "-"
        limit = f"{'<=' if goal.op == '<=' else '>='} {goal.limit:g}x" if goal.op else "(no goal)"
        extra = f"  ({note})" if note and value is not None else ""
        shown_verdict = verdict.upper() if verdict in ("met", "missed") else verdict
        report(f"  {goal.name:<92} {shown:>7}  goal {limit:<9} {shown_verdict}{extra}")
        rows.append((goal, value, verdict, note))
    return rows


def write_goals_csv(out: Path, rows: list[tuple[Goal, float | None, str, str]], load: list[Load]) -> None:
    with open(out / "goals.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["goal", "ratio", "op", "limit", "verdict", "note"])
        for goal, value, verdict, note in rows:
            w.writerow([goal.name, f"{value:.4g}" if value is not None else "", goal.op or "", goal.limit if goal.op else "",
                        verdict, note])
    with open(out / "load.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "what", "calls_per_s", "error"])
        for x in load:
            w.writerow([x.name, x.what, f"{x.per_s:.6g}" if not x.error else "", x.error])


def write_csvs(out: Path, stats: dict[int, dict[str, Stat]], tput: list[Throughput], mem: list[Memory]) -> None:
    with open(out / "latency.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "label", "n", "nbytes", "repeats", "median_ms", "p90_ms", "min_ms", "mean_ms", "error"])
        for n in sorted(stats):
            for m in METHODS:
                s = stats[n][m]
                if s.times:
                    w.writerow([m, LABELS[m], n, 4 * n, len(s.times), f"{s.median * 1e3:.6g}", f"{s.p90 * 1e3:.6g}",
                                f"{min(s.times) * 1e3:.6g}", f"{statistics.fmean(s.times) * 1e3:.6g}", ""])
                else:
                    w.writerow([m, LABELS[m], n, 4 * n, 0, "", "", "", "", s.error])
    with open(out / "throughput.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "label", "callers", "calls", "seconds", "calls_per_s", "error"])
        for t in tput:
            w.writerow([t.method, LABELS[t.method], t.callers, t.calls, f"{t.seconds:.6g}", f"{t.per_s:.6g}", t.error])
    with open(out / "memory.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "label", "n", "nbytes", "fresh_server", "rss_before_bytes", "peak_rss_bytes",
                    "peak_over_size", "error"])
        for m in mem:
            w.writerow([m.method, LABELS[m.method], m.n, m.nbytes, int(m.fresh), m.baseline, m.peak,
                        f"{m.peak / m.nbytes:.4g}" if not m.error else "", m.error])


def plot(
    out: Path, stats: dict[int, dict[str, Stat]], tput: list[Throughput], load: list[Load], machine: str
) -> Path | None:
    """bench.png: latency against size, calls/s of threads sharing one client, and of the multi-process load."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1.6, 1, 0.8]})
    sizes = sorted(stats)
    for m in METHODS:
        pts = [(4 * n, stats[n][m]) for n in sizes if stats[n][m].times]
        if not pts:
            continue
        xs = [b for b, _ in pts]
        meds = [s.median * 1e3 for _, s in pts]
        up = [max(0.0, s.p90 * 1e3 - s.median * 1e3) for _, s in pts]
        ax.errorbar(xs, meds, yerr=[[0] * len(up), up], marker="o", capsize=3, label=LABELS[m])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tensor size, bytes (float32)")
    ax.set_ylabel("ms per forward + backward (median; bar to p90)")
    ax.set_title("y = x², loopback")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    callers = sorted({t.callers for t in tput})
    methods = [m for m in ("echo", "gs_fb") if any(t.method == m for t in tput)]
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [next((t.per_s for t in tput if t.method == m and t.callers == c), 0.0) for c in callers]
        bx.bar([j + i * width for j in range(len(callers))], vals, width, label=LABELS[m])
    bx.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(callers))], [str(c) for c in callers])
    bx.set_xlabel("concurrent callers (threads, one client)")
    bx.set_ylabel("calls/s")
    bx.set_title("small tensor throughput")
    bx.legend()
    measured = [x for x in load if not x.error]
    cx.bar(range(len(measured)), [x.per_s for x in measured], color=["C0" if x.name == "echo" else "C1" for x in measured])
    cx.set_xticks(range(len(measured)), ["echo" if x.name == "echo" else x.what.split(",")[1].strip() for x in measured])
    cx.set_ylabel("calls/s")
    cx.set_xlabel("server (client processes x threads)")
    cx.set_title("multi-process load, small tensor")
    fig.suptitle(machine, fontsize=8)
    fig.tight_layout()
    path = out / "bench.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few repeats: a few seconds (CI)")
    p.add_argument("--huge", action="store_true", help=f"also n={fmt_n(HUGE_N)} (1 GB per copy) and the server RSS at that size")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/out)")
    p.add_argument("--sizes", type=lambda s: [int(float(v)) for v in s.split(",")], default=None,
                   help="comma-separated element counts (default 1,1e3,1e5,1e6,1e7; smoke 1,1e3)")
    p.add_argument("--no-rpc", action="store_true", help="skip torch.distributed.rpc (e)")
    p.add_argument("--rpc-transports", default="uv",
                   help="TensorPipe transports: uv (TCP over loopback, like gRPC; default) "
                   "or 'default' (TensorPipe picks; may use shared memory)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds of calls per method and size (default 2; smoke 0.05)")
    p.add_argument("--min-reps", type=int, default=None)
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per method and size first")
    p.add_argument("--rounds", type=int, default=None, help="turns the methods take per size (default 4; smoke 1)")
    p.add_argument("--small-n", type=int, default=1, help="elements of the small tensor of the throughput test")
    p.add_argument("--callers", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32])
    p.add_argument("--throughput-s", type=float, default=None, help="seconds per throughput point (default 3; smoke 0.25)")
    p.add_argument("--call-timeout-s", type=float, default=None)
    p.add_argument("--rss-n", type=lambda s: int(float(s)), default=None,
                   help=f"elements of the peak-RSS round trip (default {fmt_n(HUGE_N)} with --huge, else the largest size)")
    p.add_argument("--load-procs", type=int, default=None, help="client processes of the multi-process load (default 4; smoke 2)")
    p.add_argument("--load-threads", type=int, default=None, help="threads per load process (default 8; smoke 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="the gradserve server's device; cuda also times pinned/pageable transfers and the VJP "
                   "against its bandwidth-bound time (default sizes 1e6,1e8); skipped with a message without a GPU")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--verbose", action="store_true", help="tracebacks of failed measurements")
    # subprocess roles
    p.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--echo-workers", type=int, default=16, help="echo server threads (gradserve's default max_workers)")
    p.add_argument("--rpc-worker", type=int, metavar="PORT", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rpc-timeout-s", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--load-client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local-rss", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    smoke = a.smoke
    if a.sizes is None:
        cpu_sizes = [1, 1000, 100_000, 1_000_000, 10_000_000]
        a.sizes = [1, 1000] if smoke else ([1_000_000, 100_000_000] if a.device == "cuda" else cpu_sizes)
    a.load_procs = a.load_procs if a.load_procs is not None else (2 if smoke else 4)
    a.load_threads = a.load_threads if a.load_threads is not None else (2 if smoke else 8)
    if a.huge and HUGE_N not in a.sizes:
        a.sizes.append(HUGE_N)
    a.sizes = sorted(set(a.sizes))
    a.budget_s = a.budget_s if a.budget_s is not None else (0.05 if smoke else 2.0)
    a.min_reps = a.min_reps if a.min_reps is not None else (3 if smoke else 8)
    a.max_reps = a.max_reps if a.max_reps is not None else (20 if smoke else 400)
    a.rounds = a.rounds if a.rounds is not None else (1 if smoke else 4)
    a.throughput_s = a.throughput_s if a.throughput_s is not None else (0.25 if smoke else 3.0)
    a.call_timeout_s = a.call_timeout_s if a.call_timeout_s is not None else (60.0 if smoke else 900.0)
    a.rpc_timeout_s = a.rpc_timeout_s if a.rpc_timeout_s is not None else (30.0 if smoke else 900.0)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_server:
        return echo_server_main(args.echo_workers)
    if args.rpc_worker is not None:
        return rpc_worker_main(args.rpc_worker, args.rpc_transports, args.rpc_timeout_s)
    if args.load_client:
        return load_client_main(args)
    if args.local_rss is not None:
        return local_rss_main(args.local_rss)
    return run(args)


def run(args: argparse.Namespace) -> int:
    global METHODS
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed")
    started = time.perf_counter()
    import grpc
    import torch

    from gradserve.client import GradientClient

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: skipped, torch.cuda.is_available() is False (no GPU or no CUDA build here); "
              "run it on a GPU machine, or without --device for the CPU benchmark", flush=True)
        return 0
    features = Features.detect()
    METHODS = METHODS + tuple(m for m, feature in OPTIONAL_METHODS.items() if getattr(features, feature))

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    machine = machine_description()
    largest = max(args.sizes) if args.smoke else max(n for n in args.sizes if n < HUGE_N)
    rss_n = args.rss_n or (HUGE_N if args.huge else largest)
    max_n = max(args.sizes + [args.small_n, rss_n])
    # Room for the largest message: a ForwardBackward response carries output and gradient.
    max_bytes = min(GRPC_MAX_INT, max(256 * MiB, 2 * 4 * max_n + 64 * MiB))
    report(f"gradserve benchmark{' (smoke)' if args.smoke else ''}: {machine}")
    report(code_state())
    report(f"load average at start: {load_average()}")
    report(f"sizes {', '.join(fmt_n(n) for n in args.sizes)} float32; budget {args.budget_s:g} s per method and size, "
           f"reps {args.min_reps}-{args.max_reps}; torch rpc transports: {'skipped' if args.no_rpc else args.rpc_transports}")
    for m in METHODS:
        report(f"  {LABELS[m]:<14} {LEGEND[m]}")
    report(f"gradserve features: {features.describe()}; server device {args.device}")

    env = Env(args, features=features)
    stats: dict[int, dict[str, Stat]] = {}
    tput: list[Throughput] = []
    mem: list[Memory] = []
    load: list[Load] = []
    rpc_started = False
    me = [sys.executable, str(Path(__file__).resolve())]
    with ExitStack() as stack:
        # Start every server and the load processes at once: their start-ups (imports) overlap.
        gs_proc = stack.enter_context(spawn("gradserve-server", gradserve_argv(max_bytes, args.device), out))
        echo_argv = me + ["--echo-server", "--echo-workers", str(args.echo_workers)]
        echo_proc = stack.enter_context(spawn("echo-server", echo_argv, out))
        extra_procs: dict[str, Proc] = {}  # name: process, of the servers with --workers N > 1 and on a unix socket
        for workers in (w for w in LOAD_WORKERS if w > 1 and features.workers):
            extra_procs[f"--workers {workers}"] = stack.enter_context(spawn(
                f"gradserve-workers{workers}", gradserve_argv(max_bytes, args.device, ("--workers", str(workers))), out))
        if features.unix:
            sock_dir = Path(tempfile.mkdtemp(prefix="gradserve-bench-"))
            stack.callback(shutil.rmtree, sock_dir, ignore_errors=True)  # after the server's stop (LIFO)
            extra_procs["unix"] = stack.enter_context(spawn(
                "gradserve-unix", gradserve_argv(max_bytes, args.device, host=f"unix:{sock_dir / 'gs.sock'}"), out))
        pool = LoadPool(args)
        stack.callback(pool.close)
        local_proc = subprocess.Popen(me + ["--local-rss", str(rss_n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT)
        stack.callback(end_process, local_proc)
        rpc_proc = None
        if not args.no_rpc:
            rpc_port = free_port()
            rpc_env(rpc_port)
            rpc_proc = stack.enter_context(spawn(
                "rpc-worker",
                me + ["--rpc-worker", str(rpc_port), "--rpc-transports", args.rpc_transports,
                      "--rpc-timeout-s", str(args.rpc_timeout_s)],
                out, env=dict(os.environ),
            ))
            try:
                import torch.distributed.rpc as rpc

                rpc.init_rpc("bench", rank=0, world_size=2,
                             rpc_backend_options=rpc_options(rpc_port, args.rpc_transports, args.rpc_timeout_s))
                rpc_started = True
                env.rpc_ready = True

                def shutdown_rpc() -> None:
                    try:
                        rpc.shutdown()  # graceful; the worker exits with it
                    except Exception as exc:  # noqa: BLE001
                        print(f"torch rpc shutdown: {exc}", file=sys.stderr)

                # Registered after the worker's stop, so it runs before it (ExitStack is LIFO).
                stack.callback(shutdown_rpc)
            except Exception as exc:  # noqa: BLE001
                env.rpc_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                report(f"  ! torch rpc did not start: {env.rpc_error}")
        env.gs_target = gs_proc.wait_for_line(LISTENING, 120).group(1)
        env.echo_target = echo_proc.wait_for_line(LISTENING, 60).group(1)
        targets = {name: proc.wait_for_line(LISTENING, 120).group(1) for name, proc in extra_procs.items()}
        env.workers_targets = {int(name.split()[1]): t for name, t in targets.items() if name.startswith("--workers")}
        env.unix_target = targets.get("unix", "")
        env.gs_client = stack.enter_context(GradientClient(env.gs_target, timeout=args.call_timeout_s))
        if features.shared_memory:
            # Smoke: a 1-byte threshold, so that its tiny tensors take the shared-memory path too.
            shm_kwargs = {"shared_memory_threshold_bytes": 1} if args.smoke else {}
            env.shm_client = stack.enter_context(
                GradientClient(env.gs_target, timeout=args.call_timeout_s, shared_memory=True, **shm_kwargs))
        if env.unix_target:
            env.unix_client = stack.enter_context(GradientClient(env.unix_target, timeout=args.call_timeout_s))
        env.echo_channel = stack.enter_context(grpc.insecure_channel(env.echo_target, options=UNLIMITED))
        env.echo_stub = env.echo_channel.unary_unary(ECHO_METHOD)
        grpc.channel_ready_future(env.echo_channel).result(timeout=30)
        report(f"servers up after {time.perf_counter() - started:.1f} s: gradserve pid {gs_proc.pid} at {env.gs_target}, "
               f"echo pid {echo_proc.pid} at {env.echo_target}"
               + (f", torch rpc worker pid {rpc_proc.pid}" if rpc_proc and rpc_started else "")
               + "".join(f", gradserve {name} pid {extra_procs[name].pid} at {t}" for name, t in targets.items()))

        report()
        report("Latency sweep")
        for n in args.sizes:
            stats[n] = measure_size(env, n, report)
            gc.collect()
        report(f"load average after the latency sweep: {load_average()}")

        report()
        report(f"Throughput, n={fmt_n(args.small_n)} float32, threads sharing one client, {args.throughput_s:g} s per point")
        tput = throughput_section(env, report)

        report()
        report(f"Throughput, n={fmt_n(args.small_n)} float32, {args.load_procs} client processes x {args.load_threads} threads, "
               f"{args.throughput_s:g} s")
        load = load_section(env, pool, report)

        report()
        report(f"gradserve server peak RSS (VmHWM), one round trip of n={fmt_n(rss_n)} float32")
        mem = memory_section(env, out, rss_n, max_bytes, report, gs_proc.pid if args.smoke else None, local_proc)

        if args.device == "cuda":
            report()
            cuda_section(args.sizes, report)

    report()
    latency_tables(stats, report)
    report()
    report("Throughput, calls/s")
    report(f"{'callers':>7} " + "".join(f"{LABELS[m]:>14}" for m in ("echo", "gs_fb")) + f"{'gs FB / echo':>14}")
    for c in args.callers:
        row = {t.method: t for t in tput if t.callers == c}
        vals = [row.get(m) for m in ("echo", "gs_fb")]
        cells = [f"{v.per_s:,.0f}" if v and not v.error else "ERR" for v in vals]
        r = f"{vals[1].per_s / vals[0].per_s:.2f}x" if all(v and not v.error and v.per_s for v in vals) else "n/a"
        report(f"{c:>7} " + "".join(f"{x:>14}" for x in cells) + f"{r:>14}")
    report()
    goal_rows = goals(Results(args, features, stats, tput, load, mem), report)

    write_csvs(out, stats, tput, mem)
    write_goals_csv(out, goal_rows, load)
    png = None if args.no_plot else plot(out, stats, tput, load, machine)
    report()
    report(f"wrote {out / 'latency.csv'}, throughput.csv, load.csv, memory.csv, goals.csv"
           + (f", {png.name}" if png else ("" if args.no_plot else " (no plot: matplotlib missing; pip install -e '.[bench]')")))
    report(f"total {time.perf_counter() - started:.1f} s; load average at end: {load_average()}")
    (out / "report.txt").write_text("\n".join(report.lines) + "\n")
    failed = any(s.error and "unavailable" not in s.error for per in stats.values() for s in per.values())
    failed |= any(t.error for t in tput) or any(m.error for m in mem)
    failed |= any(x.error and not x.error.startswith("n/a") for x in load)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
