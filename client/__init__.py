"""gradserve client SDK: call PyTorch custom autograd Functions that run on a gradserve server.

Example::

    import torch
    from gradserve.client import GradientClient

    with GradientClient("127.0.0.1:50051", timeout=10) as client:
        x = torch.tensor(1.0, requires_grad=True)
        y = client.function("square")(x)   # a differentiable step of your graph
        y.backward()
        print(y.item(), x.grad.item())     # 1.0 2.0
"""

from ._aio import AsyncGradientClient
from ._client import GradientClient
from ._errors import (
    ArgumentError,
    CancelledError,
    DeadlineExceededError,
    FunctionFailedError,
    FunctionNotFoundError,
    GradServeError,
    HandleNotFoundError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from ._messages import ForwardBackwardResult, FunctionInfo

__all__ = [
    "ArgumentError",
    "AsyncGradientClient",
    "CancelledError",
    "DeadlineExceededError",
    "ForwardBackwardResult",
    "FunctionFailedError",
    "FunctionInfo",
    "FunctionNotFoundError",
    "GradServeError",
    "GradientClient",
    "HandleNotFoundError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
]
