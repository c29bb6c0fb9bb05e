"""Assembles a gRPC server: servicer, health, reflection, metrics, TLS, tokens; and the blocking ``serve``."""

from __future__ import annotations

import gc
import ipaddress
import logging
import math
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.v1 import streaming
from gradserve.v1.connection import SERVER_KEEPALIVE_POLICY

from ._admission import AdmissionExecutor, ByteBudget, ConcurrencyLimit, IdleWatchdog
from ._auth import TokenAuthInterceptor, load_tokens
from ._checks import CheckResult, check_function, format_table
from ._config import ServerConfig
from ._metrics import Metrics
from ._registry import Registry, load_modules
from ._runtime import Runtime, resolve_device
from ._servicer import GradientServicer
from ._shm import SharedMemoryService

__all__ = ["EXIT_CONFIG_ERROR", "EXIT_FORCED", "EXIT_OK", "RunningServer", "create_server", "serve"]

log = logging.getLogger("gradserve.server")
T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientService"].full_name
# Health checks and ListFunctions have this many call slots (and threads) of their own,
# beyond --max-concurrent-rpcs, so they answer while every other slot is taken.
_RESERVED_CALLS = 8
# Threads for refusals (busy, bad token): each is answered at once, without reading the request.
_REFUSAL_THREADS = 8

EXIT_OK = 0
"""Drained (every call finished within the grace period), or stopped during start-up."""
EXIT_CONFIG_ERROR = 2
"""Bad configuration or a failed start (``gradserve serve`` prints the reason)."""
EXIT_FORCED = 3
"""The grace period ran out with calls still running: the process exited without waiting for them."""


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the cgroup CPU quota (v2 or v1) and the affinity mask, at least 1.

    A container limited to 2 CPUs on a 64-core host gets 2, so torch does not start 64
    intra-op threads that fight over 2 CPUs. ``cgroup_root`` is where the cgroup
    filesystem is mounted (v2: ``cpu.max``; v1: ``cpu/cpu.cfs_quota_us`` and
    ``cpu/cpu.cfs_period_us``); unreadable or malformed files are ignored.
    """
    limits = [len(os.sched_getaffinity(0))] if hasattr(os, "sched_getaffinity") else [os.cpu_count() or 1]
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            limits.append(math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        try:
            quota_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
            period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
            if quota_us > 0:
                limits.append(math.ceil(quota_us / period_us))
        except (OSError, ValueError):
            pass
    return max(1, min(limits))


@dataclass
class RunningServer:
    """A started server.

    Attributes
    ----------
    port : int
        The bound gRPC port (useful when the config asked for 0); 0 on a unix socket.
    metrics_port : int or None
        The bound Prometheus port, or None when metrics are off.
    address : str
        What a client passes as its target: ``HOST:PORT``, or ``unix:PATH``.
    servable : bool
        Whether some Function can be served (health turns SERVING only then).
    """

    grpc_server: grpc.Server
    port: int
    health: health.HealthServicer
    runtime: Runtime
    metrics: Metrics
    metrics_port: int | None = None
    limiter: ConcurrencyLimit | None = None
    watchdog: IdleWatchdog | None = None
    servicer: GradientServicer | None = field(default=None, repr=False)
    address: str = ""
    servable: bool = True
    socket_file: _SocketFile | None = field(default=None, repr=False)

    def set_serving(self, serving: bool) -> None:
        """Health SERVING (when some Function can be served) or NOT_SERVING; no effect once stopping."""
        serving = serving and self.servable
        _set_health(
            self.health, health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    def stop(self, grace_period_s: float | None = None, drain_delay_s: float = 0.0) -> bool:
        """Drain and stop; returns True when no call is still running.

        Health turns NOT_SERVING at once; calls are still taken for ``drain_delay_s``
        seconds (so load balancers notice), then new calls are refused and those in
        flight get ``grace_period_s`` seconds to finish; after that they are cancelled
        and this returns without waiting for a Function still running (Python cannot
        interrupt it): False then.
        """
        self.health.enter_graceful_shutdown()
        if drain_delay_s > 0:
            time.sleep(drain_delay_s)
        # gRPC cancels what is left when the grace period ends; a Function still running
        # keeps its thread, so wait for the stop a little past the grace period only.
        self.grpc_server.stop(grace_period_s).wait(timeout=(grace_period_s or 0.0) + 1.0)
        self.metrics.stop()
        if self.servicer is not None:
            self.servicer.shared_memory.stop()
        if self.socket_file is not None:
            self.socket_file.remove()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.limiter is None:
            return True
        deadline = time.monotonic() + 0.5
        while self.limiter.in_progress() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.limiter.in_progress() == 0


def _set_health(servicer: health.HealthServicer, status: int) -> None:
    for service in ("", SERVICE_NAME):
        servicer.set(service, status)


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not (config.tls_cert_file or config.tls_key_file):
        if config.tls_client_ca_file:
            raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
        return None
    if not (config.tls_cert_file and config.tls_key_file):
        raise ValueError("TLS needs both --tls-cert-file and --tls-key-file")
    files = {}
    for flag, path in (
        ("--tls-key-file", config.tls_key_file),
        ("--tls-cert-file", config.tls_cert_file),
        ("--tls-client-ca-file", config.tls_client_ca_file),
    ):
        if path:
            try:
                files[flag] = Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from exc
    client_ca = files.get("--tls-client-ca-file")
    return grpc.ssl_server_credentials(
        [(files["--tls-key-file"], files["--tls-cert-file"])],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _is_loopback(host: str) -> bool:
    if host.startswith("unix:"):  # local by construction; only the same user may connect
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class _Serializing:
    """Passes the generated handlers on to ``server`` with the serializers of ``gradserve.v1.streaming``:
    unary replies arrive serialised from the servicer (counted without serialising twice), and
    StreamCall's data chunks are framed without protobuf copies."""

    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(service, {k: _serializing(k, h) for k, h in handlers.items()})

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(tuple(_SerializingGeneric(h) for h in handlers))


