"""Histogram bounds, in seconds, that the server's and the edge's metrics share."""

from __future__ import annotations

TTFT_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0),
)
"""Time to first token (and the server's queue time), up to the request duration's top
bucket: a request queued behind full batches waits for whole generations (tens of seconds on a
CPU with the defaults), and histogram_quantile reports the highest finite bound for anything
past it."""
