"""``AsyncGradientClient``: the client for asyncio code (grpc.aio), with the same calls as ``GradientClient``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
import torch

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

from . import _messages as m
from . import streaming
from ._client import GradientClient
from ._errors import ResourceExhaustedError, from_rpc_error
from ._messages import ChannelSettings, ForwardBackwardResult, FunctionInfo, Outputs

__all__ = ["AsyncGradientClient"]

_UNARY = {"forward": "Forward", "forward_backward": "ForwardBackward"}


class AsyncGradientClient:
    """Async client of a gradserve server: ``await client.forward_backward(...)``.

    Parameters, devices, dtypes and errors are those of
    :class:`gradserve.client.GradientClient`. It offers ``list_functions``,
    ``forward`` and ``forward_backward``; ``function`` (the differentiable step) needs
    torch's synchronous ``backward`` and lives on the sync client only. Use it as
    ``async with AsyncGradientClient(target) as client:``, inside a running event loop.
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
        stream_threshold_bytes: int = streaming.CHUNK_BYTES,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.stream_threshold_bytes = stream_threshold_bytes
        self._settings = ChannelSettings(tls, root_certificates, private_key, certificate_chain, token, options)
        self._channel = self._settings.open_channel(target, grpc.aio)
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        self._sync: GradientClient | None = None

    async def close(self) -> None:
        """Close the channels; calls in flight are cancelled."""
        await self._channel.close()
        if self._sync is not None:
            self._sync.close()

    async def __aenter__(self) -> AsyncGradientClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def list_functions(self, *, timeout: float | None = None) -> list[FunctionInfo]:
        """As :meth:`GradientClient.list_functions`."""
        return m.function_infos(await self._call(self._stub.ListFunctions, pb.ListFunctionsRequest(), timeout))

    async def forward(self, name: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Outputs:
        """As :meth:`GradientClient.forward`."""
        payloads = m.payload_list(self.stream_threshold_bytes, args, kwargs.values())
        request = m.forward_request(name, args, kwargs, payloads)
        response, incoming = await self._invoke("forward", request, payloads, timeout)
        return m.decode_outputs(response.outputs, response.returns_tuple, args, incoming)

    async def forward_backward(
        self,
        name: str,
        *args: Any,
        grad_outputs: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> ForwardBackwardResult:
        """As :meth:`GradientClient.forward_backward`."""
        grad_outputs = m.as_grad_outputs(grad_outputs)
        payloads = m.payload_list(self.stream_threshold_bytes, args, grad_outputs, kwargs.values())
        request = m.forward_backward_request(name, args, kwargs, grad_outputs, payloads)
        response, incoming = await self._invoke("forward_backward", request, payloads, timeout)
        return m.forward_backward_result(response, [*args, *kwargs.values()], incoming)

    async def _invoke(
        self, kind: str, request: Any, payloads: list[torch.Tensor] | None, timeout: float | None
    ) -> tuple[Any, Any]:
        if payloads is None:
            try:
                return await self._call(getattr(self._stub, _UNARY[kind]), request, timeout), None
            except ResourceExhaustedError as error:
                if error.reason != "RESPONSE_TOO_LARGE":
                    raise
                payloads = m.move_data_out(request)  # the reply needs the stream: ask again that way
        # Streamed calls run on the sync client in a worker thread: grpc.aio turns a server's
        # early refusal of an upload into "INTERNAL: Internal error from Core" when a write
        # races it, and a large transfer does not miss the event loop's thread.
        return await asyncio.to_thread(self._streaming_client()._invoke, kind, request, payloads, timeout)

    def _streaming_client(self) -> GradientClient:
        if self._sync is None:
            s = self._settings
            self._sync = GradientClient(
                self.target,
                timeout=self.timeout,
                tls=s.tls,
                root_certificates=s.root_certificates,
                private_key=s.private_key,
                certificate_chain=s.certificate_chain,
                token=s.token,
                options=s.options,
                stream_threshold_bytes=self.stream_threshold_bytes,
            )
        return self._sync

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._settings.metadata())
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
