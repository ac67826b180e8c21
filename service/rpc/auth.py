"""Optional bearer-key authentication: who is calling, and refusing callers without a key.

A caller's principal is a non-secret label of the key it presented (a short hash), so logs
and stream ownership can name it without revealing the key. With no keys configured every
caller is the same anonymous principal and nothing is refused.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeAlias

import grpc

ANONYMOUS = ""
UNAUTHENTICATED_MESSAGE = "missing or invalid API key (send `authorization: Bearer <key>`)"
# Kubernetes' gRPC probes cannot send headers, and health says nothing a caller could abuse.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)

Metadata = Iterable[tuple[str, str | bytes]]


def key_label(key: str) -> str:
    """A short, stable, non-secret name for a key (48 bits of its SHA-256)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


class ApiKeys:
    """The configured keys; turns request metadata into a principal label."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [(key.encode(), key_label(key)) for key in dict.fromkeys(keys)]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def principal(self, metadata: Metadata | None) -> str | None:
        """The caller's label; ANONYMOUS when auth is off; None for a missing or wrong key."""
        if not self._keys:
            return ANONYMOUS
        presented = _bearer(metadata or ())
        if presented is None:
            return None
        found: str | None = None
        for key, label in self._keys:
            # Compare against every key, each in constant time, so timing reveals nothing.
            if hmac.compare_digest(presented, key):
                found = label
        return found


def _bearer(metadata: Metadata) -> bytes | None:
    for name, value in metadata:
        if name != "authorization":
            continue
        raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
        scheme, _, token = raw.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    return None


# Quoted: the grpc classes are generic only in their type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable["Handler | None"]]


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks with UNAUTHENTICATED unless a configured key is sent.

    `on_refused` hears of each refused call by its method name (the servicer never sees them).
    """

    def __init__(self, keys: ApiKeys, on_refused: Callable[[str], None] | None = None) -> None:
        self._keys = keys
        self._on_refused = on_refused

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method: str = handler_call_details.method
        metadata: Metadata = handler_call_details.invocation_metadata
        if method.startswith(OPEN_METHOD_PREFIXES) or self._keys.principal(metadata) is not None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if self._on_refused is not None:
            self._on_refused(method)
        # A method the server lacks is refused alike: without a key, which methods exist (or
        # which reflection versions) is not told either.
        return _refusing(handler) if handler is not None else _REFUSING_ANY


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


_REFUSING_ANY: Handler = grpc.stream_stream_rpc_method_handler(_refuse)
"""Answers UNAUTHENTICATED to a call of any shape without reading a request."""


def _refusing(handler: Handler) -> Handler:
    """A handler of the same shape that answers UNAUTHENTICATED without parsing the request."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse)
    return grpc.unary_unary_rpc_method_handler(_refuse)
