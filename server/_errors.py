"""Domain errors of the server, each carrying its gRPC status code name and ErrorInfo reason.

The runtime raises these without importing grpc; the servicer turns them into a status in
one place (``_servicer._abort``). The client turns statuses back into
its own ``GradServeError`` subclasses in one place too.
"""

from __future__ import annotations

__all__ = [
    "FunctionError",
    "FunctionNotFound",
    "GradServeServerError",
    "HandleNotFound",
    "Abandoned",
    "FunctionUnavailable",
    "InvalidArgument",
    "NonFinite",
    "ResourceExhausted",
    "VersionMismatch",
    "DoubleBackwardUnsupported",
    "RngMismatch",
]


class GradServeServerError(Exception):
    """Base of the errors a call can end with; ``code`` is a ``grpc.StatusCode`` name."""

    code = "INTERNAL"
    reason = "INTERNAL"


class FunctionNotFound(GradServeServerError):
    """No Function is registered under the requested name."""

    code, reason = "NOT_FOUND", "FUNCTION_NOT_FOUND"


class HandleNotFound(GradServeServerError):
    """The graph handle expired, was evicted, was already used, or never existed."""

    code, reason = "NOT_FOUND", "HANDLE_NOT_FOUND"


class InvalidArgument(GradServeServerError):
    """The request is malformed: argument count, tensor encoding, grad_outputs."""

    code, reason = "INVALID_ARGUMENT", "INVALID_ARGUMENT"


class ResourceExhausted(GradServeServerError):
    """A tensor or request is over a configured limit, or the device ran out of memory."""

    code, reason = "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"


class FunctionError(GradServeServerError):
    """The registered Function's forward or backward raised, or returned something invalid."""

    code, reason = "FAILED_PRECONDITION", "FUNCTION_ERROR"


class FunctionUnavailable(GradServeServerError):
    """The Function is registered but not served: it failed its start-up check."""

    code, reason = "FAILED_PRECONDITION", "FUNCTION_UNAVAILABLE"


class NonFinite(GradServeServerError):
    """With --check-finite: an output or gradient holds NaN or Inf."""

    code, reason = "FAILED_PRECONDITION", "NON_FINITE"


class Abandoned(GradServeServerError):
    """The caller's deadline passed or it cancelled; the work was dropped and nothing kept."""

    code, reason = "CANCELLED", "ABANDONED"


class VersionMismatch(GradServeServerError):
    """A backward names another version of the Function than the one served now."""

    code, reason = "FAILED_PRECONDITION", "VERSION_MISMATCH"


class DoubleBackwardUnsupported(GradServeServerError):
    """A create_graph backward of a Function class not registered with ``double_backward=True``."""

    code, reason = "FAILED_PRECONDITION", "DOUBLE_BACKWARD_UNSUPPORTED"


class RngMismatch(GradServeServerError):
    """A recompute must replay randomness drawn on another device type or torch version."""

    code, reason = "FAILED_PRECONDITION", "RNG_MISMATCH"