def _serializing(method: str, handler: Any) -> Any:
    if method.rsplit("/", 1)[-1] == "StreamCall":
        return streaming.framed_handler(handler)
    return handler._replace(response_serializer=streaming.serialize)


class _SerializingGeneric(grpc.GenericRpcHandler):
    """A generic handler (unregistered calls) with the serializers of :class:`_Serializing`."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._inner.service(handler_call_details)
        return None if handler is None else _serializing(handler_call_details.method, handler)


def create_server(
    config: ServerConfig,
    registry: Registry | None = None,
    *,
    stopping: threading.Event | None = None,
    hold_health: bool = False,
    shared_memory_key: bytes | None = None,
) -> RunningServer:
    """Build and start a server for ``config``; returns once it serves (it does not block).

    One process's server: ``config.workers`` is :func:`serve`'s to act on (above 1, this
    only lets the port be shared with the sibling workers).

    The port is bound first, with health NOT_SERVING and calls answered UNAVAILABLE
    while the Functions load (and, with ``config.check``, are gradchecked); then health
    turns SERVING, or stays NOT_SERVING if no Function can be served.

    Parameters
    ----------
    config
        Settings; ``port=0`` binds a free port, returned in ``RunningServer.port``.
    registry
        Functions to serve. ``None`` imports ``config.functions`` (or the built-in
        examples) and the ``gradserve.functions`` entry points.
    stopping
        Set (by a signal handler) to abandon start-up between two checks.
    hold_health
        Keep health NOT_SERVING once loaded, until ``RunningServer.set_serving(True)``
        (a worker process waits for its siblings).
    shared_memory_key
        Secret (32 bytes or more) for same-host shared-memory session tokens; default a
        random one per process. Worker processes sharing a port get one from their parent,
        so a client's token from one worker works on every other.

    Raises
    ------
    ImportError
        A functions module fails to import.
    ValueError
        Unknown device, CUDA asked for but absent, incomplete or unreadable TLS or token
        settings (an empty token source too: auth fails closed), or the address or the
        metrics port cannot be bound; the message names the flag.
    """
    device = resolve_device(config.device)
    credentials = _credentials(config)
    tokens = load_tokens(config.auth_tokens, config.auth_tokens_file)
    if tokens and credentials is None and not _is_loopback(config.host):
        log.warning(
            "bearer tokens travel in plaintext: --host %s is not a loopback address and TLS is off "
            "(--tls-cert-file/--tls-key-file); anyone on the path can read and replay them",
            config.host,
        )
    # Filled in once the metrics exist; refusals before that are not counted.
    metrics_box: list[Metrics] = []
    budget = ByteBudget(
        config.max_inflight_bytes,
        on_change=lambda used: metrics_box[0].inflight_bytes.set(used) if metrics_box else None,
        on_refused=lambda: metrics_box[0].busy_refusals.labels("inflight_bytes").inc() if metrics_box else None,
    )
    servicer = GradientServicer(
        max_tensor_bytes=config.max_tensor_bytes,
        max_request_bytes=config.max_request_bytes,
        max_concurrent=config.max_workers,
        budget=budget,
        tokens_required=bool(tokens),
        shared_memory=SharedMemoryService(config.shared_memory, key=shared_memory_key),
    )
    watchdog = IdleWatchdog(
        config.idle_stream_timeout_s,
        on_cancel=lambda: metrics_box[0].idle_stream_cancels.inc() if metrics_box else None,
    )
    executor = AdmissionExecutor(
        max_workers=config.concurrent_rpcs + _RESERVED_CALLS + _REFUSAL_THREADS, thread_name_prefix="gradserve"
    )

    def on_busy(method: str) -> None:
        servicer.record_refusal(method, grpc.StatusCode.RESOURCE_EXHAUSTED)
        if metrics_box:
            metrics_box[0].busy_refusals.labels("concurrent_rpcs").inc()

    limiter = ConcurrencyLimit(
        executor,
        config.concurrent_rpcs,
        reserved_methods=frozenset({"/grpc.health.v1.Health/Check", f"/{SERVICE_NAME}/ListFunctions"}),
        reserved_calls=_RESERVED_CALLS,
        watchdog=watchdog,
        on_refused=on_busy,
    )
    interceptors: list[grpc.ServerInterceptor] = []
    if tokens:  # first: a caller without a token takes no call slot
        interceptors.append(TokenAuthInterceptor(tokens, servicer.record_refusal, open_reflection=config.open_reflection))
    interceptors.append(limiter)  # last: it must be the one nearest the handlers
    server = grpc.server(
        executor,
        interceptors=interceptors,
        options=[
            # A C int in gRPC; larger requests must stream anyway (protobuf's 2 GiB ceiling).
            ("grpc.max_receive_message_length", min(config.max_request_bytes, 2**31 - 1)),
            ("grpc.max_send_message_length", -1),
            # Worker processes share the port; a lone server must not share it by accident.
            ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
            *SERVER_KEEPALIVE_POLICY.items(),
        ],
    )
    pb_grpc.add_GradientServiceServicer_to_server(servicer, _Serializing(server))
    health_servicer = health.HealthServicer()
    _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        address, port, socket_file = _bind(server, config, credentials)
    except (ValueError, OSError):
        watchdog.stop()
        raise
    server.start()
    try:
        if registry is None:
            registry = load_modules(config.functions)
        unavailable = _startup_checks(registry, config.check_timeout_s, stopping) if config.check else {}
        runtime = Runtime(
            registry,
            device,
            max_handles=config.max_handles,
            max_handle_bytes=config.max_handle_bytes,
            handle_ttl_s=config.handle_ttl_s,
            check_finite=config.check_finite,
            unavailable=unavailable,
        )
        metrics = Metrics(runtime)
        metrics_port = serve_metrics(config, metrics.serve_http) if config.metrics_port else None
    except BaseException:
        server.stop(0)
        if socket_file is not None:
            socket_file.remove()
        watchdog.stop()
        raise
    metrics_box.append(metrics)
    servicer.shared_memory.start()  # sweeps what dead processes left, then periodically
    servicer.attach(runtime, metrics)
    served = [f.name for f in registry if f.name not in runtime.unavailable]
    if not served:
        log.warning("no Function can be served (none registered, or every one failed its check): health stays NOT_SERVING")
    elif not hold_health:
        _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %d function(s)%s on %s (%s%s%s), device %s%s: %s",
        len(served),
        f" ({len(runtime.unavailable)} more unavailable)" if runtime.unavailable else "",
        address,
        "TLS" if credentials else "plaintext",
        ", same-host shared memory" if servicer.shared_memory.enabled else "",
        ", tokens required" if tokens else "",
        device,
        f", metrics on :{metrics_port}/metrics" if metrics_port else "",
        ", ".join(served),
    )
    return RunningServer(
        server,
        port,
        health_servicer,
        runtime,
        metrics,
        metrics_port,
        limiter,
        watchdog,
        servicer,
        address,
        bool(served),
        socket_file,
    )


def serve_metrics(config: ServerConfig, start: Callable[[str, int], T]) -> T:
    """``start(host, config.metrics_port)``: ``host`` is ``--host``, or 127.0.0.1 for a unix socket.

    Raises
    ------
    ValueError
        The port cannot be bound (the message names ``--metrics-port``).
    """
    host = "127.0.0.1" if config.unix_socket else config.host
    try:
        return start(host, config.metrics_port)
    except OSError as exc:
        raise ValueError(f"--metrics-port {config.metrics_port}: cannot serve metrics on {host}: {exc.strerror or exc}") from exc


class _SocketFile:
    """The unix socket file a server listens on, removed at shutdown only if it is still ours (same inode)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.inode = os.stat(path).st_ino

    def remove(self) -> None:
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass  # gRPC removed it already


