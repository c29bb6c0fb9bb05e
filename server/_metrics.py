"""Prometheus metrics of one server (prometheus-client), in a registry of its own.

With ``--workers N`` each worker process records into prometheus-client's multiprocess
files (``PROMETHEUS_MULTIPROC_DIR``, set by the parent before it starts them) and the
parent serves their sum (:func:`multiprocess_registry`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["MULTIPROC_DIR_ENV", "Metrics", "MetricsEndpoint", "mark_process_dead", "multiprocess_registry"]

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Multiprocess mode cannot call back at scrape time: values kept elsewhere are copied this often.
_REFRESH_S = 1.0

# Latency buckets in seconds: 0.5 ms (a small call on loopback) to 60 s (large tensors).
_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _CounterFromFunction(Collector):
    """A Prometheus counter (``NAME_total``) whose value another object keeps, read at scrape time."""

    def __init__(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        self._name, self._doc, self._value = name, documentation, value

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._doc, value=self._value())


class Metrics:
    """Request counts, latencies, bytes, calls in flight, handle store and device memory.

    Names follow Prometheus conventions (base units: seconds, bytes; ``_total`` counters).
    Each instance has its own ``CollectorRegistry``, so several servers can live in one
    process (tests). Under ``PROMETHEUS_MULTIPROC_DIR`` (a worker process) gauges are
    summed over the live workers, and the handle store's and device's figures are copied
    into them every second instead of read at scrape time.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry()
        self._stopped = threading.Event()
        r = self.registry
        live = "livesum"  # gauges: the sum over live worker processes (ignored by a lone server)
        self.requests = Counter(
            "gradserve_requests", "Calls by function, method and status code.", ["function", "method", "code"], registry=r
        )
        self.latency = Histogram(
            "gradserve_request_duration_seconds",
            "Call latency in seconds.",
            ["function", "method"],
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.bytes_in = Counter("gradserve_request_bytes", "Request message bytes received.", ["method"], registry=r)
        self.bytes_out = Counter("gradserve_response_bytes", "Response message bytes sent.", ["method"], registry=r)
        self.in_flight = Gauge("gradserve_calls_in_flight", "Calls being served now.", registry=r, multiprocess_mode=live)
        handles = runtime.handles
        device = runtime.device
        kept: dict[Gauge, Callable[[], float]] = {
            Gauge("gradserve_handles", "Forward graphs kept for a later backward.", registry=r, multiprocess_mode=live): (
                lambda: handles.stats()[0]
            ),
            Gauge(
                "gradserve_handle_bytes",
                "Bytes of tensors held by kept graphs (a lower bound).",
                registry=r,
                multiprocess_mode=live,
            ): lambda: handles.stats()[1],
            Gauge(
                "gradserve_device_memory_bytes",
                "Memory allocated by torch on the serving device (CUDA only; 0 on CPU).",
                registry=r,
                multiprocess_mode=live,
            ): lambda: torch.cuda.memory_allocated(device) if device.type == "cuda" else 0,
        }
        evictions_doc = "Kept graphs evicted (LRU or expired)."
        if MULTIPROC_DIR_ENV not in os.environ:
            for gauge, value in kept.items():
                gauge.set_function(value)
            r.register(_CounterFromFunction("gradserve_handle_evictions", evictions_doc, lambda: handles.evictions))
        else:
            evictions = Counter("gradserve_handle_evictions", evictions_doc, registry=r)
            threading.Thread(
                target=self._copy_every_second,
                args=(kept, evictions, lambda: handles.evictions),
                name="gradserve-metrics",
                daemon=True,
            ).start()
        self.auth_refusals = Counter(
            "gradserve_auth_refusals", "Calls refused for a missing or wrong bearer token.", ["code"], registry=r
        )
        self.busy_refusals = Counter(
            "gradserve_busy_refusals",
            "Calls refused with RESOURCE_EXHAUSTED by admission: too many calls, or no room in --max-inflight-bytes.",
            ["reason"],
            registry=r,
        )
        self.idle_stream_cancels = Counter(
            "gradserve_idle_stream_cancels", "Streams cancelled after --idle-stream-timeout-s without a message.", registry=r
        )
        self.inflight_bytes = Gauge(
            "gradserve_inflight_bytes",
            "Bytes of requests being received and replies being built (--max-inflight-bytes).",
            registry=r,
            multiprocess_mode=live,
        )

    def _copy_every_second(self, kept: dict[Gauge, Callable[[], float]], evictions: Counter, total: Callable[[], int]) -> None:
        counted = 0
        while True:
            for gauge, value in kept.items():
                gauge.set(value())
            now = total()
            evictions.inc(now - counted)
            counted = now
            if self._stopped.wait(_REFRESH_S):
                return

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a call in flight for the duration of the block."""
        self.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight.dec()

    def observe(self, function: str, method: str, code: str, duration_s: float, bytes_in: int, bytes_out: int) -> None:
        """Record one finished call."""
        self.requests.labels(function, method, code).inc()
        self.latency.labels(function, method).observe(duration_s)
        self.bytes_in.labels(method).inc(bytes_in)
        self.bytes_out.labels(method).inc(bytes_out)

    def serve_http(self, host: str, port: int) -> int:
        """Expose ``/metrics`` on ``host:port`` (0 picks a free port); returns the bound port.

        Raises
        ------
        OSError
            The address cannot be bound.
        """
        self._http = MetricsEndpoint(self.registry, host, port)
        return self._http.port

    def stop(self) -> None:
        """Stop the HTTP endpoint, if started, and the copying of figures (multiprocess mode)."""
        self._stopped.set()
        http = getattr(self, "_http", None)
        if http is not None:
            http.stop()


class MetricsEndpoint:
    """``/metrics`` of ``registry`` served on ``host:port`` (0 picks a free port, then in ``.port``).

    Raises
    ------
    OSError
        The address cannot be bound.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server, _thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_address[1]

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry holding the sum of what every worker process recorded under ``path``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


def mark_process_dead(pid: int, path: str) -> None:
    """Drop the live gauges of worker ``pid``, which exited (its counters keep counting in the sum)."""
    multiprocess.mark_process_dead(pid, path)
