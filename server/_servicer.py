"""gRPC servicer: translates between protobuf messages and the runtime. No math here.

Domain errors become status codes in one place, :func:`_rpc`; anything unexpected is
INTERNAL, with the traceback only in the server log.
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
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradserve.v1 import codec, streaming
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

from ._errors import Abandoned, FunctionError, GradServeServerError
from ._metrics import Metrics
from ._runtime import ForwardResult, RngReplay, Runtime

__all__ = ["ERROR_DOMAIN", "GradientServicer"]

log = logging.getLogger("gradserve.calls")

ERROR_DOMAIN = "gradserve.dev"

R = TypeVar("R")


_MAX_MESSAGE_CHARS = 2000  # status messages travel in trailers, which clients cap at 16 KiB


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, reason: str, message: str) -> None:
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + " [...]"
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    status = status_pb2.Status(code=code.value[0], message=message, details=[info])
    context.abort_with_status(rpc_status.to_status(status))


def _classify(exc: Exception) -> tuple[grpc.StatusCode, str, str]:
    """(status code, ErrorInfo reason, message) for an exception raised while serving."""
    if isinstance(exc, GradServeServerError):
        return grpc.StatusCode[exc.code], exc.reason, str(exc)
    if isinstance(exc, codec.TensorTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "TENSOR_TOO_LARGE", str(exc)
    if isinstance(exc, codec.CodecError):
        return grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", str(exc)
    return grpc.StatusCode.INTERNAL, "INTERNAL", ""


class _Call(threading.local):
    """What the running RPC's log line and metrics need; a streamed call fills it in as it learns."""

    function = ""
    bytes_in = 0


_call = _Call()

# Request ids: a per-process random prefix and a counter (uuid4 cost 2.5% of a small call).
_ID_PREFIX = os.urandom(3).hex() + "-"
_ids = itertools.count(1)


def _rpc(method: Callable[[Any, Any, grpc.ServicerContext], R]) -> Callable[[Any, Any, grpc.ServicerContext], R]:
    """Run one RPC: refuse it while loading, count and log it, turn exceptions into a status."""

    @functools.wraps(method)
    def wrapper(self: GradientServicer, request: Any, context: grpc.ServicerContext) -> R:
        sent_id = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), None)
        request_id = str(sent_id)[:64] if sent_id else f"{_ID_PREFIX}{next(_ids):x}"
        _call.function = _loggable(getattr(request, "function", ""))
        _call.bytes_in = request.ByteSize() if isinstance(request, Message) else 0
        start = time.perf_counter()
        code, response = grpc.StatusCode.OK, None
        try:
            if self.runtime is None or self.metrics is None:
                raise _Loading("server is starting: functions are still loading; retry shortly")
            with self.metrics.track():
                response = method(self, request, context)
            return response
        except Exception as exc:
            code, reason, message = _classify(exc)
            remaining_s = context.time_remaining()
            if code is grpc.StatusCode.CANCELLED and remaining_s is not None and remaining_s <= 0:
                code = grpc.StatusCode.DEADLINE_EXCEEDED  # abandoned because the deadline passed
            if code is grpc.StatusCode.INTERNAL:
                log.exception("request %s: internal error in %s(%s)", request_id, method.__name__, _call.function)
                message = f"internal server error (request id {request_id}; details in the server log)"
            _abort(context, code, reason, message)
            raise  # unreachable: abort raises
        finally:
            duration_s = time.perf_counter() - start
            if self.metrics is not None:
                out = response.ByteSize() if isinstance(response, Message) else getattr(response, "nbytes", 0)
                # Only served names become label values: callers must not grow the label set.
                label = _call.function if self.runtime is not None and _call.function in self.runtime.registry else ""
                self.metrics.observe(label, method.__name__, code.name, duration_s, _call.bytes_in, out)
            if log.isEnabledFor(logging.INFO):  # --log-level WARNING skips the work (about 6% of a small call)
                fields = {
                    "request_id": request_id,
                    "method": method.__name__,
                    "function": _call.function,
                    "code": code.name,
                    "duration_ms": round(1e3 * duration_s, 3),
                    "peer": context.peer(),
                }
                log.info(
                    "request=%s method=%s function=%s code=%s duration_ms=%.2f peer=%s",
                    request_id,
                    method.__name__,
                    _call.function,
                    code.name,
                    fields["duration_ms"],
                    fields["peer"],
                    extra=fields,
                )

    return wrapper


def _loggable(name: str) -> str:
    """A caller-chosen name, safe for one log line: printable, at most 128 characters."""
    return name if len(name) <= 128 and name.isprintable() else repr(name[:128])


