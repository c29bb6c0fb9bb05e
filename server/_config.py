"""Server configuration: one frozen dataclass, filled from flags and GRADSERVE_* variables here only."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

__all__ = ["ServerConfig", "add_serve_arguments", "config_from_args"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one gradserve server. Units are in the names.

    Every field is a ``gradserve serve`` flag (``max_request_bytes`` ->
    ``--max-request-bytes``) and an environment variable (``GRADSERVE_MAX_REQUEST_BYTES``);
    a flag given on the command line wins over the variable.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    functions: tuple[str, ...] = field(default=())
    device: str = "auto"
    max_workers: int = 16
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
    metrics_port: int = 0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    auth_tokens_file: str = ""
    auth_tokens: str = ""
    log_level: str = "INFO"
    log_format: str = "text"


_HELP = {
    "host": "address to bind; 127.0.0.1 by default, 0.0.0.0 must be asked for",
    "port": "TCP port; 0 picks a free one (it is logged)",
    "functions": (
        "module that registers Functions: a dotted name (found on PYTHONPATH or in the current directory) "
        "or a .py file path; repeatable. Default: gradserve.server.examples"
    ),
    "device": "auto (CUDA when present, else CPU), cpu, cuda or cuda:N",
    "max_workers": "forward/backward computations run at once; more calls wait, while health and ListFunctions still answer",
    "intra_op_threads": "torch intra-op threads; 0 = the CPU quota of this container (cgroup), not the host's core count",
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


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`ServerConfig` field, defaulting to its GRADSERVE_* variable."""
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
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=_parse_bool(env, default) if default is not None else f.default,
                help=f"{_HELP[f.name]} (default: %(default)s) [env {env}=1|0]",
            )
            continue
        parser.add_argument(
            flag,
            type=kind,
            default=kind(default) if default is not None else f.default,
            help=f"{_HELP[f.name]} (default: %(default)s) [env {env}]",
        )


def _parse_bool(env: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SystemExit(f"{env}={text!r}: expected 1/0, true/false, yes/no or on/off")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build the config from parsed ``serve`` arguments."""
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig) if f.name != "functions"}
    functions = tuple(args.functions) if args.functions else args._functions_env
    return ServerConfig(functions=functions, **values)
