"""Histogram buckets cover the latencies a loaded server sees: no long wait or fast token
falls outside every finite bucket, where histogram_quantile could only report a bound."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry

from tokenwire.edge.metrics import EdgeMetrics, RouteName
from tokenwire.server.domain import FinishReason
from tokenwire.server.engine.observer import RequestRecord
from tokenwire.server.telemetry.metrics import ServerMetrics


def _record(
    *, scheduled_at: float, first_token_at: float, token_times: tuple[float, ...] = ()
) -> RequestRecord:
    """A request that arrived at 0 s and finished a second after its last token."""
    times = token_times or (first_token_at,)
    return RequestRecord(
        request_id="r",
        prompt_tokens=1,
        completion_tokens=len(times),
        arrived_at=0.0,
        scheduled_at=scheduled_at,
        first_token_at=first_token_at,
        finished_at=times[-1] + 1.0,
        token_times=times,
        finish_reason=FinishReason.LENGTH,
    )


def _buckets(registry: CollectorRegistry, name: str, **labels: str) -> dict[float, float]:
    """Cumulative count by upper bound (+Inf included) of histogram `name`."""
    return {
        float(s.labels["le"]): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items())
    }


def _top_finite(buckets: dict[float, float]) -> float:
    return buckets[max(le for le in buckets if not math.isinf(le))]


def test_a_30_second_time_to_first_token_lands_in_a_finite_bucket() -> None:
    """A first token 30 s after arrival is counted below +Inf in the TTFT histogram."""
    metrics = ServerMetrics()
    metrics.request_finished(_record(scheduled_at=29.0, first_token_at=30.0))
    assert _top_finite(_buckets(metrics.registry, "tokenwire_time_to_first_token_seconds")) == 1


def test_a_30_second_queue_time_lands_in_a_finite_bucket() -> None:
    """A request whose prefill starts 30 s after arrival is counted below +Inf in queue time."""
    metrics = ServerMetrics()
    metrics.request_finished(_record(scheduled_at=30.0, first_token_at=31.0))
    assert _top_finite(_buckets(metrics.registry, "tokenwire_request_queue_seconds")) == 1


def test_time_to_first_token_buckets_reach_the_request_duration_buckets() -> None:
    """A TTFT as long as the longest request duration measured is still in a finite bucket."""
    metrics = ServerMetrics()
    duration = _buckets(metrics.registry, "tokenwire_request_duration_seconds")
    longest = max(le for le in duration if not math.isinf(le))
    metrics.request_finished(_record(scheduled_at=0.0, first_token_at=longest))
    assert _top_finite(_buckets(metrics.registry, "tokenwire_time_to_first_token_seconds")) == 1


def test_a_30_second_edge_time_to_first_token_lands_in_a_finite_bucket() -> None:
    """A client who waits 30 s for the first token is counted below +Inf at the edge."""
    metrics = EdgeMetrics()
    metrics.ttft.labels(route=RouteName.CHAT).observe(30.0)
    buckets = _buckets(metrics.registry, "tokenwire_edge_time_to_first_token_seconds", route="chat")
    assert _top_finite(buckets) == 1


def test_a_sub_millisecond_inter_token_gap_lands_in_a_bucket_below_1_ms() -> None:
    """A 0.2 ms gap between tokens is counted in a bucket whose bound is under a millisecond."""
    metrics = ServerMetrics()
    metrics.request_finished(
        _record(scheduled_at=0.0, first_token_at=1.0, token_times=(1.0, 1.0002))
    )
    buckets = _buckets(metrics.registry, "tokenwire_inter_token_latency_seconds")
    assert any(count == 1 for le, count in buckets.items() if le < 0.001)
