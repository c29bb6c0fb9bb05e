"""``GradientClient``: outputs and gradients of remote autograd Functions (the synchronous face of the client core)."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import torch
from grpc._cython import cygrpc

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.v1 import streaming
from gradserve.v1.connection import ChannelSettings

from . import _messages as m
from ._autograd import remote_call
from ._core import REPLY_ERRORS, WAIT_FOR_SERVER_S, ClientCore, Plan, StartupWait, malformed_reply, release
from ._errors import CancelledError, GradServeError, HandleNotFoundError, UnavailableError
from ._messages import ForwardBackwardResult, FunctionInfo, Outputs
from ._shm import DEFAULT_THRESHOLD_BYTES, SharedMemory

__all__ = ["GradientClient"]

log = logging.getLogger(__name__)


class GradientClient:
    """Client of a gradserve server. A context manager; one instance is safe to share between threads.

    Parameters
    ----------
    target
        ``host:port`` of the server, or any gRPC target (``dns:///svc:50051``,
        ``ipv4:10.0.0.1:50051,10.0.0.2:50051``, ``unix:/run/gradserve.sock``).
    timeout
        Default deadline of every call, in seconds; None waits as long as it takes.
        Each method also takes its own ``timeout``.
    tls
        Use TLS with the system's trusted CAs (implied by ``root_certificates``).
    root_certificates, private_key, certificate_chain
        PEM bytes: the CA that signed the server's certificate, and the client's key
        and certificate for mutual TLS.
    token
        Bearer token sent on every call (servers started with ``--auth-tokens``).
    options
        gRPC channel options, overriding the defaults (see :class:`ChannelSettings`).
    channel
        Use this channel instead of opening one; the client does not close it.
    stream_threshold_bytes
        Calls whose tensors total more than this many bytes go through the chunked
        ``StreamCall`` RPC (no size ceiling, about one copy of memory per side);
        smaller ones are single messages. Default 1 MiB.
    wait_for_server_s
        A call without a deadline waits this many seconds at most for a server that
        is not reachable yet or still loading its Functions (``make serve`` and a
        script started together just work). With a deadline, the deadline bounds it.
        Default 60.
    shared_memory
        When the server runs on this host, as this user, and allows it (it does by
        default): tensors of at least ``shared_memory_threshold_bytes`` travel both ways
        through POSIX shared memory (``/dev/shm``), and only references cross gRPC.
        The first call proves it with the SharedMemoryProbe RPC; when that fails
        (another host or container, ``--no-shared-memory``, an older server) every
        call uses the network, as without this flag. :attr:`transport` says which.
        Linux only. Default off.
    shared_memory_threshold_bytes
        Smallest tensor, in bytes, sent through shared memory. Default 256 KiB (below
        about that, the fixed cost of a segment outweighs the copy it saves).
    connections
        Connections (channels) to open to ``target``, each its own TCP connection; calls
        take them in turn, and a backward by handle goes on the connection of its
        forward. A server started with ``--workers N`` gives each connection to one
        worker process, so ``connections=N`` or more lets one client use them all.
        Default 1. Not with ``channel``.

    Tensors may come on any device and in any supported dtype; outputs come back on
    the device of the first tensor argument (CPU when there is none) and gradients on
    their argument's device and dtype.

    Errors: every method raises :class:`gradserve.client.GradServeError` subclasses
    (``.code`` is a ``grpc.StatusCode``), :class:`gradserve.client.ArgumentError` (also a
    ValueError) for arguments that cannot be encoded, before anything is sent.

    At most once: a call is sent again only when the server answered that it never
    started it (UNAVAILABLE, reason LOADING); gRPC's retry policy is off. Keepalive
    pings every 30 s keep idle connections through NAT and load balancers (servers
    accept one every 10 s or more).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        channel: grpc.Channel | None = None,
        stream_threshold_bytes: int = streaming.CHUNK_BYTES,
        wait_for_server_s: float = WAIT_FOR_SERVER_S,
        shared_memory: bool = False,
        shared_memory_threshold_bytes: int = DEFAULT_THRESHOLD_BYTES,
        connections: int = 1,
    ) -> None:
        if channel is not None and connections != 1:
            raise ValueError(f"connections={connections} opens channels of its own: not with channel=")
        settings = ChannelSettings(tls, root_certificates, private_key, certificate_chain, token, options)
        shm = SharedMemory(shared_memory_threshold_bytes) if shared_memory else None
        self._core = ClientCore(
            target, timeout, settings, stream_threshold_bytes, wait_for_server_s,
            shared_memory=shm, connections=connections,
        )
        self._owns_channel = channel is None
        self._channels = [channel] if channel is not None else self._core.open_channels(grpc)
        self._stubs = [pb_grpc.GradientServiceStub(c) for c in self._channels]
        # data chunks framed without protobuf copies
        self._stream_calls = [streaming.open_stream_call(c) for c in self._channels]
        self._releasing: set[grpc.Future] = set()
        self._closed = False

    @property
    def target(self) -> str:
        """The gRPC target this client calls."""
        return self._core.target

    @property
    def transport(self) -> str:
        """How tensors travel: ``"shared_memory"`` (large ones through /dev/shm), ``"network"``, or
        ``"pending"`` until the first call has probed the server (with ``shared_memory=True``)."""
        return self._core.transport

    @property
    def timeout(self) -> float | None:
        """Default deadline of every call, in seconds (None: none)."""
        return self._core.timeout

    def close(self) -> None:
        """Close the channel (if this client opened it). Calls in flight are cancelled, and later
        calls raise CancelledError."""
        self._closed = True
        if self._owns_channel:
            for channel in self._channels:
                channel.close()

    def __enter__(self) -> GradientClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ------------------------------------------------------------------

    def list_functions(self, *, timeout: float | None = None) -> list[FunctionInfo]:
        """The Functions the server serves, sorted by name."""
        return self._run(self._core.list_functions(), timeout)

    def forward(self, name: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Outputs:
        """Run the Function's forward on the server; no graph is kept.

        Parameters
        ----------
        name
            Registered name.
        *args, **kwargs
            Arguments, as the Function's forward takes them (defaults fill what is
            left out): tensors (any device, dtype, strides; sparse COO), numpy arrays
            and scalars, bool, int, float, str or None. ``timeout`` is this method's
            own keyword. The forward runs in the caller's grad mode (off under
            ``torch.no_grad()``).

        Returns
        -------
        Tensor or tuple of Tensor
            Shaped like the Function's return; on the first tensor argument's device;
            detached (use :meth:`function` to join your autograd graph).
        """
        return self._run(self._core.forward(name, args, kwargs), timeout)

    def forward_backward(
        self,
        name: str,
        *args: Any,
        grad_outputs: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> ForwardBackwardResult:
        """Forward and backward in one round trip; the server keeps nothing.

        Parameters
        ----------
        name, *args, **kwargs
            As :meth:`forward`. Gradients are computed for the tensor arguments with
            ``requires_grad=True``, as torch would.
        grad_outputs
            The vector of the vector-Jacobian product: one tensor (or None) per
            output, each with its output's shape and dtype; a bare tensor for a
            Function returning one tensor. None means ones for every differentiable
            output (the gradient of ``outputs.sum()``).

        Returns
        -------
        ForwardBackwardResult
            ``.outputs`` as :meth:`forward`; ``.grads`` aligned with ``args``.
        """
        return self._run(self._core.forward_backward(name, args, kwargs, grad_outputs), timeout)

    def function(self, name: str, *, timeout: float | None = None) -> Callable[..., Outputs]:
        """A callable running the remote Function as one differentiable step of your graph.

        ``y = client.function("square")(x, k=2.0)`` runs the forward on the server
        (which keeps the graph); ``y.sum().backward()`` later sends the upstream
        gradients and fills ``x.grad``. Integer outputs and outputs the server marks
        non-differentiable do not require grad. If the server no longer has the graph
        (restart, eviction, another replica), backward sends the inputs again and the
        server recomputes, replaying the forward's random numbers: same gradients, no
        error. When the outputs are dropped without a backward, the client tells the
        server to free the graph.

        Higher-order gradients work as locally: with ``create_graph=True`` the
        backward is itself a remote differentiable step (its own backward runs on the
        server), to any order: gradient penalties, ``torch.autograd.functional.hvp``,
        MAML. A Function class not registered with ``double_backward=True`` refuses
        it with :class:`FunctionFailedError` (reason DOUBLE_BACKWARD_UNSUPPORTED).
        """

        def call(*args: Any, **kwargs: Any) -> Outputs:
            return remote_call(self, name, timeout, args, kwargs)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = f"Remote gradserve Function {name!r} at {self.target}."
        return call

    # -- used by the autograd step ---------------------------------------------------

    def _forward_keep(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        requires_grad: Sequence[bool],
        grad_enabled: bool,
        timeout: float | None,
    ) -> m.Forwarded:
        connection = self._core.connections.next()
        result = self._run(self._core.forward_keep(name, args, kwargs, requires_grad, grad_enabled), timeout, connection)
        self._core.connections.remember(result.handle, connection)
        return result

    def _backward(self, step: m.BackwardStep, timeout: float | None) -> m.BackwardReply:
        """One remote backward of the autograd bridge: by handle (on the connection of its forward), else (or
        when it is gone) by recompute."""
        connections = self._core.connections
        if step.handle:
            connection = connections.home(step.handle)
            try:
                reply = self._run(self._core.backward(step, by_handle=True), timeout, connection)
            except HandleNotFoundError:
                connections.forget(step.handle)  # the graph is gone: recompute below, the caller sees no error
            else:
                connections.forget(step.handle)
                connections.remember(reply.handle, connection)
                return reply
        connection = connections.next()
        reply = self._run(self._core.backward(step, by_handle=False), timeout, connection)
        connections.remember(reply.handle, connection)
        return reply

    def _release(self, handle: str) -> None:
        """Free a kept graph without waiting; safe from a finalizer and if the client is closed."""
        try:
            stub = self._stubs[self._core.connections.home(handle)]
            self._core.connections.forget(handle)
            future = stub.ReleaseHandles.future(
                pb.ReleaseHandlesRequest(handles=[handle]), timeout=5, metadata=self._core.settings.metadata()
            )
            # gRPC cancels a call whose future is garbage-collected: hold it until done.
            self._releasing.add(future)
            future.add_done_callback(self._releasing.discard)
        except Exception as exc:  # noqa: BLE001 - best effort: the server's TTL frees it anyway
            log.debug("could not release graph handle: %s", exc)

    # -- I/O -----------------------------------------------------------------------------

    def _run(self, plan: Plan, timeout: float | None, connection: int | None = None) -> Any:
        """Make the call on ``connection`` (None: the next in turn); again only while the server says it has
        not started (see ClientCore)."""
        wait = self._core.startup_wait(timeout)
        index = self._core.connections.next() if connection is None else connection
        self._probe(wait, index)
        plan = self._core.prepare(plan)
        try:
            while True:
                try:
                    return self._attempt(plan, wait, index)
                except UnavailableError as error:
                    time.sleep(wait.retry_after(error))
                except GradServeError as error:
                    plan = self._core.fall_back(plan, error)  # a refused segment: the same call over the network
        finally:
            release(plan)

    def _probe(self, wait: StartupWait, index: int) -> None:
        """Same-host shared memory: prove it before the first call that could use it (see ``client/_shm.py``)."""
        due = self._core.probe_plan()
        if due is None:
            return
        plan, nonce = due
        try:
            self._core.shared_memory.probe_reply(self._attempt(plan, wait, index), nonce)
        except GradServeError as error:
            self._core.shared_memory.probe_failed(error)
        finally:
            release(plan)

    def _attempt(self, plan: Plan, wait: StartupWait, index: int) -> Any:
        if self._closed:
            raise CancelledError(grpc.StatusCode.CANCELLED, "the client is closed")
        channel, stub, stream_call = self._channels[index], self._stubs[index], self._stream_calls[index]
        if not self._connected(channel):  # a server that is starting: wait for it, within the deadline or wait_for_server_s
            self._wait_connected(channel, wait.until_give_up())  # then call anyway: it fails fast, with its own error
        self._core.connected_once |= self._connected(channel)  # TLS and all: a later UNAVAILABLE is no TLS mismatch
        options = self._core.call_options(wait)
        try:
            if plan.payloads is None:
                return plan.read(getattr(stub, plan.method)(plan.request, **options), None)
            verdict: queue.SimpleQueue[bool] = queue.SimpleQueue()
            responses = stream_call(_after_acceptance(plan.stream_requests(), verdict), **options)
            accepted = False
            try:
                accepted = streaming.accepted(responses.initial_metadata())  # blocks until accepted or refused
            finally:
                verdict.put(accepted)
            header, assembler = plan.read_stream(next(responses, None))
            for message in responses:
                plan.feed(assembler, message)
            return plan.read(header, assembler.payloads())
        except grpc.RpcError as error:
            raise self._core.error(error) from None
        except GradServeError:
            raise
        except REPLY_ERRORS as exc:  # a reply breaking the contract
            raise malformed_reply(exc) from None

    @staticmethod
    def _connected(channel: grpc.Channel) -> bool:
        """Whether ``channel`` is READY."""
        check = _connectivity_check(channel)
        return check is not None and check(False) == cygrpc.ConnectivityState.ready

    def _wait_connected(self, channel: grpc.Channel, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` seconds for ``channel`` to connect, by polling its state: no
        subscription, whose polling thread errors when the channel closes while it waits."""
        check = _connectivity_check(channel)
        if check is None:  # a channel object we cannot see into
            ready = grpc.channel_ready_future(channel)
            try:
                ready.result(timeout=timeout_s)
            except grpc.FutureTimeoutError:
                ready.cancel()
            return
        give_up = time.monotonic() + timeout_s
        while check(True) != cygrpc.ConnectivityState.ready and time.monotonic() < give_up and not self._closed:
            time.sleep(min(0.02, max(0.0, give_up - time.monotonic())))


def _after_acceptance(messages: Iterator[pb.StreamRequest], verdict: queue.SimpleQueue[bool]) -> Iterator[pb.StreamRequest]:
    """The header, then the data chunks only if the server accepted the header (streaming.ACCEPTED_KEY)."""
    yield next(messages)
    if verdict.get():
        yield from messages


def _connectivity_check(channel: Any) -> Callable[[bool], Any] | None:
    """``check_connectivity_state`` of the core channel under ``channel`` (through interceptors), or None.

    grpc.Channel has no public state getter; ``subscribe`` starts a polling thread instead.
    """
    for _ in range(4):
        inner = getattr(channel, "_channel", None)
        check = getattr(inner, "check_connectivity_state", None)
        if check is not None:
            return check
        channel = inner
    return None
