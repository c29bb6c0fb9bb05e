"""Server configuration: one frozen dataclass, filled from flags and GRADSERVE_* variables here only."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["ServerConfig", "add_serve_arguments", "config_from_args"]

MiB = 1024 * 1024


_UNIX_PATH_MAX = 107
"""Longest unix socket path in bytes: Linux's ``sun_path`` is 108 bytes with its terminating NUL."""


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one gradserve server. Units are in the names.

    Every field is a ``gradserve serve`` flag (``max_request_bytes`` ->
    ``--max-request-bytes``) and an environment variable (``GRADSERVE_MAX_REQUEST_BYTES``);
    a flag given on the command line wins over the variable.

    ``workers`` counts server *processes* sharing the port; ``max_workers`` counts the
    compute *threads* of each one (the name grpc's ``ThreadPoolExecutor`` gave it).
    ``device`` may list one device per worker (``cuda:0,cuda:1``, round robin).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    functions: tuple[str, ...] = field(default=())
    device: str = "auto"
    workers: int = 1
    max_workers: int = 16
    max_concurrent_rpcs: int = 0
    idle_stream_timeout_s: float = 30.0
    max_inflight_bytes: int = 1024 * MiB
    intra_op_threads: int = 0
    max_request_bytes: int = 256 * MiB
    max_tensor_bytes: int = 256 * MiB
    max_handles: int = 1024
    max_handle_bytes: int = 2048 * MiB
    handle_ttl_s: float = 300.0
    grace_period_s: float = 30.0
    drain_delay_s: float = 0.0
    check: bool = False
    check_finite: bool = False
    check_timeout_s: float = 60.0
    metrics_port: int = 0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    auth_tokens_file: str = ""
    auth_tokens: str = ""
    open_reflection: bool = False
    shared_memory: bool = True
    log_level: str = "INFO"
    log_format: str = "text"

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"--{_flag(name)} {value}: not a TCP port (0-65535; 0 picks a free one)")
        for name in ("workers", "max_workers", "max_request_bytes", "max_tensor_bytes", "max_handles"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)}: must be at least 1")
        for name in ("intra_op_threads", "max_concurrent_rpcs", "max_inflight_bytes", "max_handle_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)}: must be 0 or more")
        for name in ("idle_stream_timeout_s", "check_timeout_s", "handle_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)}: must be more than 0 seconds")
        for name in ("grace_period_s", "drain_delay_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)}: must be 0 or more seconds")
        if self.workers > max_worker_processes():
            raise ValueError(
                f"--workers {self.workers}: at most {max_worker_processes()} here (twice the {os.cpu_count() or 1} CPUs, "
                "at least 4); each worker is a Python process with torch loaded (about 300 MB)"
            )
        if self.max_concurrent_rpcs and self.max_concurrent_rpcs < self.max_workers:
            raise ValueError(
                f"--max-concurrent-rpcs {self.max_concurrent_rpcs} is below --max-workers {self.max_workers}: "
                "calls in progress include those computing"
            )
        devices = [d.strip() for d in self.device.split(",")]
        if not all(devices):
            raise ValueError(f"--device {self.device!r}: an empty entry; expected DEVICE or DEVICE,DEVICE,... (cuda:0,cuda:1)")
        if len(devices) > self.workers:
            raise ValueError(
                f"--device {self.device}: {len(devices)} devices for --workers {self.workers}; worker i gets device i, "
                f"so a device would be left unused: pass --workers {len(devices)} (or a multiple), or fewer devices"
            )
        if self.unix_socket and self.workers > 1:
            raise ValueError(
                f"--host {self.host} with --workers {self.workers}: worker processes share a TCP port "
                "(SO_REUSEPORT); a unix socket cannot be shared. Use one worker, or a TCP --host"
            )
        if self.host.startswith("unix:") and not self.unix_socket.strip():
            raise ValueError(f"--host {self.host}: expected unix:/path/to/socket")
        if len(os.fsencode(self.unix_socket)) > _UNIX_PATH_MAX:
            raise ValueError(
                f"--host {self.host}: the path is {len(os.fsencode(self.unix_socket))} bytes; unix socket paths hold "
                f"at most {_UNIX_PATH_MAX} bytes (sun_path): use a shorter path"
            )

    @property
    def unix_socket(self) -> str:
        """The socket path when ``host`` is ``unix:PATH`` (``port`` is then unused), else empty."""
        return self.host.removeprefix("unix:").removeprefix("//") if self.host.startswith("unix:") else ""

    def worker_device(self, index: int) -> str:
        """The device of worker ``index`` (0-based): ``device``, or entry ``index`` of a comma list, round robin."""
        devices = self.device.split(",")
        return devices[index % len(devices)].strip()

    @property
    def concurrent_rpcs(self) -> int:
        """Calls in progress at once: ``max_concurrent_rpcs``, or when 0, 4 per compute slot and at least 64."""
        return self.max_concurrent_rpcs or max(64, 4 * self.max_workers)