def _until_caller_leaves(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    """The request stream; a caller that cancels or passes its deadline mid-upload becomes Abandoned."""
    try:
        yield from requests
    except grpc.RpcError as exc:
        raise Abandoned("caller gone during the upload (cancelled or deadline passed); work abandoned") from exc


class _Loading(GradServeServerError):
    code, reason = "UNAVAILABLE", "LOADING"


@dataclass
class _Payloads:
    """Tensor bytes travelling outside the messages (StreamCall); both None for a unary call."""

    incoming: Iterator[torch.Tensor] | None = None
    outgoing: list[torch.Tensor] | None = None


class _StreamedReply:
    """A StreamCall's answer: the header, then the data chunks."""

    def __init__(self, header: pb.StreamResponse, payloads: list[torch.Tensor]) -> None:
        self.nbytes = header.ByteSize() + sum(p.numel() for p in payloads)
        chunks = (pb.StreamResponse(data=c) for c in streaming.chunks(payloads))
        self._messages = itertools.chain([header], chunks)

    def __iter__(self) -> Iterator[pb.StreamResponse]:
        return self

    def __next__(self) -> pb.StreamResponse:
        return next(self._messages)


class GradientServicer(pb_grpc.GradientServiceServicer):
    """``gradserve.v1.GradientService`` over a :class:`Runtime`.

    Answers UNAVAILABLE until :meth:`attach` gives it the runtime (functions loaded and
    checked), so the port can be bound and health reported while loading.

    Parameters
    ----------
    max_tensor_bytes
        Largest single tensor accepted, in bytes (RESOURCE_EXHAUSTED above it).
    max_request_bytes
        Largest total of a streamed request's tensors, in bytes (unary requests are
        capped by gRPC's own message limit, set to the same value).
    max_concurrent
        Forward/backward computations at once; further calls wait for a slot.
    """

    def __init__(
        self, *, max_tensor_bytes: int | None = None, max_request_bytes: int | None = None, max_concurrent: int = 16
    ) -> None:
        self.runtime: Runtime | None = None
        self.metrics: Metrics | None = None
        self.max_tensor_bytes = max_tensor_bytes
        self.max_request_bytes = max_request_bytes
        self._compute = threading.BoundedSemaphore(max_concurrent)

    def record_refusal(self, method_path: str, code: grpc.StatusCode) -> None:
        """Count a call an interceptor refused (bad token), under its method name."""
        if self.metrics is not None:
            self.metrics.observe("", method_path.rsplit("/", 1)[-1], code.name, 0.0, 0, 0)

    def attach(self, runtime: Runtime, metrics: Metrics) -> None:
        """Start serving ``runtime``, recording into ``metrics``."""
        self.metrics = metrics
        self.runtime = runtime

    @_rpc
    def ListFunctions(self, request: pb.ListFunctionsRequest, context: grpc.ServicerContext) -> pb.ListFunctionsResponse:
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
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        with self._compute:
            return self._forward(request, context, _Payloads())

    @_rpc
    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> pb.BackwardResponse:
        with self._compute:
            return self._backward(request, context, _Payloads())

    @_rpc
    def ForwardBackward(self, request: pb.ForwardBackwardRequest, context: grpc.ServicerContext) -> pb.ForwardBackwardResponse:
        with self._compute:
            return self._forward_backward(request, context, _Payloads())

    @_rpc
    def ReleaseHandles(self, request: pb.ReleaseHandlesRequest, context: grpc.ServicerContext) -> pb.ReleaseHandlesResponse:
        return pb.ReleaseHandlesResponse(released=self.runtime.handles.release(request.handles))

    @_rpc
    def StreamCall(self, request_iterator: Iterator[pb.StreamRequest], context: grpc.ServicerContext) -> _StreamedReply:
        request_iterator = _until_caller_leaves(request_iterator, context)
        first = next(request_iterator, None)
        kind = first.WhichOneof("part") if first is not None else None
        if kind not in ("forward", "backward", "forward_backward"):
            raise codec.CodecError(
                f"StreamCall: the first message must be a header (forward, backward or forward_backward), got {kind}"
            )
        header = getattr(first, kind)
        _call.function = _loggable(header.function)
        self.runtime.function(header.function)  # NOT_FOUND before receiving any data
        assembler = streaming.Assembler(
            header, max_tensor_bytes=self.max_tensor_bytes, max_total_bytes=self.max_request_bytes, what=header.function
        )
        # The header is accepted: say so, so the client starts sending data only now. A refusal
        # before this point reaches it intact (data racing a refusal makes gRPC report INTERNAL).
        context.send_initial_metadata(((streaming.ACCEPTED_KEY, "1"),))
        for message in request_iterator:
            if message.WhichOneof("part") != "data":
                raise codec.CodecError(f"StreamCall {header.function}: only data chunks may follow the header")
            assembler.feed(message.data)
        if not context.is_active():  # the stream ended because the caller left, not because it was done
            raise Abandoned(f"{header.function}: caller gone during the upload; work abandoned")
        _call.bytes_in = first.ByteSize() + sum(assembler.sizes)
        payloads = _Payloads(incoming=assembler.payloads(), outgoing=[])
        handler = {"forward": self._forward, "backward": self._backward, "forward_backward": self._forward_backward}[kind]
        with self._compute:  # taken after the upload: receiving is network-bound
            response = handler(header, context, payloads)
        return _StreamedReply(pb.StreamResponse(**{kind: response}), payloads.outgoing)

    # -- one implementation per operation, for unary and streamed calls ------------------

    def _forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext, io: _Payloads) -> pb.ForwardResponse:
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
        )
        _fits_one_message(io, result.outputs)
        return pb.ForwardResponse(
            outputs=_encode_outputs(request.function, result, io),
            returns_tuple=result.returns_tuple,
            handle=result.handle or "",
            handle_ttl_ms=int(self.runtime.handles.ttl_s * 1000) if result.handle else 0,
            version=result.version,
            rng=pb.RngReplay(**dataclasses.asdict(result.rng)) if result.rng else None,
        )

    def _backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext, io: _Payloads) -> pb.BackwardResponse:
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
        )
        _fits_one_message(io, result.grads)
        return pb.BackwardResponse(
            grads=_encode_grads(function, result.grads, io),
            handle=result.handle or "",
            handle_ttl_ms=int(self.runtime.handles.ttl_s * 1000) if result.handle else 0,
        )

    def _forward_backward(
        self, request: pb.ForwardBackwardRequest, context: grpc.ServicerContext, io: _Payloads
    ) -> pb.ForwardBackwardResponse:
        self.runtime.function(request.function)
        # Slot order: args (field 2), grad_outputs (3), kwargs (4).
        args = self._decode_args(request.function, request.args, io)
        grad_outputs = self._decode_grad_outputs(request.function, request.grad_outputs, io)
        kwargs = self._decode_kwargs(request.function, request.kwargs, io)
        seed = request.seed if request.HasField("seed") else None
        result, grads = self.runtime.forward_backward(request.function, args, grad_outputs, context.is_active, kwargs, seed)
        _fits_one_message(io, [*result.outputs, *grads])
        return pb.ForwardBackwardResponse(
            outputs=_encode_outputs(request.function, result, io),
            returns_tuple=result.returns_tuple,
            grads=_encode_grads(request.function, grads, io),
        )

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
            shown = _loggable(item.name)
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


