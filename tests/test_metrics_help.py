"""The help text Prometheus shows for a server metric says what its value measures."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokenwire.server.telemetry.metrics import ServerMetrics


def test_the_kv_cache_gauge_help_names_both_measures() -> None:
    """tokenwire_kv_cache_usage_ratio's help names the token budget (max_kv_tokens) and, for a
    preallocated cache, the share of its rows taken, as docs/observability.md does."""
    text = generate_latest(ServerMetrics().registry).decode()
    [family] = [
        family
        for family in text_string_to_metric_families(text)
        if family.name == "tokenwire_kv_cache_usage_ratio"
    ]
    assert "max_kv_tokens" in family.documentation
    assert "preallocated cache" in family.documentation
    assert "rows taken" in family.documentation
