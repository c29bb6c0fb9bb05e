"""Failed calls through a real server: status codes, ErrorInfo reasons, and messages a person can act on."""

from __future__ import annotations

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gradserve.client import (
    FunctionFailedError,
    FunctionNotFoundError,
    GradientClient,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

from .conftest import Endpoint


def _raw_error(endpoint: Endpoint, method: str, request: object) -> tuple[grpc.StatusCode, str, str]:
    """Call ``method`` with the raw stub; return (code, message, ErrorInfo reason)."""
    channel = endpoint.channel()
    try:
        with pytest.raises(grpc.RpcError) as info:
            getattr(pb_grpc.GradientServiceStub(channel), method)(request, timeout=30)
        error = info.value
        reason = ""
        status = rpc_status.from_call(error)
        for detail in status.details if status else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                error_info = error_details_pb2.ErrorInfo()
                detail.Unpack(error_info)
                reason = error_info.reason
        return error.code(), error.details() or "", reason
    finally:
        channel.close()


def test_unknown_function_is_not_found(client: GradientClient) -> None:
    with pytest.raises(FunctionNotFoundError) as info:
        client.forward_backward("no_such_function", torch.tensor(1.0, requires_grad=True))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.reason == "FUNCTION_NOT_FOUND"
    assert "no_such_function" in info.value.message


def test_unknown_handle_is_not_found_with_its_own_reason(endpoint: Endpoint) -> None:
    request = pb.BackwardRequest(function="square", handle="no-such-handle")
    code, _, reason = _raw_error(endpoint, "Backward", request)
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "HANDLE_NOT_FOUND")


def test_wrong_argument_count_is_invalid_argument(client: GradientClient) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.forward("cube_plus_square", torch.tensor(2.0))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "cube_plus_square" in info.value.message


def test_byte_count_not_matching_the_shape_is_invalid_argument(endpoint: Endpoint) -> None:
    bad = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], data=b"\x00" * 8)  # 3 float32 need 12 bytes
    code, message, reason = _raw_error(endpoint, "Forward", pb.ForwardRequest(function="square", args=[pb.Value(tensor=bad)]))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert message == "square argument 0: float32 tensor of shape [3] needs 12 bytes of data, got 8"


def test_grad_outputs_of_the_wrong_shape_are_invalid_argument(client: GradientClient) -> None:
    with pytest.raises(InvalidArgumentError):
        client.forward_backward("square", torch.ones(3, requires_grad=True), grad_outputs=torch.ones(4))


def test_a_function_that_raises_is_failed_precondition_naming_it(client: GradientClient) -> None:
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(2, 5, requires_grad=True)  # 3 != 5
    with pytest.raises(FunctionFailedError) as info:
        client.forward_backward("linear", x, w, None)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "linear" in info.value.message


def test_the_server_keeps_serving_after_errors(client: GradientClient) -> None:
    result = client.forward_backward("square", torch.tensor(3.0, requires_grad=True))
    assert (result.outputs.item(), result.grads[0].item()) == (9.0, 6.0)


def test_tokens_are_enforced_when_the_server_has_them(endpoint: Endpoint) -> None:
    if not endpoint.token:  # plaintext run: the server has no tokens, so none is needed
        with endpoint.client(token="") as anonymous:
            assert "square" in {f.name for f in anonymous.list_functions()}
        return
    with endpoint.client(token="") as anonymous, pytest.raises(UnauthenticatedError) as missing:
        anonymous.list_functions()
    assert missing.value.code == grpc.StatusCode.UNAUTHENTICATED
    with endpoint.client(token="not-the-token") as wrong, pytest.raises(PermissionDeniedError) as denied:
        wrong.forward("square", torch.tensor(1.0))
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
