"""Where the integration suite sends its calls.

With ``GRADSERVE_TARGET`` set (docker compose's ``tests`` service sets
``dns:///server:50051``) every test talks to that server, balancing round-robin over
whatever addresses the target resolves to, with TLS and a token when configured:

- ``GRADSERVE_TLS_CA_FILE``: PEM roots to verify the server with; turns TLS on
  (``GRADSERVE_TLS=1`` turns it on with the system's roots);
- ``GRADSERVE_TLS_SERVER_NAME``: the name to check the server certificate against, when
  it is not the target's host;
- ``GRADSERVE_CLIENT_CERT_FILE`` and ``GRADSERVE_CLIENT_KEY_FILE``: a client certificate,
  for mutual TLS;
- ``GRADSERVE_TOKEN``: a bearer token, sent as ``authorization: Bearer <token>``;
- ``GRADSERVE_WAIT_S``: how long to wait for the server to be SERVING (default 180).

Without ``GRADSERVE_TARGET`` the suite starts ``gradserve serve`` itself, as a real
subprocess on a free 127.0.0.1 port, serving the built-in examples and
``functions/my_functions.py``, and runs every test twice: over plaintext, and over TLS
with a bearer token (certificates made by trustme for the run). Servers are stopped at
the end of the session.
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import ROOT, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import GradientClient
from gradserve.server import ServerConfig

FUNCTIONS_DIR = ROOT / "functions"
SERVICE = "gradserve.v1.GradientService"
ROUND_ROBIN = ("grpc.lb_policy_name", "round_robin")
_UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class _Details(
    collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (plaintext or TLS channels alike)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.ClientCallDetails) -> _Details:
        metadata = [*(d.metadata or ()), self._header]
        return _Details(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class Endpoint:
    """A gradserve server to test, and how to reach it."""

    target: str
    mode: str  # "plaintext", "tls+token" (local), or "configured" (GRADSERVE_TARGET)
    credentials: grpc.ChannelCredentials | None = None
    server_name: str = ""
    token: str = ""

    def channel(self, *, token: str | None = None, interceptors: tuple[Any, ...] = ()) -> grpc.Channel:
        """A new round-robin channel; ``token=""`` sends none (for the auth tests)."""
        options = [ROUND_ROBIN, *_UNLIMITED]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        if self.credentials is not None:
            channel = grpc.secure_channel(self.target, self.credentials, options=options)
        else:
            channel = grpc.insecure_channel(self.target, options=options)
        token = self.token if token is None else token
        chain = ((BearerToken(token),) if token else ()) + tuple(interceptors)
        return grpc.intercept_channel(channel, *chain) if chain else channel

    @contextlib.contextmanager
    def client(
        self, *, timeout: float = 30, token: str | None = None, interceptors: tuple[Any, ...] = ()
    ) -> Iterator[GradientClient]:
        """A GradientClient for this endpoint, closed (with its channel) on exit.

        Plaintext without a token: the client's own channel (``options`` only), as users
        make it. Otherwise it is given :meth:`channel`.
        """
        if self.credentials is None and not (self.token if token is None else token) and not interceptors:
            with GradientClient(self.target, timeout=timeout, options=[ROUND_ROBIN]) as client:
                yield client
            return
        channel = self.channel(token=token, interceptors=interceptors)
        try:
            with GradientClient(self.target, timeout=timeout, channel=channel) as client:
                yield client
        finally:
            channel.close()


def wait_serving(channel: grpc.Channel, timeout_s: float) -> None:
    """Poll grpc.health.v1 until the gradserve service is SERVING (functions loaded)."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5, wait_for_ready=True)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        time.sleep(0.1)
    raise RuntimeError(f"{SERVICE} not SERVING after {timeout_s:.0f} s (last: {last})")


