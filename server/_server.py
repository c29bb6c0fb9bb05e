"""Assembles a gRPC server: servicer, health, reflection, metrics, TLS, tokens; and the blocking ``serve``."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.v1.connection import SERVER_KEEPALIVE_POLICY

from ._auth import TokenAuthInterceptor, load_tokens
from ._checks import check_function, format_table
from ._config import ServerConfig
from ._metrics import Metrics
from ._registry import Registry, load_modules
from ._runtime import Runtime, resolve_device
from ._servicer import GradientServicer

__all__ = ["RunningServer", "create_server", "serve"]

log = logging.getLogger("gradserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientService"].full_name
# Threads beyond the compute slots: queued calls and slow uploads each hold one while they
# wait; health and ListFunctions need one free to answer. 256 idle threads cost little.
_SPARE_THREADS = 256


def cpu_quota() -> int:
    """CPUs this process may use: the cgroup CPU quota (v2 or v1) and the affinity mask, at least 1.

    A container limited to 2 CPUs on a 64-core host gets 2, so torch does not start 64
    intra-op threads that fight over 2 CPUs.
    """
    limits = [len(os.sched_getaffinity(0))] if hasattr(os, "sched_getaffinity") else [os.cpu_count() or 1]
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            limits.append(math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        try:
            quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
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
        The bound gRPC port (useful when the config asked for 0).
    metrics_port : int or None
        The bound Prometheus port, or None when metrics are off.
    """

    grpc_server: grpc.Server
    port: int
    health: health.HealthServicer
    runtime: Runtime
    metrics: Metrics
    metrics_port: int | None = None

    def stop(self, grace_period_s: float | None = None, drain_delay_s: float = 0.0) -> None:
        """Drain and stop.

        Health turns NOT_SERVING at once; calls are still taken for ``drain_delay_s``
        seconds (so load balancers notice), then new calls are refused and those in
        flight get ``grace_period_s`` seconds to finish.
        """
        self.health.enter_graceful_shutdown()
        if drain_delay_s > 0:
            time.sleep(drain_delay_s)
        self.grpc_server.stop(grace_period_s).wait()
        self.metrics.stop()


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
    key, cert = Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes()
    client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def create_server(config: ServerConfig, registry: Registry | None = None) -> RunningServer:
    """Build and start a server for ``config``; returns once it serves (it does not block).

    The port is bound first, with health NOT_SERVING and calls answered UNAVAILABLE
    while the Functions load (and, with ``config.check``, are gradchecked); then health
    turns SERVING.

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
        Unknown device, CUDA asked for but absent, incomplete TLS settings, or the
        address cannot be bound.
    OSError
        A TLS or token file cannot be read.
    """
    device = resolve_device(config.device)
    credentials = _credentials(config)
    tokens = load_tokens(config.auth_tokens, config.auth_tokens_file)
    servicer = GradientServicer(
        max_tensor_bytes=config.max_tensor_bytes, max_request_bytes=config.max_request_bytes, max_concurrent=config.max_workers
    )
    server = grpc.server(
        # Threads beyond the compute slots keep health, ListFunctions and queued calls moving.
        futures.ThreadPoolExecutor(max_workers=config.max_workers + _SPARE_THREADS, thread_name_prefix="gradserve"),
        interceptors=[TokenAuthInterceptor(tokens, servicer.record_refusal)] if tokens else [],
        options=[
            # A C int in gRPC; larger requests must stream anyway (protobuf's 2 GiB ceiling).
            ("grpc.max_receive_message_length", min(config.max_request_bytes, 2**31 - 1)),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
            *SERVER_KEEPALIVE_POLICY.items(),
        ],
    )
    pb_grpc.add_GradientServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ValueError(f"cannot bind {address}: {exc}") from exc
    server.start()
    try:
        if registry is None:
            registry = load_modules(config.functions)
        runtime = Runtime(
            registry,
            device,
            max_handles=config.max_handles,
            max_handle_bytes=config.max_handle_bytes,
            handle_ttl_s=config.handle_ttl_s,
            check_finite=config.check_finite,
            unavailable=_startup_checks(registry) if config.check else {},
        )
        metrics = Metrics(runtime)
        metrics_port = metrics.serve_http(config.host, config.metrics_port) if config.metrics_port else None
    except BaseException:
        server.stop(0)
        raise
    servicer.attach(runtime, metrics)
    _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %d function(s)%s on %s:%d (%s%s), device %s%s: %s",
        len(registry) - len(runtime.unavailable),
        f" ({len(runtime.unavailable)} more unavailable)" if runtime.unavailable else "",
        config.host,
        port,
        "TLS" if credentials else "plaintext",
        ", tokens required" if tokens else "",
        device,
        f", metrics on :{metrics_port}/metrics" if metrics_port else "",
        ", ".join(f.name for f in registry if f.name not in runtime.unavailable),
    )
    return RunningServer(server, port, health_servicer, runtime, metrics, metrics_port)


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
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: draining for up to %.1f s", signal.Signals(signum).name, config.grace_period_s)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    torch.set_num_threads(config.intra_op_threads or cpu_quota())
    log.info("torch intra-op threads: %d", torch.get_num_threads())
    running = create_server(config)
    print(f"gradserve listening on {config.host}:{running.port}", flush=True)
    stop.wait()
    running.stop(config.grace_period_s, config.drain_delay_s)
    log.info("stopped")
