"""``AsyncGradientClient``: the asyncio face (grpc.aio) of the client core, with the same calls as ``GradientClient``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
import torch

from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.v1 import streaming
from gradserve.v1.connection import ChannelSettings

from ._core import REPLY_ERRORS, WAIT_FOR_SERVER_S, ClientCore, Plan, StartupWait, malformed_reply, release
from ._errors import GradServeError, UnavailableError
from ._messages import ForwardBackwardResult, FunctionInfo, Outputs
from ._shm import DEFAULT_THRESHOLD_BYTES, SharedMemory

__all__ = ["AsyncGradientClient"]


class AsyncGradientClient:
    """Async client of a gradserve server: ``await client.forward_backward(...)``.

    Parameters (``connections`` too), devices, dtypes, errors, retries and waiting for a
    starting server are those of :class:`gradserve.client.GradientClient`; both are faces
    of one core. It
    offers ``list_functions``, ``forward`` and ``forward_backward``; ``function`` (the
    differentiable step) needs torch's synchronous ``backward`` and lives on the sync
    client only. Use it as ``async with AsyncGradientClient(target) as client:``, inside
    a running event loop.
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
        wait_for_server_s: float = WAIT_FOR_SERVER_S,
        shared_memory: bool = False,
        shared_memory_threshold_bytes: int = DEFAULT_THRESHOLD_BYTES,
        connections: int = 1,
    ) -> None:
        settings = ChannelSettings(tls, root_certificates, private_key, certificate_chain, token, options)
        shm = SharedMemory(shared_memory_threshold_bytes) if shared_memory else None
        self._core = ClientCore(
            target, timeout, settings, stream_threshold_bytes, wait_for_server_s,
            shared_memory=shm, connections=connections,
        )
        self._channels = self._core.open_channels(grpc.aio)
        self._stubs = [pb_grpc.GradientServiceStub(c) for c in self._channels]
        # data chunks framed without protobuf copies
        self._stream_calls = [streaming.open_stream_call(c) for c in self._channels]

    @property
    def target(self) -> str:
        """The gRPC target this client calls."""
        return self._core.target

    @property
    def transport(self) -> str:
        """As :attr:`GradientClient.transport`."""
        return self._core.transport

    async def close(self) -> None:
        """Close the channels; calls in flight are cancelled."""
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> AsyncGradientClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def list_functions(self, *, timeout: float | None = None) -> list[FunctionInfo]:
        """As :meth:`GradientClient.list_functions`."""
        return await self._run(self._core.list_functions(), timeout)

    async def forward(self, name: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Outputs:
        """As :meth:`GradientClient.forward`."""
        return await self._run(self._core.forward(name, args, kwargs), timeout)

    async def forward_backward(
        self,
        name: str,
        *args: Any,
        grad_outputs: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> ForwardBackwardResult:
        """As :meth:`GradientClient.forward_backward`."""
        return await self._run(self._core.forward_backward(name, args, kwargs, grad_outputs), timeout)

    # -- I/O -----------------------------------------------------------------------------

    async def _run(self, plan: Plan, timeout: float | None) -> Any:
        """As ``GradientClient._run``, awaiting."""
        wait = self._core.startup_wait(timeout)
        index = self._core.connections.next()
        await self._probe(wait, index)
        plan = self._core.prepare(plan)
        try:
            while True:
                try:
                    return await self._attempt(plan, wait, index)
                except UnavailableError as error:
                    await asyncio.sleep(wait.retry_after(error))
                except GradServeError as error:
                    plan = self._core.fall_back(plan, error)
        finally:
            release(plan)

    async def _probe(self, wait: StartupWait, index: int) -> None:
        """As ``GradientClient._probe``, awaiting."""
        due = self._core.probe_plan()
        if due is None:
            return
        plan, nonce = due
        try:
            self._core.shared_memory.probe_reply(await self._attempt(plan, wait, index), nonce)
        except GradServeError as error:
            self._core.shared_memory.probe_failed(error)
        finally:
            release(plan)

    async def _attempt(self, plan: Plan, wait: StartupWait, index: int) -> Any:
        channel, stub, stream_call = self._channels[index], self._stubs[index], self._stream_calls[index]
        if channel.get_state(try_to_connect=True) is not grpc.ChannelConnectivity.READY:
            try:  # a server that is starting: wait for it, within the deadline or wait_for_server_s
                await asyncio.wait_for(channel.channel_ready(), wait.until_give_up())
            except asyncio.TimeoutError:
                pass  # call anyway: it fails fast, with the connection's own error
        self._core.connected_once |= channel.get_state() is grpc.ChannelConnectivity.READY
        options = self._core.call_options(wait)
        try:
            if plan.payloads is None:
                return plan.read(await getattr(stub, plan.method)(plan.request, **options), None)
            call = stream_call(**options)
            messages = plan.stream_requests()
            try:
                await call.write(next(messages))
                # Data only once the server accepted the header (its initial metadata): data racing
                # a refusal makes grpc.aio report "INTERNAL: Internal error from Core" instead.
                if streaming.accepted(await call.initial_metadata()):
                    for message in messages:
                        await call.write(message)
                    await call.done_writing()
            except asyncio.InvalidStateError:
                pass  # the call ended early: its status is read below
            first = await call.read()
            header, assembler = plan.read_stream(None if first is grpc.aio.EOF else first)
            while (message := await call.read()) is not grpc.aio.EOF:
                plan.feed(assembler, message)
            return plan.read(header, assembler.payloads())
        except grpc.RpcError as error:
            raise self._core.error(error) from None
        except GradServeError:
            raise
        except REPLY_ERRORS as exc:  # a reply breaking the contract
            raise malformed_reply(exc) from None
