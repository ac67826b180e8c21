"""Summary statistics shared by the client CLI's --stats, the server's log summary and bench."""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it.

    None for no values. Always one of the values (no interpolation), so p100 is the maximum and
    p0 the minimum.
    """
    ordered = sorted(values)
    if not ordered:
        return None
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]