def max_worker_processes() -> int:
    """The most ``--workers`` a server starts: twice this machine's CPUs, at least 4.

    More processes than that only compete for the CPUs, and each costs about 300 MB
    (Python with torch loaded); without a bound a typo (``--workers 100000``) would spawn
    processes until memory runs out.
    """
    return max(4, 2 * (os.cpu_count() or 1))


def _flag(name: str) -> str:
    return name.replace("_", "-")


_HELP = {
    "host": "address to bind; 127.0.0.1 by default, 0.0.0.0 must be asked for; unix:/path/to.sock listens on a "
    "unix socket instead (mode 0600: the same user only; --port unused; removed at exit)",
    "port": "TCP port; 0 picks a free one (it is logged)",
    "functions": (
        "module that registers Functions: a dotted name (found on PYTHONPATH or in the current directory) "
        "or a .py file path; repeatable. Default: gradserve.server.examples"
    ),
    "device": "auto (CUDA when present, else CPU), cpu, cuda or cuda:N; with --workers, a comma list "
    "(cuda:0,cuda:1) gives worker i device i, round robin; one device is shared by all workers",
    "workers": "server processes sharing the port (SO_REUSEPORT), each with its own Functions, runtime, handle "
    "store and --max-workers compute threads; a connection stays on one process. TCP --host only",
    "max_workers": "forward/backward computations run at once in each worker process (threads); more calls wait, "
    "while health and ListFunctions still answer",
    "intra_op_threads": "torch intra-op threads of each worker process; 0 = the CPU quota of this container (cgroup), "
    "not the host's core count, divided by --workers",
    "max_concurrent_rpcs": "calls in progress at once (computing, queued for a compute slot, uploading or streaming); "
    "further calls get RESOURCE_EXHAUSTED at once. Health checks and ListFunctions have capacity of their own. "
    "0: 4 per --max-workers, at least 64",
    "idle_stream_timeout_s": "seconds a streaming call may wait for the caller's next message before it is cancelled",
    "max_inflight_bytes": "bytes of requests being received and replies being built, over all calls; a call that does "
    "not fit waits up to its deadline, then gets RESOURCE_EXHAUSTED. 0 turns the limit off",
    "check_timeout_s": "with --check: seconds each Function's start-up check may take; one over it is listed as "
    "unavailable (check timed out)",
    "shared_memory": "let clients on this host, of this user, send and receive large tensors through POSIX shared "
    "memory (/dev/shm) once they proved both with the SharedMemoryProbe RPC; others always use the network",
    "open_reflection": "serve reflection without a token even when tokens are required",
    "max_request_bytes": "largest request message, in bytes; larger ones get RESOURCE_EXHAUSTED",
    "max_tensor_bytes": "largest single tensor, in bytes; checked before allocation",
    "max_handles": "most forward graphs kept for a later backward (least recently used evicted)",
    "max_handle_bytes": "most bytes of tensors held by kept forward graphs (least recently used evicted)",
    "handle_ttl_s": "seconds a kept forward graph lives if no backward comes",
    "grace_period_s": "seconds in-flight calls may take to finish after SIGTERM",
    "drain_delay_s": "seconds after SIGTERM during which health says NOT_SERVING but calls are still taken, "
    "so load balancers stop sending before the server stops accepting",
    "check": "gradcheck every Function at start-up; failing ones are listed as unavailable, not served",
    "check_finite": "fail calls whose outputs or gradients hold NaN or Inf (FAILED_PRECONDITION)",
    "metrics_port": "port of the Prometheus /metrics endpoint on --host; 0 turns it off",
    "tls_cert_file": "PEM server certificate chain; with --tls-key-file, serve TLS",
    "tls_key_file": "PEM private key of --tls-cert-file",
    "tls_client_ca_file": "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)",
    "auth_tokens_file": "file of accepted bearer tokens, one per line; when set (or --auth-tokens), calls need one",
    "auth_tokens": "accepted bearer tokens, comma-separated; prefer the env variable or a file to keep them out of ps",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "text or json (one object per line)",
}


