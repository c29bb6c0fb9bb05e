"""How clients and servers connect: channel settings, credentials, and the keepalive policy both keep.

Part of the contract's Python encoding, like the codec: the client SDK and the server (its
``gradserve list/call`` commands and its keepalive options) both import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc

__all__ = ["CLIENT_OPTIONS", "SERVER_KEEPALIVE_POLICY", "ChannelSettings"]

SERVER_KEEPALIVE_POLICY: dict[str, Any] = {
    # Clients may ping every 10 s or more, also on idle connections and during a long call
    # (gradserve clients ping every 30 s). A client pinging faster gets GOAWAY after 2
    # strikes; its call fails UNAVAILABLE and is not run again.
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.min_recv_ping_interval_without_data_ms": 10_000,
    "grpc.http2.min_ping_interval_without_data_ms": 10_000,
    "grpc.http2.max_ping_strikes": 2,
    # The server's own pings find dead peers of idle connections.
    "grpc.keepalive_time_ms": 60_000,
    "grpc.keepalive_timeout_ms": 20_000,
}
"""gRPC server options of the keepalive policy that :data:`CLIENT_OPTIONS` keeps within."""


# No gRPC retry policy: it re-sent calls the server had already started once a connection
# dropped (a Function ran several times), and on streamed calls it aborts the process in
# gRPC core (shared/findings/grpc_retry_stream_abort.py). The client core retries only what
# the server says never started. Keepalive pings every 30 s keep idle connections alive
# through NAT and load balancers; gradserve servers accept one every 10 s or more. Limits
# on sizes are the server's to enforce, so the client sets none of its own.
CLIENT_OPTIONS: dict[str, Any] = {
    "grpc.max_receive_message_length": -1,
    "grpc.max_send_message_length": -1,
    "grpc.enable_retries": 0,
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2000,
}
"""Default options of a client channel (override any with ``ChannelSettings.options``)."""


@dataclass(frozen=True)
class ChannelSettings:
    """How to reach a server: TLS, mutual TLS, a bearer token, channel options.

    Attributes
    ----------
    tls : bool
        Use TLS. Implied by any certificate argument.
    root_certificates, private_key, certificate_chain : bytes or None
        PEM bytes: the CA to trust (None: the system's), and the client's key and
        certificate for mutual TLS.
    token : str or None
        Sent as ``authorization: Bearer <token>`` on every call.
    options : sequence of (str, Any)
        gRPC channel options, overriding the defaults (no client-side size limit; no
        gRPC retry policy; keepalive pings every 30 s, also on idle connections;
        reconnect backoff 0.1-2 s).
    """

    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    token: str | None = None
    options: Sequence[tuple[str, Any]] = ()

    @property
    def secure(self) -> bool:
        return self.tls or any(x is not None for x in (self.root_certificates, self.private_key, self.certificate_chain))

    def channel_options(self) -> list[tuple[str, Any]]:
        return list((CLIENT_OPTIONS | dict(self.options)).items())

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def open_channel(self, target: str, api: Any = grpc) -> Any:
        """A channel to ``target`` from ``api``: ``grpc`` (sync) or ``grpc.aio`` (asyncio).

        Over TLS, a ``unix:`` target's certificate is checked for the name ``localhost``
        (gRPC would check the socket's path), unless ``options`` name another
        (``grpc.default_authority`` or ``grpc.ssl_target_name_override``).
        """
        if self.secure:
            options = self.channel_options()
            named = any(k in ("grpc.default_authority", "grpc.ssl_target_name_override") for k, _ in options)
            if target.startswith("unix:") and not named:
                options.append(("grpc.default_authority", "localhost"))
            return api.secure_channel(target, self.credentials(), options=options)
        return api.insecure_channel(target, options=self.channel_options())

    def open_channels(self, target: str, api: Any, count: int) -> list[Any]:
        """``count`` channels to ``target``, each on a TCP connection (or unix socket connection) of its own.

        gRPC shares one connection among channels with equal settings; a subchannel pool of
        each channel's own keeps them apart, so a server's worker processes (which take
        whole connections) each get some.
        """
        if count == 1:
            return [self.open_channel(target, api)]
        own = replace(self, options=[*self.options, ("grpc.use_local_subchannel_pool", 1)])
        return [own.open_channel(target, api) for _ in range(count)]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()
