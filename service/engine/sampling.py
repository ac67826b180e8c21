"""Token choice per request: repetition penalty, temperature, top-k, top-p, seeded RNG.

Each request owns its RNG, so a seeded request samples the same tokens whatever else runs in
its batch.
"""

from __future__ import annotations

import secrets

import numpy as np
import numpy.typing as npt

from service.domain import SamplingParams

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
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        self._rng = np.random.default_rng(seed)

    def choose(self, logits: Logits, history: list[int]) -> int:
        scores = self._penalised(logits, history)
        if self.params.greedy:
            return int(scores.argmax())
        return self._sample(scores.astype(np.float64) / self.params.temperature)

    def _penalised(self, logits: Logits, history: list[int]) -> Logits:
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or not history:
            return logits
        seen = np.unique(np.asarray(history, dtype=np.int64))
        scores = logits.copy()
        picked = scores[seen]
        # As in CTRL / Hugging Face: shrink positive scores, grow negative ones.
        scores[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
        return scores

    def _sample(self, scores: npt.NDArray[np.float64]) -> int:
        top_k, top_p = self.params.top_k, self.params.top_p
        order = np.argsort(-scores, kind="stable")
        if 0 < top_k < order.size:
            order = order[:top_k]
        kept = scores[order]
        probs = np.exp(kept - kept.max())
        probs /= probs.sum()
        if top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            cutoff = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
            probs = probs[:cutoff] / probs[:cutoff].sum()
            order = order[:cutoff]
        return int(order[self._rng.choice(probs.size, p=probs)])
