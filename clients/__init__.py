"""Python client, CLI and edge adapters for tokenwire. Depends on the wire contract only."""

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