# Protobuf cannot serialise a message of 2 GiB or more; leave room for the envelope.
UNARY_RESPONSE_LIMIT_BYTES = 2**31 - 2**20


class _ResponseTooLarge(GradServeServerError):
    code, reason = "RESOURCE_EXHAUSTED", "RESPONSE_TOO_LARGE"


def _fits_one_message(io: _Payloads, tensors: Any) -> None:
    """Refuse a unary reply over protobuf's 2 GiB ceiling; the client then repeats the call streamed."""
    if io.outgoing is not None:
        return
    total = sum(codec.nbytes(t) for t in tensors)
    if total > UNARY_RESPONSE_LIMIT_BYTES:
        raise _ResponseTooLarge(
            f"{_call.function}: the reply holds {total} bytes of tensors, over the {UNARY_RESPONSE_LIMIT_BYTES} bytes "
            "one message can carry; call through StreamCall for replies this large "
            "(GradientClient(stream_threshold_bytes=0) streams every call)"
        )


def _encode_outputs(function: str, result: ForwardResult, io: _Payloads) -> list[pb.Tensor]:
    """The outputs as messages; one the wire cannot carry is the Function's fault, named with its index."""
    encoded = []
    for i, (o, d) in enumerate(zip(result.outputs, result.differentiable)):
        try:
            encoded.append(codec.encode_tensor(o, requires_grad=d, payloads=io.outgoing))
        except codec.CodecError as exc:
            raise FunctionError(f"{function} forward output {i} cannot be sent: {exc}") from None
    return encoded


def _encode_grads(function: str, grads: Any, io: _Payloads) -> list[pb.MaybeTensor]:
    """Gradients as messages; ``requires_grad`` says whether one can be differentiated again."""
    encoded = []
    for i, g in enumerate(grads):
        try:
            encoded.append(codec.encode_maybe_tensor(g, requires_grad=g is not None and g.requires_grad, payloads=io.outgoing))
        except codec.CodecError as exc:
            raise FunctionError(f"{function} backward: gradient {i} cannot be sent: {exc}") from None
    return encoded
