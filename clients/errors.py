"""Client-side exceptions, one per gRPC status a caller should handle differently."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

# Where a server puts its google.rpc.Status (grpc_status's GRPC_DETAILS_METADATA_KEY).
DETAILS_KEY = "grpc-status-details-bin"
Trailers = Iterable[Any]
"""A call's trailing metadata: (key, value) pairs (grpc's sync and aio types for it differ)."""


class TokenwireError(Exception):
    """A Generate/GetModelInfo/Cancel call failed. `code` is the gRPC status."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field: str | None = None,
        retry_after_s: float | None = None,
        from_channel: bool = False,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s
        self.from_channel = from_channel
        """The status came from this side's channel (no server sent it: a connection, TLS or
        name resolution failure), so its message speaks of addresses, not of the request."""


class InvalidArgument(TokenwireError):
    """A request field is out of range; `field` names it."""


class RequestTooLarge(InvalidArgument):
    """The request is larger than the server's channel takes (gRPC's RESOURCE_EXHAUSTED for a
    message over its size limit, before the server reads it): no retry mends it. `field` is
    what grows the request: Generate's prompt, Tokenize's text, Detokenize's token_ids."""


class Overloaded(TokenwireError):
    """The server is at capacity; retry after `retry_after_s`."""


class Unavailable(TokenwireError):
    """The server is down, starting or draining."""


class ModelMismatch(Unavailable):
    """A broken stream could not continue: the next target serves another model than the one
    whose tokens the stream had delivered, so it ended rather than splice the two. The message
    names both; a new call (without the delivered tokens) may still succeed there."""


class Unauthenticated(TokenwireError):
    """The server requires an API key and none, or a wrong one, was sent."""


class DeadlineExceeded(TokenwireError):
    """The call's deadline passed."""


class Cancelled(TokenwireError):
    """The call was cancelled."""


class ServerError(TokenwireError):
    """Any other failure (INTERNAL, UNKNOWN, ...)."""


_BY_CODE: dict[grpc.StatusCode, type[TokenwireError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(error: grpc.RpcError, grows: str = "prompt") -> TokenwireError:
    """Translate a grpc error (sync or aio) into the matching TokenwireError; `grows` is the
    request's field a RequestTooLarge names."""
    return from_status(error.code(), str(error.details() or ""), error.trailing_metadata(), grows)


def from_status(
    code: grpc.StatusCode, message: str, trailers: Trailers | None, grows: str = "prompt"
) -> TokenwireError:
    """The TokenwireError of a call's final status: its code, message and trailing metadata
    (a call refused before its headers gives these without raising an RpcError); `grows` is
    the request's field a RequestTooLarge names."""
    field, retry_after = _rich_details(code, message, trailers or ())
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and TOO_LARGE in message:
        return RequestTooLarge(code, message, field=grows)
    cls = _BY_CODE.get(code, ServerError)
    # tokenwire's server sends every error with its google.rpc.Status in the trailers.
    channel = code in _CHANNEL_CODES and _rich_status(code, message, trailers or ()) is None
    if channel and UNHEALTHY in message:
        message = f"{NOT_SERVING}: {message}"
    return cls(code, message, field=field, retry_after_s=retry_after, from_channel=channel)


UNHEALTHY = "backend unhealthy"
"""What gRPC's channel says where its health check finds no target SERVING."""
NOT_SERVING = "no server reports SERVING on its health check (starting, draining or stopped)"

TOO_LARGE = "message larger than max"
"""What gRPC says of a message over its size limit, sent (`Sent message larger than max`) or
received (`Received message larger than max (N vs. M)`), with RESOURCE_EXHAUSTED."""

_CHANNEL_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
)
"""Codes a client's own channel reports (cannot connect, TLS failed, the stream broke)."""


def _rich_status(
    code: grpc.StatusCode, message: str, trailers: Trailers
) -> status_pb2.Status | None:
    """The google.rpc.Status in the trailers, when it agrees with the call's code and message
    (grpc_status.rpc_status.from_call's rule, read from the trailers themselves)."""
    for key, value in trailers:
        if key == DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            if status.code == code.value[0] and status.message == message:
                return status
            return None
    return None


def _rich_details(
    code: grpc.StatusCode, message: str, trailers: Trailers
) -> tuple[str | None, float | None]:
    field: str | None = None
    retry_after: float | None = None
    status = _rich_status(code, message, trailers)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            field = bad.field_violations[0].field if bad.field_violations else None
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after = info.retry_delay.ToNanoseconds() / 1e9
    return field, retry_after
