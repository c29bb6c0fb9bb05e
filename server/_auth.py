"""Bearer-token authentication as a gRPC server interceptor."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable
from typing import Any

import grpc

__all__ = ["TokenAuthInterceptor", "load_tokens"]

log = logging.getLogger(__name__)

# Probes and tooling reach these without a token: orchestrators cannot send one.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def load_tokens(tokens: str = "", tokens_file: str = "") -> tuple[str, ...]:
    """Accepted tokens from a comma-separated string and/or a file (one per line, # comments).

    Raises
    ------
    OSError
        The file cannot be read.
    """
    found = [t.strip() for t in tokens.split(",")]
    if tokens_file:
        with open(tokens_file, encoding="utf-8") as f:
            found += [line.strip() for line in f if not line.lstrip().startswith("#")]
    return tuple(t for t in found if t)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` on every call but health and reflection.

    A missing or malformed header gets UNAUTHENTICATED; a token not in ``tokens`` gets
    PERMISSION_DENIED. Tokens are compared in constant time. Each refusal is logged
    (never the token) and reported to ``on_refused(method_path, code)``.
    """

    def __init__(self, tokens: Iterable[str], on_refused: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        self._on_refused = on_refused
        self._tokens = tuple(t.encode() for t in tokens)
        if not self._tokens:
            raise ValueError("token authentication needs at least one token")

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(_OPEN_PREFIXES):
            return continuation(details)
        denial = self._check(dict(details.invocation_metadata or ()).get("authorization", ""))
        handler = continuation(details)
        if denial is None or handler is None:
            return handler
        code, message = denial

        def deny(_request: Any, context: grpc.ServicerContext) -> Any:
            log.warning("refused %s from %s: %s: %s", details.method, context.peer(), code.name, message)
            if self._on_refused is not None:
                self._on_refused(details.method, code)
            context.abort(code, message)

        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        return handler._replace(**{k: deny for k in kinds if getattr(handler, k) is not None})

    def _check(self, header: str) -> tuple[grpc.StatusCode, str] | None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token: send metadata 'authorization: Bearer <token>'"
        presented = token.strip().encode()
        if not any(hmac.compare_digest(presented, t) for t in self._tokens):
            return grpc.StatusCode.PERMISSION_DENIED, "bearer token not accepted"
        return None
