"""Python client, CLI and edge adapters for tokenwire. Depends on the wire contract only.

The names below are loaded when first used, so that a module of the package (the `tokenwire`
command's dispatcher among them) starts without loading gRPC first."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenwire.client.client import AsyncTokenwireClient, TokenwireClient
    from tokenwire.client.errors import (
        Cancelled,
        DeadlineExceeded,
        InvalidArgument,
        ModelMismatch,
        Overloaded,
        RequestTooLarge,
        ServerError,
        TokenwireError,
        Unauthenticated,
        Unavailable,
    )
    from tokenwire.client.messages import (
        Completion,
        GenerateOptions,
        ModelInfo,
        StreamEvent,
        Token,
        Tokenization,
        Usage,
    )
    from tokenwire.client.security import ChannelSecurity, SecurityError

# Installed as tokenwire.client (see clients/pyproject.toml). Imported by its folder name (from the
# repository root, say, where Python puts the working directory on sys.path), each module
# would load a second time beside the installed one, so that name is refused.
if __name__ != "tokenwire.client":
    raise ImportError(f"import tokenwire.client, not {__name__}")

_MODULES = {
    "client": ("AsyncTokenwireClient", "TokenwireClient"),
    "errors": (
        "Cancelled",
        "DeadlineExceeded",
        "InvalidArgument",
        "ModelMismatch",
        "Overloaded",
        "RequestTooLarge",
        "ServerError",
        "TokenwireError",
        "Unauthenticated",
        "Unavailable",
    ),
    "messages": (
        "Completion",
        "GenerateOptions",
        "ModelInfo",
        "StreamEvent",
        "Token",
        "Tokenization",
        "Usage",
    ),
    "security": ("ChannelSecurity", "SecurityError"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> object:
    """An exported name, from its module (loaded then); AttributeError for any other."""
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "AsyncTokenwireClient",
    "Cancelled",
    "ChannelSecurity",
    "Completion",
    "DeadlineExceeded",
    "GenerateOptions",
    "InvalidArgument",
    "ModelInfo",
    "ModelMismatch",
    "Overloaded",
    "RequestTooLarge",
    "SecurityError",
    "ServerError",
    "StreamEvent",
    "Token",
    "Tokenization",
    "TokenwireClient",
    "TokenwireError",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
