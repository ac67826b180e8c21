"""Python client, CLI and edge adapters for tokenwire. Depends on the wire contract only."""

from clients.client import (
    AsyncTokenwireClient,
    Completion,
    GenerateOptions,
    ModelInfo,
    StreamEvent,
    Token,
    TokenwireClient,
    Usage,
)
from clients.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    Overloaded,
    ServerError,
    TokenwireError,
    Unavailable,
)

__all__ = [
    "AsyncTokenwireClient",
    "Cancelled",
    "Completion",
    "DeadlineExceeded",
    "GenerateOptions",
    "InvalidArgument",
    "ModelInfo",
    "Overloaded",
    "ServerError",
    "StreamEvent",
    "Token",
    "TokenwireClient",
    "TokenwireError",
    "Unavailable",
    "Usage",
]