class _FromEnv(str):
    """An environment variable's raw text, parsed (and its errors reported) only when a server is configured.

    So ``GRADSERVE_PORT=abc`` fails ``gradserve serve`` with a line naming the variable,
    and does not crash ``gradserve health``, which never reads it.
    """

    env: str


def _from_env(env: str, text: str) -> _FromEnv:
    value = _FromEnv(text)
    value.env = env
    return value


def _parser_for(kind: type, flag: str) -> Any:
    def parse(text: str) -> Any:
        if isinstance(text, _FromEnv):  # argparse runs string defaults through here: leave them to config_from_args
            return text
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`ServerConfig` field, defaulting to its GRADSERVE_* variable.

    A bad flag value is an argparse error naming the flag; a bad variable value is
    reported by :func:`config_from_args`, naming the variable.
    """
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        env = "GRADSERVE_" + f.name.upper()
        default = os.environ.get(env)
        if f.name == "functions":
            env_default = tuple(m for m in (default or "").replace(",", " ").split() if m)
            parser.add_argument(
                flag, action="append", default=None, metavar="MODULE", help=f"{_HELP[f.name]} [env {env}, comma-separated]"
            )
            parser.set_defaults(_functions_env=env_default)
            continue
        kind = type(f.default)
        env_value = _from_env(env, default) if default is not None else f.default
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=env_value,
                help=f"{_HELP[f.name]} (default: %(default)s) [env {env}=1|0]",
            )
            continue
        parser.add_argument(
            flag,
            type=_parser_for(kind, flag) if kind in (int, float) else kind,
            default=env_value,
            help=f"{_HELP[f.name]} (default: %(default)s) [env {env}]",
        )


def _parse_bool(env: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{env}={text!r}: expected 1/0, true/false, yes/no or on/off")


def _env_value(kind: type, value: _FromEnv) -> Any:
    if kind is bool:
        return _parse_bool(value.env, value)
    if kind is str:
        return str(value)
    try:
        return kind(value.strip())
    except ValueError:
        raise ValueError(f"{value.env}={str(value)!r}: expected {'an integer' if kind is int else 'a number'}") from None


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build the config from parsed ``serve`` arguments.

    Raises
    ------
    ValueError
        A GRADSERVE_* variable does not parse (the message names it), or a value is out
        of range (the message names the flag).
    """
    values = {}
    for f in fields(ServerConfig):
        if f.name == "functions":
            continue
        value = getattr(args, f.name)
        values[f.name] = _env_value(type(f.default), value) if isinstance(value, _FromEnv) else value
    functions = tuple(args.functions) if args.functions else args._functions_env
    return ServerConfig(functions=functions, **values)
