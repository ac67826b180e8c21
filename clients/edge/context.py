"""What every edge route needs: settings, the upstream, the stream registry, metrics."""

from __future__ import annotations

import dataclasses
import uuid

from starlette.requests import Request

from clients.edge.errors import EdgeError
from clients.edge.metrics import EdgeMetrics
from clients.edge.resumable import ResumableStreams
from clients.edge.settings import EdgeSettings
from clients.edge.upstream import Upstream

MAX_REQUEST_ID = 128


@dataclasses.dataclass
class EdgeContext:
    settings: EdgeSettings
    upstream: Upstream
    streams: ResumableStreams
    metrics: EdgeMetrics

    @staticmethod
    def of(request: Request) -> EdgeContext:
        ctx = request.app.state.ctx
        assert isinstance(ctx, EdgeContext)
        return ctx

    def outcome(self, route: str, outcome: str) -> None:
        self.metrics.streams.labels(route=route, outcome=outcome).inc()

    def observe_ttft(self, route: str, seconds: float) -> None:
        self.metrics.ttft.labels(route=route).observe(seconds)


def request_id_of(request: Request, field: str = "") -> str:
    """X-Request-ID header, else the body's request_id, else a new one."""
    request_id = request.headers.get("x-request-id") or field or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable() or ":" in request_id:
        raise EdgeError.invalid(
            "request_id", f"must be at most {MAX_REQUEST_ID} printable characters without ':'"
        )
    return request_id
