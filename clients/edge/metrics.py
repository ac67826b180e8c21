"""Edge metrics, exposed at /metrics on the edge itself."""

from __future__ import annotations

import enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenwire.common.buckets import TTFT_BUCKETS


class RouteName(enum.StrEnum):
    """The `route` label: which API a request speaks."""

    NATIVE = "native"
    COMPLETIONS = "completions"
    CHAT = "chat"


class Outcome(enum.StrEnum):
    """The `outcome` label."""

    COMPLETED = "completed"
    CLIENT_DISCONNECTED = "client_disconnected"
    RESUMED = "resumed"
    UPSTREAM_ERROR = "upstream_error"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline_exceeded"


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "tokenwire_edge_time_to_first_token_seconds",
            "Time from the HTTP request to the first token event written, as the client sees it.",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.streams = Counter(
            "tokenwire_edge_streams",
            "HTTP streams by route and outcome.",
            ["route", "outcome"],
            registry=r,
        )
        self.failovers = Counter(
            "tokenwire_edge_failovers",
            "Streams that went on on another server after theirs broke, by route.",
            ["route"],
            registry=r,
        )
        self.active = Gauge("tokenwire_edge_active_streams", "HTTP streams open now.", registry=r)
        self.buffer_bytes = Gauge(
            "tokenwire_edge_resume_buffer_bytes", "Bytes held in resume buffers.", registry=r
        )
        for route in RouteName:
            self.failovers.labels(route=route)
            for outcome in Outcome:
                self.streams.labels(route=route, outcome=outcome)