class Server(ServerProcess):
    """``gradserve serve`` subprocess (see tests/conftest.py) that waits until it is SERVING.

    ``credentials`` make the readiness check use TLS, for a server started with TLS flags.
    """

    def __init__(
        self, *extra: str, port: int | None = None, credentials: grpc.ChannelCredentials | None = None, server_name: str = ""
    ) -> None:
        self._credentials, self._server_name = credentials, server_name
        pythonpath = os.pathsep.join(p for p in (str(FUNCTIONS_DIR), os.environ.get("PYTHONPATH", "")) if p)
        with pytest.MonkeyPatch.context() as mp:  # ServerProcess passes os.environ on
            mp.setenv("PYTHONPATH", pythonpath)
            super().__init__(*extra, port=port)

    def _wait_ready(self, timeout_s: float) -> None:
        options = [("grpc.ssl_target_name_override", self._server_name)] if self._server_name else []
        if self._credentials is None:
            channel = grpc.insecure_channel(self.target)
        else:
            channel = grpc.secure_channel(self.target, self._credentials, options=options)
        try:
            wait_serving(channel, timeout_s)
        except RuntimeError as exc:
            self.kill()
            raise RuntimeError(f"server did not become ready: {exc}\n{self.stderr_text()}") from None
        finally:
            channel.close()


LOCAL_FUNCTIONS = ("--functions", "gradserve.server.examples", "--functions", "my_functions")


def _configured() -> Endpoint:
    target = os.environ["GRADSERVE_TARGET"]
    ca_file = os.environ.get("GRADSERVE_TLS_CA_FILE", "")
    cert_file, key_file = os.environ.get("GRADSERVE_CLIENT_CERT_FILE", ""), os.environ.get("GRADSERVE_CLIENT_KEY_FILE", "")
    credentials = None
    if ca_file or os.environ.get("GRADSERVE_TLS", "") in ("1", "true", "yes") or cert_file:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(ca_file).read_bytes() if ca_file else None,
            private_key=Path(key_file).read_bytes() if key_file else None,
            certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
        )
    return Endpoint(
        target, "configured", credentials, os.environ.get("GRADSERVE_TLS_SERVER_NAME", ""), os.environ.get("GRADSERVE_TOKEN", "")
    )


def _server_supports_tls_and_tokens() -> bool:
    names = {f.name for f in fields(ServerConfig)}
    return {"tls_cert_file", "tls_key_file", "auth_tokens"} <= names


def _local_params() -> list[Any]:
    if os.environ.get("GRADSERVE_TARGET"):
        return ["configured"]
    return ["plaintext", "tls+token"]


@pytest.fixture(scope="session", params=_local_params())
def endpoint(request: pytest.FixtureRequest) -> Iterator[Endpoint]:
    """The server under test: GRADSERVE_TARGET, or a local subprocess (plaintext, then TLS + token)."""
    if request.param == "configured":
        ep = _configured()
        channel = ep.channel()
        try:
            wait_serving(channel, float(os.environ.get("GRADSERVE_WAIT_S", "180")))
        finally:
            channel.close()
        yield ep
        return
    if request.param == "plaintext":
        with Server(*LOCAL_FUNCTIONS) as server:
            yield Endpoint(server.target, "plaintext")
        return
    if not _server_supports_tls_and_tokens():
        pytest.skip("this gradserve server has no --tls-cert-file/--auth-tokens options")
    trustme = pytest.importorskip("trustme", reason="trustme (a dev dependency) makes the TLS certificates")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    token = "integration-" + os.urandom(8).hex()
    with tempfile.TemporaryDirectory(prefix="gradserve-tls-") as tmp:
        cert_file, key_file = Path(tmp, "server.pem"), Path(tmp, "server.key")
        cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        key_file.write_bytes(cert.private_key_pem.bytes())
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        with Server(
            *LOCAL_FUNCTIONS,
            "--tls-cert-file",
            str(cert_file),
            "--tls-key-file",
            str(key_file),
            "--auth-tokens",
            token,
            credentials=credentials,
        ) as server:
            yield Endpoint(server.target, "tls+token", credentials, token=token)


@pytest.fixture(scope="session")
def client(endpoint: Endpoint) -> Iterator[GradientClient]:
    """A round-robin GradientClient for ``endpoint``, with its TLS and token settings."""
    with endpoint.client() as c:
        yield c