def _bind(
    server: grpc.Server, config: ServerConfig, credentials: grpc.ServerCredentials | None
) -> tuple[str, int, _SocketFile | None]:
    """Add the listening port: ``(address for clients, bound TCP port or 0, socket file or None)``.

    A unix socket is created with mode 0600 (so only this user may connect), its
    directory, when missing, with 0700; a socket a live server answers on is not taken over.
    """
    path = config.unix_socket
    if path:
        address = f"unix:{path}"
        _refuse_live_socket(path)
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # umask, not chmod after bind: no moment in which another user could connect.
        umask = os.umask(0o177)
    else:
        address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    flags = f"--host {config.host}" + ("" if path else f" --port {config.port}")
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ValueError(f"{flags}: cannot bind {address}: {exc}") from exc
    finally:
        if path:
            os.umask(umask)
    if not port:
        raise ValueError(f"{flags}: cannot bind {address}")
    if not path:
        host = f"[{config.host}]" if ":" in config.host else config.host
        return f"{host}:{port}", port, None
    os.chmod(path, 0o600)  # whatever gRPC did: the same user only
    return address, 0, _SocketFile(path)


def _refuse_live_socket(path: str) -> None:
    """gRPC replaces an existing socket file; do not take over one a running server answers on, nor touch what is
    not a socket (a user's file, a symlink)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode) else "a file"
        raise ValueError(f"--host unix:{path}: the path exists and is not a socket ({kind}); left alone: choose another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # stale: left by a server that died
    raise ValueError(f"--host unix:{path}: a server is already listening on this socket")


class StartupInterrupted(Exception):
    """A signal asked the server to stop while it was still starting."""


def _startup_checks(registry: Registry, timeout_s: float, stopping: threading.Event | None = None) -> dict[str, str]:
    """gradcheck every Function, each within ``timeout_s`` seconds; returns {name: reason} for those not to serve.

    A check runs in a thread of its own: one that hangs is left behind (Python cannot
    stop it) and its Function is listed as unavailable.
    """
    results: list[CheckResult] = []
    unavailable: dict[str, str] = {}
    for entry in registry:
        box: list[CheckResult] = []

        def run(entry: Any = entry, box: list[CheckResult] = box) -> None:
            try:
                box.append(check_function(entry))
            except BaseException as exc:  # noqa: BLE001 - even SystemExit from a check is a failed check
                box.append(CheckResult(entry.name, "fail", "skip", f"{type(exc).__name__}: {exc}"))

        thread = threading.Thread(target=run, name=f"gradserve-check-{entry.name}", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while thread.is_alive() and time.monotonic() < deadline:
            if stopping is not None and stopping.is_set():
                raise StartupInterrupted("stopped during start-up checks")
            thread.join(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        if box:
            results.append(box[0])
            if not box[0].ok:
                unavailable[entry.name] = f"failed gradcheck at start-up: {box[0].detail}"
        else:
            results.append(CheckResult(entry.name, "fail", "skip", f"check timed out after {timeout_s:g} s"))
            unavailable[entry.name] = f"check timed out after {timeout_s:g} s (--check-timeout-s)"
    log.info("start-up gradient checks:\n%s", format_table(results))
    for name, reason in unavailable.items():
        log.warning("not serving %s: %s", name, reason)
    return unavailable


def serve(
    config: ServerConfig,
    *,
    on_started: Callable[[RunningServer], None] | None = None,
    shared_memory_key: bytes | None = None,
) -> int:
    """Run a server until SIGTERM or SIGINT, then drain for ``config.grace_period_s`` seconds; returns the exit status.

    On the signal, health turns NOT_SERVING at once; calls in flight finish (up to the
    grace period), new ones are refused. A signal during loading or start-up checks
    exits within about a second (:data:`EXIT_OK`). If a Function is still running when
    the grace period ends, the process exits at once with :data:`EXIT_FORCED` (this
    function does not return then).

    With ``config.workers`` above 1 this process supervises that many worker processes
    (see ``gradserve.server._workers``), each running this function with ``on_started``:
    health then stays NOT_SERVING until ``on_started``'s caller turns it on. Workers are
    started with ``spawn``, which imports the main module again: a script calling this
    with workers must do so under ``if __name__ == "__main__":``.
    """
    if config.workers > 1 and on_started is None:
        from ._workers import supervise

        return supervise(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: draining for up to %.1f s", signal.Signals(signum).name, config.grace_period_s)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _return_freed_buffers_to_the_os()
    # Many threads share the GIL (uploads, decoding, Functions); a health check needs it a
    # few times. Switching every 1 ms instead of 5 keeps its wait short under load.
    sys.setswitchinterval(0.001)
    # Worker processes share the CPUs: by default each gets its part of the quota.
    torch.set_num_threads(config.intra_op_threads or max(1, cpu_quota() // config.workers))
    log.info("torch intra-op threads: %d", torch.get_num_threads())
    # Loading and checks run in a thread, so a signal is acted on at once: an import or a
    # check can take minutes, and Python cannot interrupt either.
    started: list[RunningServer] = []
    failed: list[BaseException] = []

    def start() -> None:
        try:
            started.append(
                create_server(config, stopping=stop, hold_health=on_started is not None, shared_memory_key=shared_memory_key)
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failed.append(exc)

    starter = threading.Thread(target=start, name="gradserve-start", daemon=True)
    starter.start()
    while starter.is_alive() and not stop.is_set():
        starter.join(timeout=0.05)
    if failed and not isinstance(failed[0], StartupInterrupted):
        raise failed[0]
    if not started:  # the signal came first: nothing in flight, nothing to drain
        log.info("stopped during start-up")
        _exit_now(EXIT_OK)
    running = started[0]
    # What start-up made (torch, the Functions' modules) lives as long as the process:
    # out of the collector's sight, full collections stay short while calls wait on them.
    gc.freeze()
    if on_started is None:
        print(f"gradserve listening on {running.address}", flush=True)
    else:
        on_started(running)
    stop.wait()
    if not running.stop(config.grace_period_s, config.drain_delay_s):
        log.warning(
            "grace period of %.1f s over with %d call(s) still running: exiting without them (status %d)",
            config.grace_period_s,
            running.limiter.in_progress() if running.limiter else -1,
            EXIT_FORCED,
        )
        _exit_now(EXIT_FORCED)
    log.info("stopped")
    return EXIT_OK


# glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_BYTES = 1 << 20
_ARENA_MAX = 2


def _return_freed_buffers_to_the_os() -> None:
    """Serve buffers of 1 MiB or more from mmap, so that freeing them lowers the RSS at once; at most 2 heaps.

    glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after
    which tensor-sized buffers come from heaps that keep the memory: measured in the
    chaos soak, peak RSS over baseline went from 760 MiB to about 250 MiB with this
    (and a malloc_trim every second, for the small blocks gRPC frees).
    Many threads would each get a heap of their own (up to 8 per core), each keeping
    what it once held: 2 are plenty, as Python allocates small objects itself. The
    ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_ARENA_MAX`` variables, when set, win. No-op
    off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        for variable, param, value in (
            ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES),
            ("MALLOC_ARENA_MAX", _M_ARENA_MAX, _ARENA_MAX),
        ):
            if variable not in os.environ and libc.mallopt(param, value) != 1:
                log.debug("mallopt(%d, %d) refused", param, value)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl or another libc: leave the allocator as it is
        return

    def trim_every_second() -> None:
        # gRPC's message buffers are many small blocks below the mmap threshold; once
        # freed they leave holes in the heaps that only malloc_trim hands back.
        while True:
            time.sleep(1.0)
            trim(0)

    threading.Thread(target=trim_every_second, name="gradserve-malloc-trim", daemon=True).start()


def _exit_now(status: int) -> None:
    """Exit without waiting for threads still running a Function or a check (Python cannot stop them)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
