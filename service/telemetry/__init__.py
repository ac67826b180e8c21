"""Telemetry: structured logs and Prometheus metrics, fed by the engine's observer interface."""

from tokenwire.common.stats import percentile
from tokenwire.server.telemetry.logs import configure_logging, ms

__all__ = ["configure_logging", "ms", "percentile"]
