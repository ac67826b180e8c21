"""Logs: structlog configuration (JSON or console) and the helpers summary lines use."""

from __future__ import annotations

from tokenwire.common.logs import configure_logging

__all__ = ["configure_logging", "ms"]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
