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
from ._errors import HandleNotFoundError, from_rpc_error
from ._messages import ChannelSettings, ForwardBackwardResult, Forwarded, FunctionInfo, Outputs

__all__ = ["GradientClient"]

log = logging.getLogger(__name__)


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
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._settings = ChannelSettings(tls, root_certificates, private_key, certificate_chain, token, options)
        self._owns_channel = channel is None
        if channel is None:
            opts = self._settings.channel_options()
            if self._settings.secure:
                channel = grpc.secure_channel(target, self._settings.credentials(), options=opts)
            else:
                channel = grpc.insecure_channel(target, options=opts)
        self._channel = channel
        self._stub = pb_grpc.GradientServiceStub(self._channel)

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

    def forward(self, name: str, *args: Any, timeout: float | None = None) -> Outputs:
        """Run the Function's forward on the server; no graph is kept.

        Parameters
        ----------
        name
            Registered name.
        *args
            Positional arguments: tensors (any device, dtype, strides), numpy arrays,
            bool, int, float, str or None.

        Returns
        -------
        Tensor or tuple of Tensor
            Shaped like the Function's return; on the first tensor argument's device;
            detached (use :meth:`function` to join your autograd graph).
        """
        response = self._call(self._stub.Forward, m.forward_request(name, args), timeout)
        return m.decode_outputs(response.outputs, response.returns_tuple, args)

    def forward_backward(
        self,
        name: str,
        *args: Any,
        grad_outputs: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        timeout: float | None = None,
    ) -> ForwardBackwardResult:
        """Forward and backward in one round trip; the server keeps nothing.

        Parameters
        ----------
        name, *args
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
        request = m.forward_backward_request(name, args, grad_outputs)
        return m.forward_backward_result(self._call(self._stub.ForwardBackward, request, timeout), args)

    def function(self, name: str, *, timeout: float | None = None) -> Callable[..., Outputs]:
        """A callable running the remote Function as one differentiable step of your graph.

        ``y = client.function("square")(x)`` runs the forward on the server (which
        keeps the graph); ``y.sum().backward()`` later sends the upstream gradients and
        fills ``x.grad``. Integer outputs and outputs the server marks
        non-differentiable do not require grad. If the server no longer has the graph
        (restart, eviction, another replica), backward sends the inputs again and the
        server recomputes: same gradients, no error. When the outputs are dropped
        without a backward, the client tells the server to free the graph. Double
        backward through the remote step is not supported.
        """
        from ._autograd import RemoteFunction

        def call(*args: Any) -> Outputs:
            return RemoteFunction.apply(self, name, timeout, *args)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = f"Remote gradserve Function {name!r} at {self.target}."
        return call

    # -- used by the autograd step ---------------------------------------------------

    def _forward_keep(self, name: str, args: Sequence[Any], requires_grad: Sequence[bool], timeout: float | None) -> Forwarded:
        request = pb.ForwardRequest(function=name, args=m.encode_args(args, requires_grad), keep_graph=any(requires_grad))
        response = self._call(self._stub.Forward, request, timeout)
        outputs = m.decode_outputs(response.outputs, True, args)
        return Forwarded(outputs, response.returns_tuple, tuple(t.requires_grad for t in response.outputs),
                         response.handle, response.version)

    def _backward(
        self,
        name: str,
        forwarded: Forwarded,
        args: Sequence[Any],
        requires_grad: Sequence[bool],
        grad_outputs: Sequence[torch.Tensor | None],
        timeout: float | None,
    ) -> tuple[torch.Tensor | None, ...]:
        encoded = m.encode_grad_outputs(grad_outputs)
        common = {"function": name, "grad_outputs": encoded, "version": forwarded.version}
        if forwarded.handle:
            try:
                request = pb.BackwardRequest(handle=forwarded.handle, **common)
                return m.decode_grads(self._call(self._stub.Backward, request, timeout).grads, args)
            except HandleNotFoundError:
                pass  # the graph is gone: recompute below, the caller sees no error
        request = pb.BackwardRequest(recompute=pb.Arguments(values=m.encode_args(args, requires_grad)), **common)
        return m.decode_grads(self._call(self._stub.Backward, request, timeout).grads, args)

    def _release(self, handle: str) -> None:
        """Free a kept graph without waiting; safe from a finalizer and if the client is closed."""
        try:
            self._stub.ReleaseHandles.future(
                pb.ReleaseHandlesRequest(handles=[handle]), timeout=5, metadata=self._settings.metadata()
            )
        except Exception as exc:  # noqa: BLE001 - best effort: the server's TTL frees it anyway
            log.debug("could not release graph handle: %s", exc)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._settings.metadata())
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
