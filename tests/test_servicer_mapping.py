"""The servicer's one mapping from errors to status codes, in process: code, ErrorInfo reason, message, metrics.

The servicer's RPC methods are called as gRPC calls them, with a context that records
the status it aborts with; nothing listens on a port.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2

from gradserve.server import Runtime, _errors, registry
from gradserve.server._metrics import Metrics
from gradserve.server._servicer import ERROR_DOMAIN, GradientServicer
from gradserve.v1 import codec
from gradserve.v1 import gradserve_pb2 as pb


class Aborted(Exception):
    """What ``abort_with_status`` raises in grpc, here carrying the status."""


class Context:
    """A grpc.ServicerContext for one call: ``remaining_s`` left before the deadline, the caller there or gone."""

    def __init__(self, remaining_s: float | None = 30.0, active: bool = True) -> None:
        self.remaining_s = remaining_s
        self.active = active
        self.status: Any = None
        self.ended = False
        self.callbacks: list[Any] = []
        self.initial_metadata: Any = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", "req-1"),)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def peer_identities(self) -> None:
        return None

    def time_remaining(self) -> float | None:
        return self.remaining_s

    def is_active(self) -> bool:
        return self.active

    def add_callback(self, callback: Any) -> bool:
        """Like grpc: False once the call has already ended (here: ``ended`` set)."""
        self.callbacks.append(callback)
        return not self.ended

    def send_initial_metadata(self, metadata: Any) -> None:
        self.initial_metadata = metadata

    def abort_with_status(self, status: Any) -> None:
        self.status = status
        raise Aborted(status)


@pytest.fixture
def servicer() -> GradientServicer:
    runtime = Runtime(registry, "cpu", max_handles=4, handle_ttl_s=60)
    s = GradientServicer(max_tensor_bytes=1024, max_request_bytes=1 << 20)
    s.attach(runtime, Metrics(runtime))
    return s


def aborted(servicer: GradientServicer, method: str, request: Any, context: Context | None = None) -> tuple[Any, ...]:
    """(code, ErrorInfo reason, message, google.rpc.Status code) the call ended with."""
    context = context or Context()
    with pytest.raises(Aborted):
        getattr(servicer, method)(request, context)
    status = context.status
    (key, raw), *_ = status.trailing_metadata
    detail = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    assert key == "grpc-status-details-bin" and detail.details[0].Unpack(info) and info.domain == ERROR_DOMAIN
    assert detail.message == status.details
    return status.code, info.reason, status.details, detail.code


def requests(servicer: GradientServicer, function: str, method: str, code: str) -> float:
    value = servicer.metrics.registry.get_sample_value(
        "gradserve_requests_total", {"function": function, "method": method, "code": code}
    )
    return value or 0.0


def forward(name: str, *args: Any) -> pb.ForwardRequest:
    return pb.ForwardRequest(function=name, args=[codec.encode_value(a) for a in args])


def test_unknown_function_is_not_found_with_the_served_names(servicer: GradientServicer) -> None:
    known = ", ".join(f.name for f in registry)
    assert aborted(servicer, "Forward", forward("nope", torch.ones(1))) == (
        grpc.StatusCode.NOT_FOUND,
        "FUNCTION_NOT_FOUND",
        f"no function named 'nope'; this server serves: {known}",
        5,
    )
    assert requests(servicer, "", "Forward", "NOT_FOUND") == 1  # an unknown name is no label value


def test_malformed_tensor_is_invalid_argument_with_the_codecs_message(servicer: GradientServicer) -> None:
    bad = pb.ForwardRequest(function="square", args=[pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"\0"))])
    code, reason, message, number = aborted(servicer, "Forward", bad)
    assert (code, reason, number) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", 3)
    assert message == "square argument 0: float32 tensor of shape [2] needs 8 bytes of data, got 1"
    assert requests(servicer, "square", "Forward", "INVALID_ARGUMENT") == 1


def test_tensor_over_int64_is_resource_exhausted_tensor_too_large(servicer: GradientServicer) -> None:
    huge = pb.ForwardRequest(function="square", args=[pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**40, 2**40]))])
    code, reason, message, number = aborted(servicer, "Forward", huge)
    assert (code, reason, number) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TENSOR_TOO_LARGE", 8)
    assert message.endswith("has 1208925819614629174706176 elements, over the int64 limit")


def test_unexpected_errors_are_internal_with_only_the_request_id(
    servicer: GradientServicer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("secret detail")

    monkeypatch.setattr(servicer.runtime, "forward", broken)
    assert aborted(servicer, "Forward", forward("square", torch.ones(1))) == (
        grpc.StatusCode.INTERNAL,
        "INTERNAL",
        "internal server error (request id req-1; details in the server log)",
        13,
    )
    assert requests(servicer, "square", "Forward", "INTERNAL") == 1


@pytest.mark.parametrize(
    ("remaining_s", "code"),
    [
        (0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
        (-1.0, grpc.StatusCode.DEADLINE_EXCEEDED),
        (0.5, grpc.StatusCode.CANCELLED),
        (None, grpc.StatusCode.CANCELLED),
    ],
)
def test_abandoned_work_is_deadline_exceeded_once_the_deadline_passed(
    servicer: GradientServicer, remaining_s: float | None, code: grpc.StatusCode
) -> None:
    gone = Context(remaining_s=remaining_s, active=False)
    got, reason, message, number = aborted(servicer, "Forward", forward("square", torch.ones(1)), gone)
    assert (got, reason, number) == (code, "ABANDONED", code.value[0])
    assert "caller gone" in message
    assert requests(servicer, "square", "Forward", code.name) == 1  # metrics and logs show the rewritten code


def test_unavailable_function_is_failed_precondition_and_long_messages_are_cut(servicer: GradientServicer) -> None:
    prefix = "square is not served: "
    servicer.runtime.unavailable["square"] = "x" * (2000 - len(prefix))
    assert aborted(servicer, "Forward", forward("square", torch.ones(1)))[:3] == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "FUNCTION_UNAVAILABLE",
        prefix + "x" * (2000 - len(prefix)),
    )
    servicer.runtime.unavailable["square"] = "x" * (2001 - len(prefix))
    message = aborted(servicer, "Forward", forward("square", torch.ones(1)))[2]
    assert message == prefix + "x" * (2000 - len(prefix)) + " [...]"


def test_a_server_still_loading_is_unavailable() -> None:
    loading = GradientServicer()
    assert aborted(loading, "Forward", forward("square", torch.ones(1))) == (
        grpc.StatusCode.UNAVAILABLE,
        "LOADING",
        "server is starting: functions are still loading; retry shortly",
        14,
    )
    assert aborted(loading, "ListFunctions", pb.ListFunctionsRequest())[1] == "LOADING"


def test_a_good_call_is_counted_once_as_ok_with_its_bytes(servicer: GradientServicer) -> None:
    request = forward("square", torch.tensor([3.0]))
    raw = servicer.Forward(request, Context())  # unary replies leave the servicer serialised (once)
    reply = pb.ForwardResponse.FromString(raw)
    assert codec.decode_tensor(reply.outputs[0]).tolist() == [9.0]
    assert requests(servicer, "square", "Forward", "OK") == 1
    sample = servicer.metrics.registry.get_sample_value
    assert sample("gradserve_request_bytes_total", {"method": "Forward"}) == request.ByteSize()
    assert sample("gradserve_response_bytes_total", {"method": "Forward"}) == len(raw) == reply.ByteSize()
    assert sample("gradserve_calls_in_flight") == 0


def streamed_square(x: float) -> list[pb.StreamRequest]:
    header = pb.ForwardRequest(function="square", args=[pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1]))])
    return [pb.StreamRequest(forward=header), pb.StreamRequest(data=torch.tensor([x]).numpy().tobytes())]


def test_a_streamed_call_is_counted_ok_when_its_reply_went_out(servicer: GradientServicer) -> None:
    context = Context()
    replies = list(servicer.StreamCall(iter(streamed_square(3.0)), context))
    assert context.initial_metadata == (("gradserve-accepted", "1"),)
    header, framed = replies  # data chunks leave as raw StreamResponse bytes (streaming.data_message)
    data = pb.StreamResponse.FromString(bytes(framed))
    payload = torch.frombuffer(bytearray(data.data), dtype=torch.uint8)
    out = codec.decode_tensor(header.forward.outputs[0], payloads=iter([payload]))
    assert out.tolist() == [9.0]
    assert requests(servicer, "square", "StreamCall", "OK") == 0  # counted when gRPC ends the call
    (ended,) = context.callbacks
    ended()
    assert requests(servicer, "square", "StreamCall", "OK") == 1


@pytest.mark.parametrize(
    ("remaining_s", "code"),
    [(0.0, "DEADLINE_EXCEEDED"), (-0.5, "DEADLINE_EXCEEDED"), (0.5, "CANCELLED"), (2.0, "CANCELLED"), (None, "CANCELLED")],
)
def test_a_caller_gone_before_the_streamed_reply_is_counted_with_the_reason(
    servicer: GradientServicer, remaining_s: float | None, code: str
) -> None:
    context = Context(remaining_s=remaining_s)
    context.ended = True  # the call ended while the work ran: gRPC takes no callback any more
    servicer.StreamCall(iter(streamed_square(3.0)), context)
    assert requests(servicer, "square", "StreamCall", code) == 1
    assert servicer.metrics.registry.get_sample_value("gradserve_calls_in_flight") == 0


class Ticks:
    """The servicer's ``time`` module with a ``perf_counter`` that moves 1.25 s at every reading."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        self.now += 1.25
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_each_call_logs_one_record_with_its_fields(
    servicer: GradientServicer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gradserve.server._servicer.time", Ticks())
    with caplog.at_level(logging.INFO, logger="gradserve.calls"):
        servicer.Forward(forward("square", torch.tensor([2.0])), Context())
    (record,) = [r for r in caplog.records if r.name == "gradserve.calls"]
    duration_s = servicer.metrics.registry.get_sample_value(
        "gradserve_request_duration_seconds_sum", {"function": "square", "method": "Forward"}
    )
    assert duration_s > 0 and duration_s % 1.25 == 0  # whole ticks: the clock read at the start and at the end
    fields = {k: getattr(record, k) for k in ("request_id", "method", "function", "code", "duration_ms", "peer")}
    assert fields == {
        "request_id": "req-1",
        "method": "Forward",
        "function": "square",
        "code": "OK",
        "duration_ms": round(1e3 * duration_s, 3),
        "peer": "ipv4:127.0.0.1:1",
    }


def test_a_call_is_counted_once_even_if_its_end_is_reported_twice(servicer: GradientServicer) -> None:
    context = Context()
    list(servicer.StreamCall(iter(streamed_square(1.0)), context))
    (ended,) = context.callbacks
    ended()
    ended()
    assert requests(servicer, "square", "StreamCall", "OK") == 1


ERRORS = [
    ("FunctionNotFound", "NOT_FOUND", "FUNCTION_NOT_FOUND"),
    ("HandleNotFound", "NOT_FOUND", "HANDLE_NOT_FOUND"),
    ("InvalidArgument", "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
    ("ResourceExhausted", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"),
    ("FunctionError", "FAILED_PRECONDITION", "FUNCTION_ERROR"),
    ("FunctionUnavailable", "FAILED_PRECONDITION", "FUNCTION_UNAVAILABLE"),
    ("NonFinite", "FAILED_PRECONDITION", "NON_FINITE"),
    ("Abandoned", "CANCELLED", "ABANDONED"),
    ("VersionMismatch", "FAILED_PRECONDITION", "VERSION_MISMATCH"),
    ("DoubleBackwardUnsupported", "FAILED_PRECONDITION", "DOUBLE_BACKWARD_UNSUPPORTED"),
    ("RngMismatch", "FAILED_PRECONDITION", "RNG_MISMATCH"),
]


@pytest.mark.parametrize(("error", "code", "reason"), ERRORS)
def test_every_domain_error_has_its_status_code_and_reason(
    servicer: GradientServicer, monkeypatch: pytest.MonkeyPatch, error: str, code: str, reason: str
) -> None:
    def raising(*args: Any, **kwargs: Any) -> None:
        raise getattr(_errors, error)(f"{error} happened")

    monkeypatch.setattr(servicer.runtime, "forward", raising)
    assert aborted(servicer, "Forward", forward("square", torch.ones(1)))[:3] == (
        grpc.StatusCode[code],
        reason,
        f"{error} happened",
    )
    assert sorted(_errors.__all__) == sorted(["GradServeServerError", *(name for name, _, _ in ERRORS)])


class Stopwatch:
    """The servicer's ``time`` module with a ``perf_counter`` at 100 s at its first reading and 100.0123456789 s after."""

    def __init__(self) -> None:
        self.readings = 0

    def perf_counter(self) -> float:
        self.readings += 1
        return 100.0 if self.readings == 1 else 100.0123456789

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_a_calls_duration_is_its_end_minus_its_start_logged_to_the_microsecond(
    servicer: GradientServicer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gradserve.server._servicer.time", Stopwatch())
    with caplog.at_level(logging.INFO, logger="gradserve.calls"):
        servicer.Forward(forward("square", torch.tensor([2.0])), Context())
    (record,) = [r for r in caplog.records if r.name == "gradserve.calls"]
    duration_s = servicer.metrics.registry.get_sample_value(
        "gradserve_request_duration_seconds_sum", {"function": "square", "method": "Forward"}
    )
    assert duration_s == 100.0123456789 - 100.0
    assert record.duration_ms == 12.346
