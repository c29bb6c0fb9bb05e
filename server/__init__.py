"""gradserve server: register PyTorch custom autograd Functions and serve them over gRPC.

Example::

    import torch
    from gradserve.server import register

    @register("square")
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad_output):
            (x,) = ctx.saved_tensors
            return 2 * x * grad_output

then ``gradserve serve --functions my_module``.
"""

from ._config import ServerConfig
from ._registry import RegisteredFunction, RegistrationError, Registry, load_modules, register, registry
from ._runtime import ForwardResult, Runtime, resolve_device
from ._server import RunningServer, create_server, serve

__all__ = [
    "ForwardResult",
    "RegisteredFunction",
    "RegistrationError",
    "Registry",
    "RunningServer",
    "Runtime",
    "ServerConfig",
    "create_server",
    "load_modules",
    "register",
    "registry",
    "resolve_device",
    "serve",
]
