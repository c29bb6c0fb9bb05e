"""gRPC servicer: translates between protobuf messages and the runtime. No math here.

Domain errors become status codes in one place, :func:`_rpc`; anything unexpected is
INTERNAL, with the traceback only in the server log.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradserve.client import codec
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

from ._errors import GradServeServerError
from ._metrics import Metrics
from ._runtime import ForwardResult, Runtime

__all__ = ["ERROR_DOMAIN", "GradientServicer"]

log = logging.getLogger("gradserve.calls")

ERROR_DOMAIN = "gradserve.dev"

R = TypeVar("R")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, reason: str, message: str) -> None:
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


def _rpc(method: Callable[[Any, Any, grpc.ServicerContext], R]) -> Callable[[Any, Any, grpc.ServicerContext], R]:
    """Run one RPC: refuse it while loading, count and log it, turn exceptions into a status."""

    @functools.wraps(method)
    def wrapper(self: GradientServicer, request: Any, context: grpc.ServicerContext) -> R:
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex[:12])[:64]
        function = getattr(request, "function", "")
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
            if code is grpc.StatusCode.INTERNAL:
                log.exception("request %s: internal error in %s(%s)", request_id, method.__name__, function)
                message = f"internal server error (request id {request_id}; details in the server log)"
            _abort(context, code, reason, message)
            raise  # unreachable: abort raises
        finally:
            duration_s = time.perf_counter() - start
            if self.metrics is not None:
                out = response.ByteSize() if response is not None else 0
                self.metrics.observe(function, method.__name__, code.name, duration_s, request.ByteSize(), out)
            fields = {"request_id": request_id, "method": method.__name__, "function": function,
                      "code": code.name, "duration_ms": round(1e3 * duration_s, 3), "peer": context.peer()}
            log.info("request=%s method=%s function=%s code=%s duration_ms=%.2f", request_id, method.__name__,
                     function, code.name, fields["duration_ms"], extra=fields)

    return wrapper


class _Loading(GradServeServerError):
    code, reason = "UNAVAILABLE", "LOADING"


class GradientServicer(pb_grpc.GradientServiceServicer):
    """``gradserve.v1.GradientService`` over a :class:`Runtime`.

    Answers UNAVAILABLE until :meth:`attach` gives it the runtime (functions loaded and
    checked), so the port can be bound and health reported while loading.

    Parameters
    ----------
    max_tensor_bytes
        Largest single tensor accepted, in bytes (RESOURCE_EXHAUSTED above it).
    """

    def __init__(self, *, max_tensor_bytes: int | None = None) -> None:
        self.runtime: Runtime | None = None
        self.metrics: Metrics | None = None
        self.max_tensor_bytes = max_tensor_bytes

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
                )
                for f in self.runtime.registry
            ]
        )

    @_rpc
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        self.runtime.function(request.function)  # NOT_FOUND before decoding any tensor
        args = self._decode_args(request.function, request.args)
        result = self.runtime.forward(
            request.function, args, keep_graph=request.keep_graph, is_active=context.is_active
        )
        return pb.ForwardResponse(
            outputs=_encode_outputs(result),
            returns_tuple=result.returns_tuple,
            handle=result.handle or "",
            handle_ttl_ms=int(self.runtime.handles.ttl_s * 1000) if result.handle else 0,
            version=result.version,
        )

    @_rpc
    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> pb.BackwardResponse:
        self.runtime.function(request.function)
        grad_outputs = self._decode_grad_outputs(request.function, request.grad_outputs)
        source = request.WhichOneof("graph")
        if source == "handle":
            grads = self.runtime.backward(
                request.function,
                handle=request.handle,
                grad_outputs=grad_outputs,
                version=request.version,
                is_active=context.is_active,
            )
        elif source == "recompute":
            args = self._decode_args(request.function, request.recompute.values)
            grads = self.runtime.backward(
                request.function,
                args=args,
                grad_outputs=grad_outputs,
                version=request.version,
                is_active=context.is_active,
            )
        else:
            raise codec.CodecError(f"{request.function} backward: set either handle or recompute")
        return pb.BackwardResponse(grads=[codec.encode_maybe_tensor(g) for g in grads])

    @_rpc
    def ReleaseHandles(
        self, request: pb.ReleaseHandlesRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseHandlesResponse:
        return pb.ReleaseHandlesResponse(released=self.runtime.handles.release(request.handles))

    @_rpc
    def ForwardBackward(
        self, request: pb.ForwardBackwardRequest, context: grpc.ServicerContext
    ) -> pb.ForwardBackwardResponse:
        self.runtime.function(request.function)
        args = self._decode_args(request.function, request.args)
        grad_outputs = self._decode_grad_outputs(request.function, request.grad_outputs)
        result, grads = self.runtime.forward_backward(request.function, args, grad_outputs, context.is_active)
        return pb.ForwardBackwardResponse(
            outputs=_encode_outputs(result),
            returns_tuple=result.returns_tuple,
            grads=[codec.encode_maybe_tensor(g) for g in grads],
        )

    def _decode_args(self, function: str, values: Any) -> list[Any]:
        return [
            codec.decode_value(v, max_tensor_bytes=self.max_tensor_bytes, what=f"{function} argument {i}")
            for i, v in enumerate(values)
        ]

    def _decode_grad_outputs(self, function: str, values: Any) -> list[Any] | None:
        if not values:
            return None
        return [
            codec.decode_maybe_tensor(v, max_bytes=self.max_tensor_bytes, what=f"{function} grad_outputs[{i}]")
            for i, v in enumerate(values)
        ]


def _encode_outputs(result: ForwardResult) -> list[pb.Tensor]:
    return [codec.encode_tensor(o, requires_grad=d) for o, d in zip(result.outputs, result.differentiable)]
