"""One percentile rule (nearest rank) for the client's --stats, the server's log and bench."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tokenwire.client.cli import StreamStats
from tokenwire.common.stats import percentile
from tokenwire.server import telemetry


def test_percentile_is_nearest_rank() -> None:
    """p50 and p95 of 1..20 are 10 and 19, p100 is the maximum; no values give None."""
    values = [float(v) for v in range(20, 0, -1)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (10, 19, 20)
    assert percentile([], 50) is None


@pytest.mark.parametrize("q", [1, 50, 90, 95, 99, 100])
def test_bench_peers_rule_agrees(q: float) -> None:
    """numpy's inverted_cdf (what bench/peers.py uses in its own venv) gives the same values."""
    rng = random.Random(q)
    for size in (1, 2, 7, 20, 101):
        values = [rng.random() for _ in range(size)]
        assert percentile(values, q) == float(np.percentile(values, q, method="inverted_cdf"))


def test_client_stats_and_server_log_share_the_rule() -> None:
    """The server's log summary uses the shared function, and the client's --stats p95 of a
    known stream is its nearest-rank value."""
    stats = StreamStats()
    stats.started = 0.0
    stats.arrivals = [0.0, 0.010, 0.030, 0.060, 0.100]  # gaps 10, 20, 30, 40 ms
    assert telemetry.percentile is percentile
    assert "itl p50: 20.00 ms  p95: 40.00 ms" in stats.render(None, None)
