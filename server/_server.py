"""Assembles a gRPC server: servicer, health, reflection, limits; and the blocking ``serve``."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

from ._checks import check_function, format_table
from ._config import ServerConfig
from ._registry import Registry, load_modules
from ._runtime import Runtime, resolve_device
from ._servicer import GradientServicer

__all__ = ["RunningServer", "create_server", "serve"]

log = logging.getLogger("gradserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientService"].full_name


@dataclass
class RunningServer:
    """A started server. ``port`` is the bound port (useful when the config asked for 0)."""

    grpc_server: grpc.Server
    port: int
    health: health.HealthServicer
    runtime: Runtime

    def stop(self, grace_period_s: float | None = None) -> None:
        """Report NOT_SERVING at once, then let in-flight calls finish for ``grace_period_s`` seconds."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace_period_s).wait()


def create_server(config: ServerConfig, registry: Registry | None = None) -> RunningServer:
    """Build and start a server for ``config``; it does not block.

    Parameters
    ----------
    config
        Settings; ``port=0`` binds a free port, returned in ``RunningServer.port``.
    registry
        Functions to serve. ``None`` imports ``config.functions`` (or the built-in
        examples) and the ``gradserve.functions`` entry points.

    Raises
    ------
    ImportError
        A functions module fails to import.
    ValueError
        Unknown device, CUDA asked for but absent, or the address cannot be bound.
    """
    device = resolve_device(config.device)
    if registry is None:
        registry = load_modules(config.functions)
    unavailable = _startup_checks(registry) if config.check else {}
    runtime = Runtime(
        registry,
        device,
        max_handles=config.max_handles,
        handle_ttl_s=config.handle_ttl_s,
        check_finite=config.check_finite,
        unavailable=unavailable,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="gradserve"),
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_GradientServiceServicer_to_server(
        GradientServicer(runtime, max_tensor_bytes=config.max_tensor_bytes), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ValueError(f"cannot bind {address}: {exc}") from exc
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %d function(s) on %s:%d, device %s: %s",
        len(registry), config.host, port, device, ", ".join(f.name for f in registry),
    )
    return RunningServer(server, port, health_servicer, runtime)


def _startup_checks(registry: Registry) -> dict[str, str]:
    """gradcheck every Function; returns {name: reason} for those that failed."""
    results = [check_function(f) for f in registry]
    log.info("start-up gradient checks:\n%s", format_table(results))
    unavailable = {r.name: f"failed gradcheck at start-up: {r.detail}" for r in results if not r.ok}
    for name, reason in unavailable.items():
        log.warning("not serving %s: %s", name, reason)
    return unavailable


def serve(config: ServerConfig) -> None:
    """Run a server until SIGTERM or SIGINT, then drain for ``config.grace_period_s`` seconds.

    On the signal, health turns NOT_SERVING at once; calls in flight finish (up to the
    grace period), new ones are refused, and the function returns.
    """
    running = create_server(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: draining for up to %.1f s", signal.Signals(signum).name, config.grace_period_s)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"gradserve listening on {config.host}:{running.port}", flush=True)
    stop.wait()
    running.stop(config.grace_period_s)
    log.info("stopped")
