"""Token choice per request: repetition penalty, temperature, top-k, top-p, seeded RNG.

A token's random draw depends only on the request's seed and the token's index: a seeded
request samples the same tokens whatever else runs in its batch, and a generation continued
from its first k tokens (on this replica or another) draws exactly what it would have drawn.
Scores are float64 and sanitised before exponentiation: no parameter the API accepts (a tiny
repetition penalty, a tiny temperature) can turn them into NaN probabilities.
"""

from __future__ import annotations

import secrets

import numpy as np
import numpy.typing as npt

from tokenwire.server.domain import SamplingParams

Logits = npt.NDArray[np.float32]


def log_softmax_at(logits: Logits, token_id: int) -> float:
    """Natural-log probability of token_id under the unmodified distribution."""
    peak = float(logits.max())
    total = float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    return float(logits[token_id]) - peak - total


class Sampler:
    """Chooses the next token for one request."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        # Unseeded requests get a seed too, so that every stream can be continued exactly.
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(63)

    def choose(self, logits: Logits, history: list[int], index: int) -> int:
        """The token at position `index` of the generation (0 = the first generated token)."""
        if self.params.greedy and not history:
            return int(logits.argmax())
        scores = self._penalised(logits, history)
        if self.params.greedy:
            return int(scores.argmax())
        with np.errstate(over="ignore"):
            return self._sample(_finite(scores / self.params.temperature), index)

    def _penalised(self, logits: Logits, history: list[int]) -> npt.NDArray[np.float64]:
        scores = logits.astype(np.float64)
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or not history:
            return scores
        seen = np.unique(np.asarray(history, dtype=np.int64))
        picked = scores[seen]
        # As in CTRL / Hugging Face: shrink positive scores, grow negative ones.
        with np.errstate(over="ignore"):
            scores[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
        return _finite(scores)

    def _sample(self, scores: npt.NDArray[np.float64], index: int) -> int:
        top_k, top_p = self.params.top_k, self.params.top_p
        order = np.argsort(-scores, kind="stable")
        if 0 < top_k < order.size:
            order = order[:top_k]
        kept = scores[order]
        # Subtracting the maximum of finite scores keeps every exponent in (-inf, 0].
        with np.errstate(over="ignore", invalid="ignore"):
            probs = np.nan_to_num(np.exp(kept - kept.max()), nan=0.0)
        if not probs.sum() > 0:
            return int(order[0])
        probs /= probs.sum()
        if top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            cutoff = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
            probs = probs[:cutoff] / probs[:cutoff].sum()
            order = order[:cutoff]
        rng = np.random.default_rng((self.seed, index))
        return int(order[rng.choice(probs.size, p=probs)])


def _finite(scores: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Overflowed scores become the largest finite ones: order is kept, NaN cannot appear."""
    big = np.finfo(np.float64).max
    return np.nan_to_num(scores, nan=-big, posinf=big, neginf=-big)
