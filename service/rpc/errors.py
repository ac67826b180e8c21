"""The one exception boundary: domain errors become distinct gRPC statuses with rich details."""

from __future__ import annotations

import math
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tokenwire.server.domain import InvalidRequest, Overloaded, TokenwireError, Unavailable

RETRY_AFTER_MS = "retry-after-ms"

log = structlog.get_logger("tokenwire.rpc")


def to_status(exc: BaseException) -> grpc.Status:
    """The status a caller sees for exc; INTERNAL only for what is not a known failure."""
    if isinstance(exc, InvalidRequest):
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=str(exc))
            ]
        )
        return _status(code_pb2.INVALID_ARGUMENT, str(exc), detail)
    if isinstance(exc, Overloaded):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after_s * 1e9))
        status = _status(
            code_pb2.RESOURCE_EXHAUSTED, str(exc), error_details_pb2.RetryInfo(retry_delay=delay)
        )
        hint = ((RETRY_AFTER_MS, str(math.ceil(exc.retry_after_s * 1000))),)
        return _with_metadata(status, hint)
    if isinstance(exc, Unavailable):
        return _status(code_pb2.UNAVAILABLE, str(exc))
    if isinstance(exc, TokenwireError):  # EngineStopped and any other domain failure
        return _status(code_pb2.INTERNAL, str(exc))
    return _status(code_pb2.INTERNAL, f"internal error: {type(exc).__name__}")


def _status(code: int, message: str, detail: object | None = None) -> grpc.Status:
    status = status_pb2.Status(code=code, message=message)
    if detail is not None:
        packed = any_pb2.Any()
        packed.Pack(detail)  # type: ignore[arg-type]
        status.details.append(packed)
    return rpc_status.to_status(status)  # type: ignore[no-any-return]


def _with_metadata(status: grpc.Status, extra: tuple[tuple[str, str], ...]) -> grpc.Status:
    return _Status(status.code, status.details, tuple(status.trailing_metadata) + extra)


class _Status(grpc.Status):
    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...],
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    """End the RPC with exc's status. Raises, as context.abort does."""
    status = to_status(exc)
    await context.abort(status.code, status.details, status.trailing_metadata)


def log_rejected(exc: TokenwireError, **fields: object) -> None:
    """One line per refused request (with `fields`, such as the peer where no request's
    context carries it); names the field and the rule, never the caller's value."""
    if isinstance(exc, InvalidRequest):
        fields.update(field=exc.field, reason=exc.reason)
    else:
        fields.update(reason=str(exc))
    log.info("request.rejected", code=type(exc).__name__, **fields)


def without_value(exc: TokenwireError) -> str:
    """What a refusal says for logs and traces: the field and the rule, never the caller's
    value (the caller's own status quotes it)."""
    return f"{exc.field}: {exc.reason}" if isinstance(exc, InvalidRequest) else str(exc)
