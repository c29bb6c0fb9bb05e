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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names load on first use (PEP 562), so `gradserve health` in a container healthcheck
# starts without importing torch.
_EXPORTS = {
    "ServerConfig": "._config",
    "ForwardResult": "._runtime",
    "Runtime": "._runtime",
    "resolve_device": "._runtime",
    "RegisteredFunction": "._registry",
    "RegistrationError": "._registry",
    "Registry": "._registry",
    "load_modules": "._registry",
    "register": "._registry",
    "registry": "._registry",
    "RunningServer": "._server",
    "create_server": "._server",
    "serve": "._server",
}

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
assert sorted(_EXPORTS) == __all__

if TYPE_CHECKING:
    from ._config import ServerConfig
    from ._registry import RegisteredFunction, RegistrationError, Registry, load_modules, register, registry
    from ._runtime import ForwardResult, Runtime, resolve_device
    from ._server import RunningServer, create_server, serve


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
