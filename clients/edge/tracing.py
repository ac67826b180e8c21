"""The edge's traces: one server span per API request, continued by the server over gRPC.

A W3C `traceparent` header makes the request's span a child of the caller's; without one the
trace starts here. The span is current while the request (and its event stream) runs, so the
upstream Generate call carries its traceparent as gRPC metadata and the server's spans join the
same trace; its trace and span ids are bound into the request's log lines.

The provider set-up is the server's too (`tokenwire.common.tracing`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import structlog
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.datastructures import Headers
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenwire.common.tracing import ProcessTracing

SERVICE_NAME = "tokenwire-edge"
TRACED_PREFIX = "/v1/"
"""API routes only: health probes, metrics scrapes and the page's files make no spans."""
_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/generate": "text_completion",
}
_W3C = TraceContextTextMapPropagator()


@dataclasses.dataclass(frozen=True, slots=True)
class Tracing(ProcessTracing):
    """The edge's own tracer provider and exporter."""

    service: ClassVar[str] = SERVICE_NAME
    scope: ClassVar[str] = "tokenwire.edge"


def upstream_metadata() -> tuple[tuple[str, str], ...]:
    """The current span's traceparent (and tracestate), for the server to continue the trace."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return tuple(carrier.items())


class TracingMiddleware:
    """A SERVER span around each API request, current until its response (stream) ends.

    An answer of 400 or more ends the span with status ERROR: a refused generation is what an
    operator looks for (the HTTP conventions would leave 4xx unset on server spans)."""

    def __init__(self, app: ASGIApp, tracer: trace.Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(TRACED_PREFIX):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        attributes = {"http.request.method": method, "url.path": path}
        if operation := _OPERATIONS.get(path):
            attributes["gen_ai.operation.name"] = operation
        with self.tracer.start_as_current_span(
            method,  # renamed `{method} {route}` once routing has found the route
            context=_W3C.extract(Headers(scope=scope)),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    _answered(span, int(message["status"]))
                await send(message)

            ids = span.get_span_context()
            with structlog.contextvars.bound_contextvars(
                trace_id=f"{ids.trace_id:032x}", span_id=f"{ids.span_id:016x}"
            ):
                try:
                    await self.app(scope, receive, send_traced)
                finally:
                    _name_route(span, method, scope.get("route"))


def _answered(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))


def _name_route(span: trace.Span, method: str, route: object) -> None:
    """The route's template (bounded: no request ids), as the HTTP conventions name spans."""
    template = getattr(route, "path", None) if isinstance(route, BaseRoute) else None
    if isinstance(template, str):
        span.set_attribute("http.route", template)
        span.update_name(f"{method} {template}")


def stream_failed(outcome: str) -> None:
    """An event stream that had answered 200 ended with an in-band error event."""
    span = trace.get_current_span()
    span.set_attribute("error.type", outcome)
    span.set_status(Status(StatusCode.ERROR, outcome))
