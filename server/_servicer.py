"""gRPC servicer: translates between protobuf messages and the runtime. No math here.

Domain errors become status codes in one place, :meth:`_CallRecord.fail`; anything
unexpected is INTERNAL, with the traceback only in the server log.

Admission before work, in this order: the function name, the argument count, every
declared tensor size and dtype (from the request, or a stream's header, before anything
is decoded or any data read), then the request's bytes against ``--max-inflight-bytes``
(waiting up to the deadline), then a compute slot. Outputs are checked against
``--max-tensor-bytes`` before they are encoded, and a forward's graph is kept only once
its reply is sure to go out.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import torch
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradserve.v1 import codec, shm, streaming
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

from ._admission import ByteBudget, Reservation
from ._auth import ANONYMOUS, caller_identity
from ._errors import Abandoned, FunctionError, GradServeServerError, InvalidArgument
from ._logging import escape
from ._metrics import Metrics
from ._registry import RegisteredFunction
from ._runtime import ForwardResult, RngReplay, Runtime
from ._shm import SharedMemoryService

__all__ = ["ERROR_DOMAIN", "GradientServicer"]

log = logging.getLogger("gradserve.calls")

ERROR_DOMAIN = "gradserve.dev"


# Method names a refusal may be counted under (the rest are "unknown"): ours, health's, reflection's.
_SERVED_METHODS = frozenset(
    [m.name for m in pb.DESCRIPTOR.services_by_name["GradientService"].methods] + ["Check", "Watch", "ServerReflectionInfo"]
)
_MAX_MESSAGE_CHARS = 2000  # status messages travel in trailers, which clients cap at 16 KiB


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, reason: str, message: str) -> NoReturn:
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + " [...]"
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    status = status_pb2.Status(code=code.value[0], message=message, details=[info])
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort raises")


def _classify(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(status code, ErrorInfo reason, message) for an exception raised while serving: the one mapping."""
    if isinstance(exc, (GradServeServerError, shm.SharedMemoryError)):
        return grpc.StatusCode[exc.code], exc.reason, str(exc)
    if isinstance(exc, codec.TensorTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "TENSOR_TOO_LARGE", str(exc)
    if isinstance(exc, codec.CodecError):
        return grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", str(exc)
    return grpc.StatusCode.INTERNAL, "INTERNAL", ""


# Request ids: a per-process random prefix and a counter (uuid4 cost 2.5% of a small call).
_ID_PREFIX = os.urandom(3).hex() + "-"
_ids = itertools.count(1)


class _CallRecord:
    """One call's log line, metrics and memory reservation; finished exactly once, with its real final code."""

    def __init__(self, servicer: GradientServicer, method: str, context: grpc.ServicerContext) -> None:
        sent_id = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), None)
        self.request_id = escape(sent_id, 64) if sent_id else f"{_ID_PREFIX}{next(_ids):x}"
        self.servicer = servicer
        self.method = method
        self.context = context
        self.function = ""
        self.raw_function = ""
        self.bytes_in = 0
        self.bytes_out = 0
        self.shm_bytes = 0  # request bytes in shared-memory segments (admitted once: they are mapped, not copied)
        self.start = time.perf_counter()
        self.reservation: Reservation | None = None
        self._owner: str | None = None
        self._finished = False
        self._lock = threading.Lock()

    def named(self, function: str) -> None:
        self.raw_function = function
        self.function = escape(function)

    @property
    def owner(self) -> str:
        """The caller's identity, for handle ownership."""
        if self._owner is None:
            self._owner = self.servicer.identify(self.context)
        return self._owner

    def fail(self, exc: BaseException) -> NoReturn:
        """Finish with the status ``exc`` maps to, and send it."""
        code, reason, message = _classify(exc)
        remaining_s = self.context.time_remaining()
        if code is grpc.StatusCode.CANCELLED and remaining_s is not None and remaining_s <= 0:
            code = grpc.StatusCode.DEADLINE_EXCEEDED  # abandoned because the deadline passed
        if code is grpc.StatusCode.INTERNAL:
            log.error("request %s: internal error in %s(%s)", self.request_id, self.method, self.function, exc_info=exc)
            message = f"internal server error (request id {self.request_id}; details in the server log)"
        self.finish(code)
        _abort(self.context, code, reason, message)

    def finish(self, code: grpc.StatusCode) -> None:
        """Release the memory, count and log the call (once)."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        if self.reservation is not None:
            self.reservation.release()
        duration_s = time.perf_counter() - self.start
        servicer = self.servicer
        if servicer.metrics is not None:
            # Only served names become label values: callers must not grow the label set.
            known = servicer.runtime is not None and self.raw_function in servicer.runtime.registry
            servicer.metrics.observe(
                self.raw_function if known else "", self.method, code.name, duration_s, self.bytes_in, self.bytes_out
            )
        if log.isEnabledFor(logging.INFO):  # --log-level WARNING skips the work (about 6% of a small call)
            fields = {
                "request_id": self.request_id,
                "method": self.method,
                "function": self.function,
                "code": code.name,
                "duration_ms": round(1e3 * duration_s, 3),
                "peer": self.context.peer(),
            }
            log.info(
                "request=%s method=%s function=%s code=%s duration_ms=%.2f peer=%s",
                self.request_id,
                self.method,
                self.function,
                code.name,
                fields["duration_ms"],
                fields["peer"],
                extra=fields,
            )

    def gone_code(self) -> grpc.StatusCode:
        """The code of a call whose caller left before its reply went out."""
        remaining_s = self.context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining_s is not None and remaining_s <= 0 else grpc.StatusCode.CANCELLED


def _rpc(method: Callable[..., Message]) -> Callable[[Any, Any, grpc.ServicerContext], bytes]:
    """Run one unary RPC: refuse it while loading, count and log it with its final code, turn exceptions
    into a status. Returns the reply serialised (the server passes it on as it is: ``streaming.serialize``)."""

    @functools.wraps(method)
    def wrapper(self: GradientServicer, request: Any, context: grpc.ServicerContext) -> bytes:
        call = _CallRecord(self, method.__name__, context)
        call.named(getattr(request, "function", ""))
        call.bytes_in = request.ByteSize() if isinstance(request, Message) else 0
        try:
            if self.runtime is None or self.metrics is None:
                raise _Loading("server is starting: functions are still loading; retry shortly")
            with self.metrics.track():
                response = method(self, request, context, call)
            # Serialised here, once (the handler's serializer passes bytes on: streaming.serialize);
            # ByteSize() would serialise it a second time just to count.
            response = response.SerializeToString()
            call.bytes_out = len(response)
        except BaseException as exc:  # a Function's SystemExit too: every call ends with a status
            call.fail(exc)
        call.finish(grpc.StatusCode.OK)
        return response

    return wrapper


def _until_caller_leaves(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    """The request stream; a caller that cancels or passes its deadline mid-upload becomes Abandoned."""
    try:
        yield from requests
    except grpc.RpcError as exc:
        raise Abandoned("caller gone during the upload (cancelled, deadline passed or idle too long); work abandoned") from exc


class _Loading(GradServeServerError):
    code, reason = "UNAVAILABLE", "LOADING"


class _OutputTooLarge(GradServeServerError):
    code, reason = "RESOURCE_EXHAUSTED", "OUTPUT_TOO_LARGE"


@dataclass
class _Payloads:
    """Tensor bytes travelling outside the messages (StreamCall); both None for a unary call."""

    incoming: Iterator[torch.Tensor] | None = None
    outgoing: list[torch.Tensor] | None = None
    pending: ForwardResult | None = None  # a forward whose graph is kept once the reply has gone out


def _tensor_bytes(tensors: Any) -> int:
    return sum(codec.nbytes(t) for t in tensors)


class GradientServicer(pb_grpc.GradientServiceServicer):
    """``gradserve.v1.GradientService`` over a :class:`Runtime`.

    Answers UNAVAILABLE until :meth:`attach` gives it the runtime (functions loaded and
    checked), so the port can be bound and health reported while loading.

    Parameters
    ----------
    max_tensor_bytes
        Largest single tensor accepted or returned, in bytes (RESOURCE_EXHAUSTED above it).
    max_request_bytes
        Largest total of a request's tensors, in bytes (unary requests are also capped
        by gRPC's own message limit, set to the same value).
    max_concurrent
        Forward/backward computations at once; further admitted calls wait for a slot.
    budget
        Bytes in flight over all calls (``--max-inflight-bytes``); None: no limit.
    tokens_required
        Whether the server verifies bearer tokens (then a token is an identity that owns
        handles).
    shared_memory
        Same-host shared memory (``--shared-memory``); None: off.
    """

    def __init__(
        self,
        *,
        max_tensor_bytes: int | None = None,
        max_request_bytes: int | None = None,
        max_concurrent: int = 16,
        budget: ByteBudget | None = None,
        tokens_required: bool = False,
        shared_memory: SharedMemoryService | None = None,
    ) -> None:
        self.runtime: Runtime | None = None
        self.metrics: Metrics | None = None
        self.max_tensor_bytes = max_tensor_bytes
        self.max_request_bytes = max_request_bytes
        self.budget = budget or ByteBudget(0)
        self._compute = threading.BoundedSemaphore(max_concurrent)
        self._tokens_required = tokens_required
        self.shared_memory = shared_memory or SharedMemoryService(False)

    def identify(self, context: grpc.ServicerContext) -> str:
        """The caller's identity: token digest, client certificate digest, or anonymous."""
        if self._tokens_required or context.peer_identities():
            return caller_identity(context, self._tokens_required)
        return ANONYMOUS

    def record_refusal(self, method_path: str, code: grpc.StatusCode) -> None:
        """Count a call an interceptor refused (bad token, server busy), under its method name."""
        if self.metrics is not None:
            method = method_path.rsplit("/", 1)[-1]
            # An interceptor sees any path a caller sends: only served method names become label values.
            self.metrics.observe("", method if method in _SERVED_METHODS else "unknown", code.name, 0.0, 0, 0)
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                self.metrics.auth_refusals.labels(code.name).inc()

    def attach(self, runtime: Runtime, metrics: Metrics) -> None:
        """Start serving ``runtime``, recording into ``metrics``."""
        self.metrics = metrics
        self.runtime = runtime

    @_rpc
    def ListFunctions(
        self, request: pb.ListFunctionsRequest, context: grpc.ServicerContext, call: _CallRecord
    ) -> pb.ListFunctionsResponse:
        return pb.ListFunctionsResponse(
            functions=[
                pb.FunctionInfo(
                    name=f.name,
                    num_inputs=f.num_inputs,
                    doc=f.doc,
                    kind=f.kind,
                    version=f.version,
                    unavailable_reason=self.runtime.unavailable.get(f.name, ""),
                    signature=f.signature,
                    required_inputs=f.required_inputs,
                    double_backward=f.differentiable_backward,
                )
                for f in self.runtime.registry
            ]
        )

    @_rpc
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext, call: _CallRecord) -> pb.ForwardResponse:
        return self._unary("forward", self._forward, request, context, call)

    @_rpc
    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext, call: _CallRecord) -> pb.BackwardResponse:
        return self._unary("backward", self._backward, request, context, call)

    @_rpc
    def ForwardBackward(
        self, request: pb.ForwardBackwardRequest, context: grpc.ServicerContext, call: _CallRecord
    ) -> pb.ForwardBackwardResponse:
        return self._unary("forward_backward", self._forward_backward, request, context, call)

    @_rpc
    def ReleaseHandles(
        self, request: pb.ReleaseHandlesRequest, context: grpc.ServicerContext, call: _CallRecord
    ) -> pb.ReleaseHandlesResponse:
        return pb.ReleaseHandlesResponse(released=self.runtime.handles.release(request.handles, call.owner))

    def SharedMemoryProbe(
        self, request: pb.SharedMemoryProbeRequest, context: grpc.ServicerContext
    ) -> pb.SharedMemoryProbeResponse:
        """Prove a shared host, /dev/shm and user (see the RPC's comment); answers while loading too."""
        call = _CallRecord(self, "SharedMemoryProbe", context)
        try:
            response = self.shared_memory.probe(request)
        except BaseException as exc:
            call.fail(exc)
        call.finish(grpc.StatusCode.OK)
        return response

    def _unary(
        self, kind: str, handler: Callable[..., Message], request: Any, context: grpc.ServicerContext, call: _CallRecord
    ) -> Message:
        """A unary Forward, Backward or ForwardBackward; through shared memory when the client asks (its metadata)."""
        reply_bytes = self.shared_memory.reply_threshold(context)
        if reply_bytes is None:  # the plain path: no reference may be in the request
            self._check_request(kind, request, call)
            with self._compute:
                return handler(request, context, _Payloads(), call)
        self.runtime.function(request.function)  # NOT_FOUND before anything else
        call.shm_bytes = self.shared_memory.shared_bytes(request, context, call.function or kind)  # before mapping
        self._check_request(kind, request, call)  # limits and the byte budget, shared bytes included
        with self._compute:
            mapped = shm.map_message(request, what=call.function) if call.shm_bytes else None
            io = _Payloads(
                incoming=iter(mapped) if mapped is not None else None, outgoing=[] if self.shared_memory.enabled else None
            )
            response = handler(request, context, io, call)
            if io.outgoing is None:
                return response
            segment = self.shared_memory.send(response, io.outgoing, reply_bytes, context)
            try:
                if io.pending is not None:  # the reply is built and the caller still there: keep the graph
                    self.runtime.keep(io.pending, call.owner)
            except BaseException:
                self.shared_memory.discard(segment)
                raise
            return response

    def StreamCall(
        self, request_iterator: Iterator[pb.StreamRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.StreamResponse]:
        """A streamed call; logged and counted when its reply has gone out (or the caller left), with that code."""
        call = _CallRecord(self, "StreamCall", context)
        tracked = False
        try:
            if self.runtime is None or self.metrics is None:
                # Read the header first: refusing while it is still on its way makes grpc.aio
                # clients see "INTERNAL: Internal error from Core" instead of this status.
                next(request_iterator, None)
                raise _Loading("server is starting: functions are still loading; retry shortly")
            self.metrics.in_flight.inc()
            tracked = True
            header_msg, payloads = self._stream_call(_until_caller_leaves(request_iterator, context), context, call)
        except BaseException as exc:
            if tracked:
                self.metrics.in_flight.dec()
            call.fail(exc)
        reply = _StreamedReply(header_msg, payloads, call, self)
        if not context.add_callback(reply.ended):  # the call already ended: the caller left during the work
            reply.ended()
        return iter(reply)

    def _stream_call(
        self, requests: Iterator[pb.StreamRequest], context: grpc.ServicerContext, call: _CallRecord
    ) -> tuple[pb.StreamResponse, _Payloads]:
        first = next(requests, None)
        kind = streaming.part(first) if first is not None else None
        if kind not in ("forward", "backward", "forward_backward"):
            raise codec.CodecError(
                f"StreamCall: the first message must be a header (forward, backward or forward_backward), got {kind}"
            )
        header = getattr(first, kind)
        call.named(header.function)
        self._check_request(kind, header, call, admit=False)  # count, sizes, dtypes: before any data is read
        assembler = streaming.Assembler(
            header, max_tensor_bytes=self.max_tensor_bytes, max_total_bytes=self.max_request_bytes, what=call.function
        )
        call.bytes_in = first.ByteSize() + sum(assembler.sizes)
        self._admit(call, call.bytes_in, context)  # on the declared sizes, before any data is read
        # The header is accepted (checked and admitted): say so, so the client starts sending
        # data only now. A refusal before this point reaches it intact (data racing a refusal
        # makes gRPC report INTERNAL).
        context.send_initial_metadata(((streaming.ACCEPTED_KEY, "1"),))
        for message in requests:
            if streaming.part(message) != "data":
                raise codec.CodecError(f"StreamCall {call.function}: only data chunks may follow the header")
            assembler.feed(message.data)
            del message  # gRPC's buffer of this chunk: freed before the next one arrives
        if not context.is_active():  # the stream ended because the caller left, not because it was done
            raise Abandoned(f"{call.function}: caller gone during the upload; work abandoned")
        payloads = _Payloads(incoming=assembler.payloads(), outgoing=[])
        handler = {"forward": self._forward, "backward": self._backward, "forward_backward": self._forward_backward}[kind]
        with self._compute:  # taken after the upload: receiving is network-bound
            response = handler(header, context, payloads, call)
        return pb.StreamResponse(**{kind: response}), payloads

    # -- admission ---------------------------------------------------------------------

    def _check_request(self, kind: str, request: Any, call: _CallRecord, admit: bool = True) -> None:
        """The function, argument count, declared tensor sizes and dtypes, from the message alone; then memory."""
        entry = self.runtime.function(request.function)  # NOT_FOUND before anything else
        if kind == "backward":
            if request.WhichOneof("graph") == "recompute":
                self._check_values(entry, request.recompute.values, "argument", kwargs=request.recompute.kwargs)
            for k, c in enumerate(request.lower_order):
                self._check_values(entry, c.values, f"lower_order[{k}]")
        else:
            self._check_values(entry, request.args, "argument", kwargs=request.kwargs)
        if kind != "forward":
            self._check_values(entry, request.grad_outputs, "grad_outputs")
        if admit:
            self._admit(call, _UNARY_COPIES * call.bytes_in + call.shm_bytes, call.context)

    def _check_values(self, entry: RegisteredFunction, values: Any, what: str, *, kwargs: Any = None) -> None:
        """Argument count against the signature, then each tensor's declared dtype and size: nothing decoded."""
        named = list(kwargs or ())
        if what == "argument":
            if entry.num_inputs is None and (len(values) > _MAX_ARGUMENTS or len(named) > _MAX_ARGUMENTS):
                raise InvalidArgument(
                    f"{entry.name}: {len(values)} positional and {len(named)} keyword arguments; at most {_MAX_ARGUMENTS} each"
                )
            try:  # placeholders: the count and names are checked as Python would, before any tensor is decoded
                entry.bind([None] * len(values), {item.name: None for item in named})
            except TypeError as exc:
                raise InvalidArgument(str(exc)) from None
        total = 0
        items = [*values, *(item.value for item in named)]
        for i, value in enumerate(items):
            if value.WhichOneof("kind") != "tensor":
                continue
            tensor = value.tensor
            name = f"{entry.name} {what} {i}" if what == "argument" else f"{entry.name} {what}[{i}]"
            nbytes = codec.tensor_nbytes(tensor, what=name)  # dtype, rank, negative dimensions
            if self.max_tensor_bytes is not None and nbytes > self.max_tensor_bytes:
                raise codec.TensorTooLarge(
                    f"{name}: tensor of shape {codec._shape_text(tensor.shape)} is {nbytes} bytes, "
                    f"over the limit of {self.max_tensor_bytes} bytes"
                )
            if (
                what == "argument"
                and tensor.requires_grad
                and not (codec.WIRE_TO_DTYPE[tensor.dtype].is_floating_point or codec.WIRE_TO_DTYPE[tensor.dtype].is_complex)
            ):
                raise codec.CodecError(
                    f"{name}: requires_grad is set on a tensor of dtype "
                    f"{str(codec.WIRE_TO_DTYPE[tensor.dtype]).removeprefix('torch.')}; "
                    "only floating point and complex tensors can require gradients"
                )
            total += nbytes
        if self.max_request_bytes is not None and total > self.max_request_bytes:
            raise codec.TensorTooLarge(
                f"{entry.name}: the request's tensors total {total} bytes, "
                f"over the request limit of {self.max_request_bytes} bytes"
            )

    def _admit(self, call: _CallRecord, nbytes: int, context: grpc.ServicerContext) -> None:
        call.reservation = self.budget.acquire(
            nbytes, what=call.function or call.method, timeout_s=context.time_remaining(), is_active=context.is_active
        )

    def _check_outputs(self, call: _CallRecord, tensors: Any, io: _Payloads, what: str) -> None:
        """Refuse outputs over --max-tensor-bytes (or a unary reply over 2 GiB) before encoding; count the reply's bytes."""
        for i, t in enumerate(tensors):
            if t is None:
                continue
            nbytes = codec.nbytes(t)
            if self.max_tensor_bytes is not None and nbytes > self.max_tensor_bytes:
                raise _OutputTooLarge(
                    f"{call.function} {what} {i} of shape {list(t.shape)[:8]} is {nbytes} bytes, over the server's "
                    f"--max-tensor-bytes of {self.max_tensor_bytes} bytes; nothing was kept"
                )
        total = _tensor_bytes(tensors)
        _fits_one_message(io, total, call.function)
        if call.reservation is not None:
            # A streamed reply sends views of the tensors' own bytes, 1 MiB at a time.
            call.reservation.grow_to(call.reservation.nbytes + total * (_UNARY_COPIES if io.outgoing is None else 1))

    # -- one implementation per operation, for unary and streamed calls ------------------

    def _forward(
        self, request: pb.ForwardRequest, context: grpc.ServicerContext, io: _Payloads, call: _CallRecord
    ) -> pb.ForwardResponse:
        self.runtime.function(request.function)  # NOT_FOUND before decoding any tensor
        args = self._decode_args(request.function, request.args, io)
        kwargs = self._decode_kwargs(request.function, request.kwargs, io)
        result = self.runtime.forward(
            request.function,
            args,
            kwargs,
            keep_graph=request.keep_graph,
            grad_enabled=not request.no_grad,
            seed=request.seed if request.HasField("seed") else None,
            is_active=context.is_active,
            owner=call.owner,
            defer_keep=True,
        )
        self._check_outputs(call, result.outputs, io, "output")
        response = pb.ForwardResponse(
            returns_tuple=result.returns_tuple,
            handle=result.handle or "",
            handle_ttl_ms=int(self.runtime.handles.ttl_s * 1000) if result.handle else 0,
            version=result.version,
            rng=pb.RngReplay(**dataclasses.asdict(result.rng)) if result.rng else None,
        )
        _encode_outputs(request.function, result, io, response.outputs)
        if result.pending is not None:
            if io.outgoing is None:  # unary: the reply is built and the caller still there
                if not context.is_active():
                    raise Abandoned(f"{call.function}: caller gone before the reply; no graph kept")
                self.runtime.keep(result, call.owner)
            else:  # streamed: kept when the last chunk has gone out
                io.pending = result
        return response

    def _backward(
        self, request: pb.BackwardRequest, context: grpc.ServicerContext, io: _Payloads, call: _CallRecord
    ) -> pb.BackwardResponse:
        function = request.function
        self.runtime.function(function)
        source = request.WhichOneof("graph")
        if source is None:
            raise codec.CodecError(f"{function} backward: set either handle or recompute")
        # Slot order: recompute arguments (field 3), grad_outputs (4), lower_order (8).
        args = kwargs = None
        if source == "recompute":
            args = self._decode_args(function, request.recompute.values, io)
            kwargs = self._decode_kwargs(function, request.recompute.kwargs, io)
        grad_outputs = self._decode_grad_outputs(function, request.grad_outputs, io)
        lower_order = [
            self._decode_grad_outputs(function, c.values, io, what=f"lower_order[{k}]") or []
            for k, c in enumerate(request.lower_order)
        ]
        result = self.runtime.backward(
            function,
            handle=request.handle if source == "handle" else None,
            args=args,
            kwargs=kwargs,
            grad_outputs=grad_outputs,
            lower_order=lower_order,
            keep_graph=request.keep_graph,
            rng=RngReplay(request.rng.seed, request.rng.device_type, request.rng.torch_version)
            if request.HasField("rng")
            else None,
            version=request.version,
            is_active=context.is_active,
            owner=call.owner,
        )
        try:
            self._check_outputs(call, result.grads, io, "gradient")
            response = pb.BackwardResponse(
                handle=result.handle or "",
                handle_ttl_ms=int(self.runtime.handles.ttl_s * 1000) if result.handle else 0,
            )
            _encode_grads(function, result.grads, io, response.grads)
            return response
        except BaseException:
            if result.handle:  # the next order's graph: not kept when its reply is refused
                self.runtime.handles.release([result.handle], call.owner)
            raise

    def _forward_backward(
        self, request: pb.ForwardBackwardRequest, context: grpc.ServicerContext, io: _Payloads, call: _CallRecord
    ) -> pb.ForwardBackwardResponse:
        self.runtime.function(request.function)
        # Slot order: args (field 2), grad_outputs (3), kwargs (4).
        args = self._decode_args(request.function, request.args, io)
        grad_outputs = self._decode_grad_outputs(request.function, request.grad_outputs, io)
        kwargs = self._decode_kwargs(request.function, request.kwargs, io)
        seed = request.seed if request.HasField("seed") else None
        result, grads = self.runtime.forward_backward(request.function, args, grad_outputs, context.is_active, kwargs, seed)
        self._check_outputs(call, [*result.outputs, *grads], io, "output or gradient")
        response = pb.ForwardBackwardResponse(returns_tuple=result.returns_tuple)
        _encode_outputs(request.function, result, io, response.outputs)
        _encode_grads(request.function, grads, io, response.grads)
        return response

    @property
    def _limits(self) -> dict[str, Any]:
        """Size limits of a decoded argument: bytes, and the element count of a sparse one."""
        return {"max_tensor_bytes": self.max_tensor_bytes, "max_sparse_numel": codec.MAX_SPARSE_NUMEL}

    def _decode_args(self, function: str, values: Any, io: _Payloads) -> list[Any]:
        return [
            codec.decode_value(v, **self._limits, what=f"{function} argument {i}", payloads=io.incoming)
            for i, v in enumerate(values)
        ]

    def _decode_kwargs(self, function: str, named: Any, io: _Payloads) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for item in named:
            shown = escape(item.name)
            if item.name in kwargs:
                raise codec.CodecError(f"{function}: keyword argument {shown} given twice")
            kwargs[item.name] = codec.decode_value(
                item.value, **self._limits, what=f"{function} argument {shown}", payloads=io.incoming
            )
        return kwargs

    def _decode_grad_outputs(self, function: str, values: Any, io: _Payloads, what: str = "grad_outputs") -> list[Any] | None:
        if not values:
            return None
        decoded = []
        for i, v in enumerate(values):
            limits = {"max_bytes": self.max_tensor_bytes, "max_sparse_numel": codec.MAX_SPARSE_NUMEL}
            g = codec.decode_maybe_tensor(v, **limits, what=f"{function} {what}[{i}]", payloads=io.incoming)
            if g is not None and getattr(v, v.WhichOneof("kind")).requires_grad and (g.is_floating_point() or g.is_complex()):
                g.requires_grad_(True)  # a leaf of the graph a keep_graph backward keeps
            decoded.append(g)
        return decoded


class _StreamedReply:
    """A StreamCall's answer: the header, then the data chunks; the call is finished when they have gone out."""

    def __init__(self, header: pb.StreamResponse, io: _Payloads, call: _CallRecord, servicer: GradientServicer) -> None:
        self._header = header
        self._io = io
        self._call = call
        self._servicer = servicer
        self._sent_all = False
        call.bytes_out = header.ByteSize() + _tensor_bytes(io.outgoing or [])

    def __iter__(self) -> Iterator[pb.StreamResponse | bytes]:
        yield self._header
        yield from streaming.data_messages(self._io.outgoing or [])  # wire bytes: see streaming.serialize
        # gRPC asks for the next message only once the last one has gone out: the reply is
        # sure, so the graph is kept now (before the status, so before the caller's Backward).
        if self._io.pending is not None and self._call.context.is_active():
            self._servicer.runtime.keep(self._io.pending, self._call.owner)
        self._sent_all = True

    def ended(self) -> None:
        """The call ended (gRPC's termination callback): log it with its real code."""
        self._io.pending = None
        self._servicer.metrics.in_flight.dec()
        self._call.finish(grpc.StatusCode.OK if self._sent_all else self._call.gone_code())


# A unary call holds about three copies of its request while it runs (gRPC's buffer, the
# message, the decoded tensors) and of its reply (the tensors, the message, the serialized
# bytes): measured in the chaos soak, counting fewer let the RSS run past the budget. A
# streamed call holds one of each (the assembled buffers; views of the outputs).
_UNARY_COPIES = 3

# Most positional (or keyword) arguments a request to a Function taking *args may carry:
# binding and checking a million placeholders would cost seconds. A fixed signature
# refuses extra arguments at once.
_MAX_ARGUMENTS = 4096

# Protobuf cannot serialise a message of 2 GiB or more; leave room for the envelope.
UNARY_RESPONSE_LIMIT_BYTES = 2**31 - 2**20


class _ResponseTooLarge(GradServeServerError):
    code, reason = "RESOURCE_EXHAUSTED", "RESPONSE_TOO_LARGE"


def _fits_one_message(io: _Payloads, total: int, function: str) -> None:
    """Refuse a unary reply over protobuf's 2 GiB ceiling (before it is encoded); StreamCall carries larger ones."""
    if io.outgoing is not None:
        return
    if total > UNARY_RESPONSE_LIMIT_BYTES:
        raise _ResponseTooLarge(
            f"{function}: the reply holds {total} bytes of tensors, over the {UNARY_RESPONSE_LIMIT_BYTES} bytes "
            "one message can carry; call through StreamCall for replies this large "
            "(GradientClient(stream_threshold_bytes=0) streams every call)"
        )


def _encode_outputs(function: str, result: ForwardResult, io: _Payloads, into: Any) -> None:
    """The outputs, added to the repeated field ``into`` in place (no second copy of their bytes);
    one the wire cannot carry is the Function's fault, named with its index."""
    for i, (o, d) in enumerate(zip(result.outputs, result.differentiable)):
        try:
            codec.encode_tensor(o, requires_grad=d, payloads=io.outgoing, out=into.add())
        except codec.CodecError as exc:
            raise FunctionError(f"{function} forward output {i} cannot be sent: {exc}") from None


def _encode_grads(function: str, grads: Any, io: _Payloads, into: Any) -> None:
    """Gradients, added to ``into`` in place; ``requires_grad`` says whether one can be differentiated again."""
    for i, g in enumerate(grads):
        try:
            codec.encode_maybe_tensor(g, requires_grad=g is not None and g.requires_grad, payloads=io.outgoing, out=into.add())
        except codec.CodecError as exc:
            raise FunctionError(f"{function} backward: gradient {i} cannot be sent: {exc}") from None
