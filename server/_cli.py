"""The ``gradserve`` command: ``serve``, ``list`` and ``call``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from ._config import add_serve_arguments, config_from_args

__all__ = ["main"]

_CALL_EPILOG = """\
Arguments are JSON. A number or a nested list becomes a tensor of --dtype that requires
grad (so its gradient is printed); prefix with s: for a plain scalar argument (s:3,
s:0.5, s:true, s:"text") and use null for None. Examples:
  gradserve call square 1.0
  gradserve call cube_plus_square 2 3
  gradserve call scale "[1, 2, 3]" s:0.5
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradserve`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="gradserve", description="Gradients as a service over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_p = commands.add_parser("serve", help="run a server", description="Run a gradserve server until SIGTERM.")
    add_serve_arguments(serve_p)

    check_p = commands.add_parser(
        "check",
        help="gradcheck registered functions in float64",
        description="Run torch.autograd.gradcheck (and gradgradcheck where a Function declares double "
        "backward) in float64 on each Function's sample inputs. Exits 1 if any fails.",
    )
    check_p.add_argument(
        "--functions",
        action="append",
        default=[],
        metavar="MODULE",
        help="module (dotted name, e.g. my_functions) or path of a .py file that registers Functions; "
        "repeatable (default: gradserve.server.examples)",
    )

    health_p = commands.add_parser(
        "health",
        help="exit 0 if a server reports SERVING, else 1 (for container healthchecks)",
        description="Ask a server's grpc.health.v1 service. Exit 0 when SERVING, 1 otherwise.",
    )
    health_p.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    _add_target(health_p)

    list_p = commands.add_parser(
        "list",
        help="list a server's functions",
        description="List the Functions a server serves (ListFunctions): name and signature, kind "
        "(autograd.Function or callable), highest gradient order, the docstring's first paragraph, "
        "and why a Function is unavailable when it failed the server's start-up check.",
    )
    _add_target(list_p)

    call_p = commands.add_parser(
        "call",
        help="call a function; print outputs and gradients",
        epilog=_CALL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    call_p.add_argument("name", help="registered function name")
    call_p.add_argument("args", nargs="*", help="arguments, JSON (see below)")
    call_p.add_argument("--dtype", default="float32", help="dtype of tensor arguments (default: %(default)s)")
    _add_target(call_p)

    args = parser.parse_args(argv)
    if args.command in ("serve", "check") and os.getcwd() not in sys.path:
        # As `python -m` does: --functions my_functions finds ./my_functions.py.
        sys.path.insert(0, os.getcwd())
    if args.command == "serve":
        return _serve(args)
    if args.command == "check":
        return _check(args.functions)
    if args.command == "health":
        return _health(args)
    from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

    try:
        with _channel(args) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            if args.command == "list":
                return _list(stub, args)
            return _call(stub, args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get("GRADSERVE_TARGET", "127.0.0.1:50051"),
        help="server address HOST:PORT (default: %(default)s) [env GRADSERVE_TARGET]",
    )
    parser.add_argument("--timeout-s", type=float, default=30.0, help="deadline in seconds (default: %(default)s)")
    parser.add_argument(
        "--tls-ca-file",
        default=os.environ.get("GRADSERVE_TLS_CA_FILE", ""),
        help="PEM CA that signed the server's certificate; turns TLS on [env GRADSERVE_TLS_CA_FILE]",
    )
    parser.add_argument("--tls", action="store_true", help="TLS with the system's trusted CAs")
    parser.add_argument("--tls-cert-file", default="", help="PEM client certificate, for mutual TLS")
    parser.add_argument("--tls-key-file", default="", help="PEM client key, for mutual TLS")
    parser.add_argument(
        "--token",
        default=os.environ.get("GRADSERVE_TOKEN", ""),
        help="bearer token (prefer the env variable) [env GRADSERVE_TOKEN]",
    )


def _channel(args: argparse.Namespace) -> Any:
    """A gRPC channel from the --target / TLS / token flags; the token goes on every call.

    Raw stubs over ``gradserve.v1``, not the client SDK: the server package does not import
    the client's, and ``gradserve health`` should not pay torch's import.
    """
    from gradserve.v1.connection import ChannelSettings

    settings = ChannelSettings(
        args.tls, _read(args.tls_ca_file), _read(args.tls_key_file), _read(args.tls_cert_file), args.token or None
    )
    channel = settings.open_channel(args.target, grpc)
    metadata = settings.metadata()
    return grpc.intercept_channel(channel, _Metadata(metadata)) if metadata else channel


class _Metadata(grpc.UnaryUnaryClientInterceptor):
    """Adds fixed metadata (the bearer token) to every unary call."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = tuple(metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details._replace(metadata=tuple(details.metadata or ()) + self.metadata), request)


def _read(path: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SystemExit(f"gradserve: cannot read {path}: {exc.strerror or exc}") from None


def _serve(args: argparse.Namespace) -> int:
    from ._logging import configure_logging
    from ._server import serve

    try:
        config = config_from_args(args)
        configure_logging(config.log_level, config.log_format)
        return serve(config)
    except (ImportError, ValueError, OSError) as exc:  # bad module, device, address, TLS file: one clear line
        print(f"gradserve serve: error: {exc}", file=sys.stderr)
        return 2


def _check(modules: Sequence[str]) -> int:
    from ._checks import check_function, format_table
    from ._registry import load_modules

    try:
        registry = load_modules(modules)
    except ImportError as exc:
        print(f"gradserve check: error: {exc}", file=sys.stderr)
        return 2
    results = [check_function(f) for f in registry]
    print(format_table(results))
    failed = [r.name for r in results if not r.ok]
    skipped = [r.name for r in results if r.first_order == "skip"]
    passed = len(results) - len(failed) - len(skipped)
    print(f"\n{passed} passed, {len(skipped)} skipped, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _health(args: argparse.Namespace) -> int:
    # Raw grpc, not GradientClient: a container healthcheck should not pay torch's import.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(args) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service=args.service)
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout_s)
        except grpc.RpcError as exc:
            print(f"{args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _list(stub: Any, args: argparse.Namespace) -> int:
    from gradserve.v1 import gradserve_pb2 as pb

    for f in stub.ListFunctions(pb.ListFunctionsRequest(), timeout=args.timeout_s).functions:
        status = f"  [unavailable: {f.unavailable_reason}]" if f.unavailable_reason else ""
        order = "any order" if f.double_backward else "1st order"
        print(f"{f.name + f.signature:<40} {f.kind:<18} {order:<9}  {f.doc}{status}")
    return 0


def _parse_arg(text: str, dtype: Any) -> Any:
    import torch

    scalar = text.startswith("s:")
    try:
        value = json.loads(text[2:] if scalar else text)
    except json.JSONDecodeError:
        if scalar:
            return text[2:]
        raise SystemExit(f"gradserve call: argument {text!r} is not JSON (prefix s: for a plain string)") from None
    if scalar or value is None or isinstance(value, (bool, str)):
        return value
    try:
        return torch.tensor(value, dtype=dtype, requires_grad=dtype.is_floating_point or dtype.is_complex)
    except (TypeError, ValueError, RuntimeError) as exc:  # ragged lists, objects
        raise SystemExit(f"gradserve call: argument {text!r} is not a {dtype} tensor: {exc}") from None


def _call(stub: Any, args: argparse.Namespace) -> int:
    import torch

    from gradserve.v1 import codec
    from gradserve.v1 import gradserve_pb2 as pb

    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise SystemExit(f"gradserve call: --dtype {args.dtype!r} is not a torch dtype")
    values = [_parse_arg(a, dtype) for a in args.args]
    try:
        request = pb.ForwardBackwardRequest(function=args.name, args=[codec.encode_value(v) for v in values])
    except codec.CodecError as exc:
        raise SystemExit(f"gradserve call: {exc}") from None
    reply = stub.ForwardBackward(request, timeout=args.timeout_s)
    for i, out in enumerate(reply.outputs):
        print(f"output {i}: {_show(codec.decode_tensor(out))}")
    for i, grad in enumerate(reply.grads):
        decoded = codec.decode_maybe_tensor(grad)
        print(f"grad {i}:   {'none' if decoded is None else _show(decoded.to_dense())}")
    return 0


def _show(t: Any) -> str:
    values = t.tolist()
    return f"{values}  ({str(t.dtype).removeprefix('torch.')}, shape {list(t.shape)})"


if __name__ == "__main__":
    sys.exit(main())
