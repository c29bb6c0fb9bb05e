"""``gradserve serve --workers N``: N server processes on one TCP port, supervised by the parent.

As gRPC's Python multiprocessing example: the parent reserves the port with SO_REUSEPORT
(so ``--port 0`` resolves to one real port) and starts the workers with the ``spawn``
method (gRPC and CUDA do not survive a fork once their threads run); each worker binds
the same port with ``grpc.so_reuseport`` and the kernel spreads *connections* over them.
Every call of one HTTP/2 connection reaches the same worker, so a handle kept by a
forward is found by the backward sent on the same connection; elsewhere the client
recomputes (a handle unknown to a worker is NOT_FOUND).

Each worker has its own Functions, runtime, handle store, compute threads
(``--max-workers``) and device (``--device cuda:0,cuda:1``: worker i gets entry i, round
robin). The parent serves no gRPC itself; it:

- turns health SERVING in every worker only once all of them are serving (each holds
  NOT_SERVING until then), and NOT_SERVING in all at once when stopping;
- serves ``--metrics-port``: the sum of every worker's metrics (prometheus-client
  multiprocess mode, in a private directory removed at exit);
- on SIGTERM/SIGINT, passes SIGTERM to every worker, which drains as a lone server does
  (NOT_SERVING, ``--drain-delay-s``, ``--grace-period-s``), and exits 0 (3 if some worker
  had to abandon calls);
- when a worker dies, stops the others (draining them) and exits :data:`EXIT_WORKER_DIED`:
  a pod whose worker crashed is restarted by Kubernetes, visibly, rather than patched up
  behind its back with a fresh handle store;
- if it dies itself, even by SIGKILL, its workers get SIGTERM from the kernel
  (``PR_SET_PDEATHSIG``; elsewhere a thread watching the parent) and drain: no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from ._config import ServerConfig
from ._metrics import MULTIPROC_DIR_ENV, MetricsEndpoint, mark_process_dead, multiprocess_registry

__all__ = ["EXIT_WORKER_DIED", "supervise"]

log = logging.getLogger("gradserve.server")

EXIT_WORKER_DIED = 4
"""A worker process exited on its own (crash, out of memory): the others were drained and stopped."""

_PR_SET_PDEATHSIG = 1
# Past the grace period, how long to wait for a worker to exit before SIGKILL.
_EXIT_MARGIN_S = 5.0


def supervise(config: ServerConfig) -> int:
    """Run ``config.workers`` worker processes on one port until SIGTERM or SIGINT; returns the exit status.

    Raises
    ------
    ValueError
        A device of ``--device`` is unknown or absent, the port is taken, or a worker
        failed to start (its reason: a functions module that does not import, ...).
    """
    from ._runtime import resolve_device
    from ._server import EXIT_FORCED, EXIT_OK, serve_metrics

    for i in range(config.workers):  # every device, before any worker starts
        resolve_device(config.worker_device(i))
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info(
            "received %s: draining %d workers for up to %.1f s",
            signal.Signals(signum).name,
            config.workers,
            config.grace_period_s,
        )
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics_dir = tempfile.mkdtemp(prefix="gradserve-metrics-")  # mode 0700
    os.environ[MULTIPROC_DIR_ENV] = metrics_dir  # before the workers start: they inherit it
    endpoint: MetricsEndpoint | None = None
    try:
        with _reserved_port(config.host, config.port) as port:
            if config.metrics_port:
                endpoint = serve_metrics(config, lambda h, p: MetricsEndpoint(multiprocess_registry(metrics_dir), h, p))
            workers = _Workers(config, port, stop)
            try:
                workers.run(lambda: _announce(config, port, endpoint))
            finally:
                workers.stop()
                for pid in workers.pids:
                    mark_process_dead(pid, metrics_dir)
    finally:
        if endpoint is not None:
            endpoint.stop()
        os.environ.pop(MULTIPROC_DIR_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if workers.failure:
        raise ValueError(workers.failure)
    status = workers.died_status
    if status is None:
        status = EXIT_FORCED if EXIT_FORCED in workers.exit_codes() else EXIT_OK
    log.info("stopped (status %d)", status)
    return status


def _announce(config: ServerConfig, port: int, endpoint: MetricsEndpoint | None) -> None:
    host = f"[{config.host}]" if ":" in config.host else config.host
    log.info(
        "%d workers serving on %s:%d%s", config.workers, host, port, f", metrics on :{endpoint.port}/metrics" if endpoint else ""
    )
    print(f"gradserve listening on {host}:{port}", flush=True)


class _Workers:
    """The worker processes, and a pipe to each: its start-up report one way, its health the other."""

    def __init__(self, config: ServerConfig, port: int, stop: threading.Event) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.config = config
        self._stop = stop
        self.failure = ""
        self.died_status: int | None = None
        self._procs: list[Any] = []
        # One pipe per worker: it reports ("ready", servable) or ("failed", reason); the parent sends
        # "serving" (every worker is ready) and "stopping". Not multiprocessing.Event: a worker
        # killed while waiting on one leaves set() blocked for good.
        self._pipes: list[Connection] = []
        common = replace(config, port=port, metrics_port=0)  # the parent serves the metrics
        shm_key = secrets.token_bytes(32)  # one shared-memory token key: a token from any worker works on all
        for i in range(config.workers):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(replace(common, device=config.worker_device(i)), i, os.getpid(), theirs, shm_key),
                name=f"gradserve-worker-{i}",
            )
            proc.start()
            theirs.close()  # the child's end: EOF here once it exits
            self._procs.append(proc)
            self._pipes.append(ours)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def exit_codes(self) -> list[int | None]:
        return [p.exitcode for p in self._procs]

    def run(self, on_serving: Callable[[], None]) -> None:
        """Until a signal, a worker failing to start (``failure``) or a worker dying (``died_status``)."""
        ready: dict[int, bool] = {}
        while not self._stop.is_set():
            for i in range(len(self._procs)):
                report = None if i in ready else self._report(i)
                if report is None:
                    continue
                kind, detail = report
                if kind == "failed":
                    self.failure = detail
                    return
                ready[i] = bool(detail)
                if len(ready) == len(self._procs):
                    if all(ready.values()):
                        self._tell("serving")
                    on_serving()
            for i, proc in enumerate(self._procs):
                if proc.exitcode is None:
                    continue
                report = None if i in ready else self._report(i)  # it may have come after the look above
                if i not in ready and (report is None or report[0] == "failed"):
                    # Status 0: a signal stopped it while starting. Otherwise its reason, or its log says why.
                    reason = report[1] if report else f"worker {i} exited while starting, status {proc.exitcode}"
                    self.failure = "" if proc.exitcode == 0 else reason
                    return
                log.error(
                    "worker %d (pid %d) exited with status %s: stopping the others, then exiting with status %d",
                    i,
                    proc.pid,
                    proc.exitcode,
                    EXIT_WORKER_DIED,
                )
                self.died_status = EXIT_WORKER_DIED
                return
            self._stop.wait(0.05)

    def stop(self) -> None:
        """Health NOT_SERVING everywhere, SIGTERM to each worker (it drains), SIGKILL past the grace period."""
        self._tell("stopping")
        for proc in self._procs:
            if proc.exitcode is None:
                os.kill(proc.pid, signal.SIGTERM)
        give_up = time.monotonic() + self.config.drain_delay_s + self.config.grace_period_s + _EXIT_MARGIN_S
        for proc in self._procs:
            proc.join(timeout=max(0.0, give_up - time.monotonic()))
            if proc.exitcode is None:
                log.warning("worker pid %d did not exit after the grace period: killing it", proc.pid)
                proc.kill()
                proc.join(timeout=_EXIT_MARGIN_S)
        for conn in self._pipes:
            conn.close()

    def _report(self, i: int) -> tuple[str, Any] | None:
        """Worker ``i``'s start-up report, if one has come."""
        conn = self._pipes[i]
        try:
            return conn.recv() if conn.poll() else None
        except (EOFError, OSError):
            return None  # it exited without one

    def _tell(self, what: str) -> None:
        for conn in self._pipes:
            try:
                conn.send(what)
            except OSError:
                pass  # that worker has exited


