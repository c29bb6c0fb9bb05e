"""Errors the client raises: one base class carrying the gRPC status code and the server's message."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "ArgumentError",
    "CancelledError",
    "DeadlineExceededError",
    "FunctionFailedError",
    "FunctionNotFoundError",
    "GradServeError",
    "HandleNotFoundError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
]


class GradServeError(Exception):
    """A gradserve call failed.

    Attributes
    ----------
    code : grpc.StatusCode
        The status code (an enum, not a string).
    message : str
        The server's message: which function, which argument, what was expected and what arrived.
    reason : str
        The stable UPPER_SNAKE reason from the status's ``google.rpc.ErrorInfo``
        (e.g. ``HANDLE_NOT_FOUND``), or ``""`` when the server sent none.
    """

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason


class NotFoundError(GradServeError):
    """NOT_FOUND: see :class:`FunctionNotFoundError` and :class:`HandleNotFoundError`."""


class FunctionNotFoundError(NotFoundError):
    """NOT_FOUND, reason FUNCTION_NOT_FOUND: no Function of that name on the server."""


class HandleNotFoundError(NotFoundError):
    """NOT_FOUND, reason HANDLE_NOT_FOUND: the forward's graph is gone; recompute from the inputs."""


class InvalidArgumentError(GradServeError):
    """INVALID_ARGUMENT: argument count, tensor encoding or grad_outputs do not match."""


class ArgumentError(InvalidArgumentError, ValueError):
    """INVALID_ARGUMENT raised by the client itself: an argument it cannot encode (an unsupported
    type or dtype, a numpy object array), found before anything is sent. Also a ValueError."""


class ResourceExhaustedError(GradServeError):
    """RESOURCE_EXHAUSTED: over the server's size limits, or the device ran out of memory."""


class FunctionFailedError(GradServeError):
    """FAILED_PRECONDITION: the registered Function's forward or backward raised or misbehaved."""


class DeadlineExceededError(GradServeError):
    """DEADLINE_EXCEEDED: the call's timeout passed; the server abandons the work."""


class CancelledError(GradServeError):
    """CANCELLED: the call was cancelled."""


class UnavailableError(GradServeError):
    """UNAVAILABLE: the server cannot be reached, or is shutting down."""


class UnauthenticatedError(GradServeError):
    """UNAUTHENTICATED: no or malformed credentials."""


class PermissionDeniedError(GradServeError):
    """PERMISSION_DENIED: credentials were refused."""


class InternalError(GradServeError):
    """INTERNAL: a server bug; the server log has the traceback."""


_BY_CODE: dict[grpc.StatusCode, type[GradServeError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FunctionFailedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INTERNAL: InternalError,
}
_BY_REASON: dict[str, type[GradServeError]] = {
    "FUNCTION_NOT_FOUND": FunctionNotFoundError,
    "HANDLE_NOT_FOUND": HandleNotFoundError,
}


def from_rpc_error(error: grpc.RpcError) -> GradServeError:
    """Convert a failed call into the matching :class:`GradServeError` subclass."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    reason = ""
    try:
        status = rpc_status.from_call(error)
    except Exception:  # noqa: BLE001 - details that disagree with code/message, or do not parse: keep what we have
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            try:
                detail.Unpack(info)
            except Exception:  # noqa: BLE001 - corrupt detail bytes: no reason
                continue
            reason = info.reason
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, GradServeError)
    return cls(code, message or "", reason)
