"""Token choice per request: logit bias, penalties, temperature, top-k, top-p, min-p, seeded RNG.

A token's random draw depends only on the request's seed and the token's index: a seeded
request samples the same tokens whatever else runs in its batch, and a generation continued
from its first k tokens (on this replica or another) draws exactly what it would have drawn.
Scores are float64 and sanitised before exponentiation: no parameter the API accepts (a tiny
repetition penalty, a tiny temperature) can turn them into NaN probabilities.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Sequence

import numpy as np
import numpy.typing as npt

from tokenwire.server.domain import SamplingParams

Logits = npt.NDArray[np.float32]
Scores = npt.NDArray[np.float64]


def log_softmax(logits: Logits) -> Scores:
    """Natural-log probabilities under the unmodified distribution."""
    scores: Scores = logits.astype(np.float64)
    peak = float(scores.max())
    shifted: Scores = scores - peak
    return shifted - float(np.log(np.exp(shifted).sum()))


def log_softmax_at(logits: Logits, token_id: int) -> float:
    """Natural-log probability of token_id under the unmodified distribution."""
    return float(log_softmax(logits)[token_id])


def top_logprobs(logits: Logits, n: int) -> list[tuple[int, float]]:
    """The n most likely token ids with their log-probabilities, most likely first."""
    logp = log_softmax(logits)
    best = np.argpartition(-logp, min(n, logp.size - 1))[:n]
    best = best[np.argsort(-logp[best], kind="stable")]
    return [(int(i), float(logp[i])) for i in best]


class Sampler:
    """Chooses the next token for one request."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        # Unseeded requests get a seed too, so that every stream can be continued exactly.
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(63)
        bias = params.logit_bias
        self._bias_ids = np.asarray([i for i, _ in bias], dtype=np.int64)
        self._bias_values = np.asarray([v for _, v in bias], dtype=np.float64)

    def choose(
        self,
        logits: Logits,
        *,
        index: int,
        prompt: Sequence[int] = (),
        generated: Sequence[int] = (),
        suppress: Collection[int] = (),
    ) -> int:
        """The token at position `index` of the generation (0 = the first generated token).

        `suppress` lists ids that must not be chosen now (EOS before min_tokens)."""
        scores = self._adjusted(logits, prompt, generated, suppress)
        if self.params.greedy:
            return int(scores.argmax())
        with np.errstate(over="ignore"):
            return self._sample(_finite(scores / self.params.temperature), index)

    def _adjusted(
        self,
        logits: Logits,
        prompt: Sequence[int],
        generated: Sequence[int],
        suppress: Collection[int],
    ) -> Scores:
        p = self.params
        scores = logits.astype(np.float64)
        if self._bias_ids.size:
            scores[self._bias_ids] += self._bias_values
        if p.repetition_penalty != 1.0 and (prompt or generated):
            seen = np.unique(np.asarray([*prompt, *generated], dtype=np.int64))
            picked = scores[seen]
            # As in CTRL / Hugging Face: shrink positive scores, grow negative ones.
            with np.errstate(over="ignore"):
                scores[seen] = np.where(
                    picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
                )
        if (p.presence_penalty or p.frequency_penalty) and generated:
            # As in the OpenAI API: per distinct generated token, and per occurrence.
            ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
            scores[ids] -= p.frequency_penalty * counts + p.presence_penalty
        if suppress:
            scores[np.fromiter(suppress, dtype=np.int64)] = -np.inf
        return _finite(scores)

    def _sample(self, scores: Scores, index: int) -> int:
        top_k, top_p, min_p = self.params.top_k, self.params.top_p, self.params.min_p
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
        if min_p > 0.0:
            # Sorted, so the tokens at least min_p times as likely as the first are a prefix.
            cutoff = max(1, int(np.count_nonzero(probs >= min_p * probs[0])))
            probs, order = probs[:cutoff] / probs[:cutoff].sum(), order[:cutoff]
        if top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            cutoff = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
            probs = probs[:cutoff] / probs[:cutoff].sum()
            order = order[:cutoff]
        rng = np.random.default_rng((self.seed, index))
        return int(order[rng.choice(probs.size, p=probs)])


def _finite(scores: Scores) -> Scores:
    """Overflowed scores become the largest finite ones: order is kept, NaN cannot appear.

    A suppressed token (-inf) stays below every finite score."""
    big = np.finfo(np.float64).max
    return np.nan_to_num(scores, nan=-big, posinf=big, neginf=-big)
