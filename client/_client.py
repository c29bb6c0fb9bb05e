"""``GradientClient``: outputs and gradients of remote autograd Functions."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import torch

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

from . import _messages as m
from . import streaming
from ._errors import HandleNotFoundError, ResourceExhaustedError, from_rpc_error
from ._messages import ChannelSettings, ForwardBackwardResult, Forwarded, FunctionInfo, Outputs

__all__ = ["GradientClient"]

log = logging.getLogger(__name__)

_UNARY = {"forward": "Forward", "backward": "Backward", "forward_backward": "ForwardBackward"}


class GradientClient:
    """Client of a gradserve server. A context manager; one instance is safe to share between threads.

    Parameters
    ----------
    target
        ``host:port`` of the server, or any gRPC target (``dns:///svc:50051``,
        ``ipv4:10.0.0.1:50051,10.0.0.2:50051``).
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

    Tensors may come on any device and in any supported dtype; outputs come back on
    the device of the first tensor argument (CPU when there is none) and gradients on
    their argument's device and dtype.

    Errors: every method raises :class:`gradserve.client.GradServeError` subclasses
    for failed calls (``.code`` is a ``grpc.StatusCode``) and
    :class:`gradserve.client.codec.CodecError` (a ValueError) for arguments that
    cannot be encoded, before anything is sent.
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
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.stream_threshold_bytes = stream_threshold_bytes
        self._settings = ChannelSettings(tls, root_certificates, private_key, certificate_chain, token, options)
        self._owns_channel = channel is None
        self._channel = channel or self._settings.open_channel(target, grpc)
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        self._releasing: set[grpc.Future] = set()

    def close(self) -> None:
        """Close the channel (if this client opened it). Calls in flight are cancelled."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> GradientClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ------------------------------------------------------------------

    def list_functions(self, *, timeout: float | None = None) -> list[FunctionInfo]:
        """The Functions the server serves, sorted by name."""
        return m.function_infos(self._call(self._stub.ListFunctions, pb.ListFunctionsRequest(), timeout))

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
        payloads = self._payloads(args, kwargs.values())
        response, incoming = self._invoke("forward", m.forward_request(name, args, kwargs, payloads), payloads, timeout)
        return m.decode_outputs(response.outputs, response.returns_tuple, args, incoming)

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
        grad_outputs = m.as_grad_outputs(grad_outputs)
        payloads = self._payloads(args, grad_outputs, kwargs.values())
        request = m.forward_backward_request(name, args, kwargs, grad_outputs, payloads)
        response, incoming = self._invoke("forward_backward", request, payloads, timeout)
        return m.forward_backward_result(response, [*args, *kwargs.values()], incoming)

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
        from ._autograd import remote_call

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
    ) -> Forwarded:
        payloads = self._payloads(args, kwargs.values())
        request = m.forward_request(name, args, kwargs, payloads, requires_grad, grad_enabled)
        response, incoming = self._invoke("forward", request, payloads, timeout)
        return m.forwarded(response, args, incoming)

    def _backward(self, step: m.BackwardStep, timeout: float | None) -> m.BackwardReply:
        """One remote backward of the autograd bridge: by handle, else by recompute."""
        if step.handle:
            payloads = self._payloads(step.grad_outputs)
            request = m.backward_by_handle(step, payloads)
            try:
                response, incoming = self._invoke("backward", request, payloads, timeout)
                return m.backward_reply(response, step.inputs, incoming)
            except HandleNotFoundError:
                pass  # the graph is gone: recompute below, the caller sees no error
        payloads = self._payloads(step.inputs, step.grad_outputs)
        request = m.backward_by_recompute(step, payloads)
        response, incoming = self._invoke("backward", request, payloads, timeout)
        return m.backward_reply(response, step.inputs, incoming)

    def _payloads(self, *groups: Sequence[Any]) -> list[torch.Tensor] | None:
        return m.payload_list(self.stream_threshold_bytes, *groups)

    def _invoke(self, kind: str, request: Any, payloads: list[torch.Tensor] | None, timeout: float | None) -> tuple[Any, Any]:
        """Send ``request`` unary, or streamed when ``payloads`` holds its tensor bytes.

        Returns the response and, for a streamed call, an iterator of the response's tensor bytes.
        """
        if payloads is None:
            try:
                return self._call(getattr(self._stub, _UNARY[kind]), request, timeout), None
            except ResourceExhaustedError as error:
                if error.reason != "RESPONSE_TOO_LARGE":
                    raise
                payloads = m.move_data_out(request)  # the reply needs the stream: ask again that way
        try:
            responses = self._stub.StreamCall(
                m.stream_requests(kind, request, payloads),
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._settings.metadata(),
            )
            header, assembler = m.read_stream_header(next(responses, None), kind)
            for message in responses:
                assembler.feed(message.data)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return header, assembler.payloads()

    def _release(self, handle: str) -> None:
        """Free a kept graph without waiting; safe from a finalizer and if the client is closed."""
        try:
            future = self._stub.ReleaseHandles.future(
                pb.ReleaseHandlesRequest(handles=[handle]), timeout=5, metadata=self._settings.metadata()
            )
            # gRPC cancels a call whose future is garbage-collected: hold it until done.
            self._releasing.add(future)
            future.add_done_callback(self._releasing.discard)
        except Exception as exc:  # noqa: BLE001 - best effort: the server's TTL frees it anyway
            log.debug("could not release graph handle: %s", exc)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._settings.metadata())
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
