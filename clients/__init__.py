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
    Unauthenticated,
    Unavailable,
)
from clients.security import ChannelSecurity, SecurityError

__all__ = [
    "AsyncTokenwireClient",
    "Cancelled",
    "ChannelSecurity",
    "Completion",
    "DeadlineExceeded",
    "GenerateOptions",
    "InvalidArgument",
    "ModelInfo",
    "Overloaded",
    "SecurityError",
    "ServerError",
    "StreamEvent",
    "Token",
    "TokenwireClient",
    "TokenwireError",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
