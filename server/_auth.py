"""Bearer-token authentication as a gRPC server interceptor, and the caller identity that owns handles."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from ._logging import RateLimitedLog, escape

__all__ = ["ANONYMOUS", "TokenAuthInterceptor", "caller_identity", "deny_handler", "load_tokens"]

log = logging.getLogger(__name__)

# Probes reach health without a token: orchestrators cannot send one. Reflection is open
# only when asked for (``--open-reflection``): it is a stream that would otherwise let an
# unauthenticated caller hold a thread.
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_REFLECTION_PREFIX = "/grpc.reflection."

ANONYMOUS = "anonymous"
"""The identity of every caller that shows neither a token nor a client certificate."""


def load_tokens(tokens: str = "", tokens_file: str = "") -> tuple[str, ...]:
    """Accepted tokens from a comma-separated string and/or a file (one per line, # comments).

    Fails closed: a source that is set but holds no token is an error, never "no auth".

    Raises
    ------
    ValueError
        The file cannot be read (naming ``--auth-tokens-file``), or a token source is set
        but holds no token.
    """
    found = [t.strip() for t in tokens.split(",")]
    if tokens.strip() and not any(found):
        raise ValueError("--auth-tokens / GRADSERVE_AUTH_TOKENS is set but holds no token; refusing to start without auth")
    if tokens_file:
        try:
            with open(tokens_file, encoding="utf-8") as f:
                from_file = [line.strip() for line in f if not line.lstrip().startswith("#")]
        except OSError as exc:
            raise ValueError(f"--auth-tokens-file {tokens_file}: cannot read: {exc.strerror or exc}") from exc
        if not any(from_file):
            raise ValueError(
                f"--auth-tokens-file {tokens_file} holds no token (only blank or # comment lines); refusing to start without auth"
            )
        found += from_file
    return tuple(t for t in found if t)


def deny_handler(code: grpc.StatusCode, message: str, on_denied: Callable[[grpc.ServicerContext], None] | None = None) -> Any:
    """A handler that refuses a call at once.

    Request-streaming whatever the method: gRPC then runs it without first waiting for a
    unary request message, so a refused caller cannot hold a thread by sending slowly.
    """

    def deny(_requests: Any, context: grpc.ServicerContext) -> Any:
        if on_denied is not None:
            on_denied(context)
        context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(deny)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` on every call but health (and reflection if ``open_reflection``).

    A missing or malformed header gets UNAUTHENTICATED; a token not in ``tokens`` gets
    PERMISSION_DENIED, for any method path (known or not). Tokens are compared in
    constant time. Refusals are logged at a bounded rate (never the token) and each is
    reported to ``on_refused(method_path, code)``.
    """

    def __init__(
        self,
        tokens: Iterable[str],
        on_refused: Callable[[str, grpc.StatusCode], None] | None = None,
        *,
        open_reflection: bool = False,
    ) -> None:
        self._on_refused = on_refused
        self._tokens = tuple(t.encode() for t in tokens)
        if not self._tokens:
            raise ValueError("token authentication needs at least one token")
        self._open = (_HEALTH_PREFIX, _REFLECTION_PREFIX) if open_reflection else (_HEALTH_PREFIX,)
        self._refusal_log = RateLimitedLog(log, per_s=1.0, burst=10)

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(self._open):
            return continuation(details)
        denial = self._check(dict(details.invocation_metadata or ()).get("authorization", ""))
        if denial is None:
            return continuation(details)
        code, message = denial
        method = details.method

        def on_denied(context: grpc.ServicerContext) -> None:
            self._refusal_log.log(
                logging.WARNING, "refused %s from %s: %s: %s", escape(method), context.peer(), code.name, message
            )
            if self._on_refused is not None:
                self._on_refused(method, code)

        return deny_handler(code, message, on_denied)

    def _check(self, header: str) -> tuple[grpc.StatusCode, str] | None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token: send metadata 'authorization: Bearer <token>'"
        presented = token.strip().encode()
        # Every token compared, in constant time each: the time taken says nothing of which matched.
        if not sum(hmac.compare_digest(presented, t) for t in self._tokens):
            return grpc.StatusCode.PERMISSION_DENIED, "bearer token not accepted"
        return None


def caller_identity(context: grpc.ServicerContext, tokens_required: bool) -> str:
    """Who is calling, for handle ownership: a digest of the verified token, else the client certificate, else anonymous.

    Tokens count only when the server requires them (so they were verified); the
    certificate only when gRPC verified it (mutual TLS). Never the secret itself.
    """
    if tokens_required:
        header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")
        token = str(header).partition(" ")[2].strip()
        if token:
            return "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    if context.peer_identities():
        auth = context.auth_context()
        subject = (auth.get("x509_subject") or auth.get("x509_pem_cert") or context.peer_identities() or [b""])[0]
        return "cert:" + hashlib.sha256(subject).hexdigest()[:32]
    return ANONYMOUS
