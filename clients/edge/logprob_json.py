"""Log-probabilities as JSON can carry them.

A model may give a token a -inf logit (a masked token) or a NaN one, and a log-probability
computed from it is then -inf or NaN: JSON has no such numbers (Python's encoder writes
`-Infinity` and `NaN`, which standard decoders refuse, and a whole response holding one fails
to encode). The server reports finite values; the edge also serves servers that do not, so
it makes them finite once more, as vLLM's OpenAI server does: never below LOGPROB_FLOOR, and
alternatives without probability left out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from tokenwire.client.messages import TopLogprob

LOGPROB_FLOOR = -9999.0
"""The lowest log-probability reported: that of a token without probability (vLLM's floor)."""


def finite_logprob(logprob: float) -> float:
    """The log-probability to report: -inf and NaN (no probability known) as LOGPROB_FLOOR,
    +inf as 0 (a probability is at most 1), a finite one as it is, floored."""
    if math.isnan(logprob):
        return LOGPROB_FLOOR
    if logprob == math.inf:
        return 0.0
    return max(logprob, LOGPROB_FLOOR)


def listed_alternatives(alternatives: Iterable[TopLogprob]) -> list[TopLogprob]:
    """The alternatives worth listing: those with some probability (a -inf or NaN
    log-probability is none), each with a finite log-probability."""
    return [
        dataclasses.replace(a, logprob=finite_logprob(a.logprob))
        for a in alternatives
        if a.logprob > -math.inf
    ]