@contextlib.contextmanager
def _reserved_port(host: str, port: int) -> Iterator[int]:
    """Bind ``host:port`` with SO_REUSEPORT (not listening) for as long as the workers run; yields the port.

    With port 0 this fixes the one port every worker binds. A port another server
    already listens on is refused, even if that server also allows SO_REUSEPORT.
    """
    if not sys.platform.startswith("linux"):  # elsewhere SO_REUSEPORT does not spread connections
        raise ValueError(f"--workers needs Linux (SO_REUSEPORT spreading connections over processes), not {sys.platform}")
    bare = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: cannot resolve: {exc}") from exc
    if port:
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(1.0)
            if probe.connect_ex(address) == 0:
                raise ValueError(f"--host {host} --port {port}: a server is already listening on this port")
        # Nobody listens yet, but another --workers parent may hold the port while its workers start: SO_REUSEPORT
        # would let us join it and the kernel would deal connections to both servers. An exclusive bind sees it.
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise ValueError(f"--host {host} --port {port}: cannot bind: {exc.strerror or exc}") from exc
                raise ValueError(
                    f"--host {host} --port {port}: another process holds this port (another server starting?)"
                ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ValueError(f"--host {host} --port {port}: cannot bind: {exc.strerror or exc}") from exc
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _worker_main(config: ServerConfig, index: int, parent_pid: int, pipe: Connection, shm_key: bytes) -> None:
    """A worker process: a server on the shared port, its health as the parent says on ``pipe``."""
    _die_with_parent(parent_pid)
    from ._logging import configure_logging
    from ._server import EXIT_CONFIG_ERROR, serve

    configure_logging(config.log_level, config.log_format)

    def started(running: Any) -> None:
        def follow() -> None:
            try:
                while pipe.recv() == "serving":
                    running.set_serving(True)
            except (EOFError, OSError):
                pass  # the parent is gone
            running.set_serving(False)  # "stopping"

        threading.Thread(target=follow, name="gradserve-worker-health", daemon=True).start()
        pipe.send(("ready", running.servable))
        log.info("worker %d (pid %d) ready on device %s", index, os.getpid(), running.runtime.device)

    try:
        status = serve(config, on_started=started, shared_memory_key=shm_key)
    except (ImportError, ValueError, OSError) as exc:  # as `gradserve serve` reports them: one line
        pipe.send(("failed", str(exc)))
        status = EXIT_CONFIG_ERROR
    except BaseException as exc:
        log.exception("worker %d failed to start", index)
        pipe.send(("failed", f"worker {index}: {type(exc).__name__}: {exc}"))
        status = EXIT_CONFIG_ERROR
    sys.exit(status)


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when the parent dies (even by SIGKILL): it drains and exits, never an orphan."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) == 0:
                if os.getppid() != parent_pid:  # died before prctl took effect
                    os.kill(os.getpid(), signal.SIGTERM)
                return
        except (OSError, AttributeError):
            pass
    parent = multiprocessing.parent_process()

    def watch() -> None:
        if parent is not None:
            parent.join()
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="gradserve-watch-parent", daemon=True).start()
