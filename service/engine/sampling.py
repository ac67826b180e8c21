"""Token choice per request: logit bias, penalties, temperature, top-k, top-p, min-p, seeded RNG.

A token's random draw depends only on the request's seed and the token's index: a seeded
request samples the same tokens whatever else runs in its batch, and a generation continued
from its first k tokens (on this replica or another) draws exactly what it would have drawn.
Scores are float64 and sanitised before exponentiation: no parameter the API accepts (a tiny
repetition penalty, a tiny temperature) can turn them into NaN probabilities.

The rows of a step that sample are drawn in one pass (`sample`): temperature, exponentiation,
min-p and the draw's running sums run over all of them at once, and no row sorts its whole
vocabulary unless it asks for top-p (top-k keeps the tokens scoring at least its k-th best
score, as Hugging Face's warper does; top-p keeps the most likely tokens until their mass
reaches top_p, ties with the last one kept included). Each row's draw is the token at which the
running sum of its kept probabilities, in vocabulary order, passes u x their total, for one
uniform u from the request's seed and the token's index (SplitMix64: `uniforms`).
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Sequence
from typing import Literal, cast

import numpy as np
import numpy.typing as npt

from tokenwire.server.domain import SamplingParams

Logits = npt.NDArray[np.float32]
Scores = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
Side = Literal["left", "right"]


def log_normaliser(logits: Logits) -> float:
    """log(sum(exp(logits))) in float64: a token's log-probability is its logit minus this."""
    peak = float(logits.max())
    return peak + float(np.log(np.exp(logits.astype(np.float64) - peak).sum()))


def log_softmax_at(logits: Logits, token_id: int, normaliser: float | None = None) -> float:
    """Natural-log probability of token_id under the unmodified distribution (`normaliser`:
    the row's log_normaliser, when it is known already)."""
    norm = log_normaliser(logits) if normaliser is None else normaliser
    return float(logits[token_id]) - norm


def top_logprobs(
    logits: Logits, n: int, normaliser: float | None = None
) -> list[tuple[int, float]]:
    """The n most likely token ids with their log-probabilities, most likely first (equal
    ones by id); found by the n-th largest logit, no sort of the whole row."""
    n = min(n, logits.size)
    if n <= 0:
        return []
    norm = log_normaliser(logits) if normaliser is None else normaliser
    threshold = np.partition(logits, logits.size - n)[logits.size - n]
    candidates = np.flatnonzero(logits >= threshold)
    best = candidates[np.argsort(-logits[candidates], kind="stable")][:n]
    return [(int(i), float(logits[i]) - norm) for i in best]


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
        scores: Scores = logits.astype(np.float64)
        self.adjust(scores, prompt, generated, suppress)
        if self.params.greedy:
            return int(scores.argmax())
        return sample(scores[None, :], [self], [index])[0]

    @property
    def changes_scores(self) -> bool:
        """Whether `adjust` changes anything but non-finite scores (bias or penalties)."""
        p = self.params
        return bool(
            self._bias_ids.size
            or p.repetition_penalty != 1.0
            or p.presence_penalty
            or p.frequency_penalty
        )

    def adjust(
        self,
        scores: Scores,
        prompt: Sequence[int] = (),
        generated: Sequence[int] = (),
        suppress: Collection[int] = (),
    ) -> None:
        """Logit bias, penalties and suppression, in place on a float64 row, which is finite
        afterwards."""
        p = self.params
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
        _make_finite(scores)
        if suppress:
            # Below every other score, -inf logits included (those become -max/2 here).
            np.maximum(scores, -_BIG / 2, out=scores)
            scores[np.fromiter(suppress, dtype=np.int64)] = -_BIG


BLOCK = 256
"""Positions per block of the two-level running sums (block totals first, then one block)."""
TOP_P_HEAD = 1024
"""How many of a row's largest weights top-p sorts first (the whole row if they fall short)."""
_BIG = float(np.finfo(np.float64).max)


def _whole_blocks(size: int) -> int:
    """`size` rounded up to whole blocks."""
    return -(-size // BLOCK) * BLOCK


def sample(
    scores: Scores | Logits, samplers: Sequence[Sampler], indices: Sequence[int]
) -> list[int]:
    """One drawn token per row of `scores` (adjusted and finite; row r belongs to samplers[r]
    and is the token at position indices[r] of its generation), all rows in one pass, in
    float64. A row's token does not depend on the other rows.

    Rows without top-k are weighed together over the whole vocabulary; top-k rows, grouped by
    k, only over their candidates (the tokens scoring at least their k-th best), in vocabulary
    order."""
    rows, width = scores.shape
    groups: dict[int, list[int]] = {}
    for r, sampler in enumerate(samplers):
        k = sampler.params.top_k
        groups.setdefault(k if 0 < k < width else 0, []).append(r)
    chosen = [0] * rows
    for k, members in groups.items():
        block = scores if len(members) == rows else scores[members]
        group = [samplers[r] for r in members]
        at = [indices[r] for r in members]
        picked = (
            _sample_top_k(block, k, group, at)
            if k
            else _pick_rows(_weights(block, group), group, at)
        )
        for r, token in zip(members, picked, strict=True):
            chosen[r] = token
    return chosen


def _sample_top_k(
    scores: Scores | Logits, k: int, samplers: Sequence[Sampler], indices: Sequence[int]
) -> list[int]:
    """Rows that share top_k = k: each weighed over its candidates, all at once; where some
    row's k-th best score is tied (it keeps more than k candidates), one row at a time."""
    rows, width = scores.shape
    # Every row's candidates, row after row, each row's in vocabulary order.
    flat = at_least_kth(scores, k)
    counts = np.bincount(flat // width, minlength=rows)
    chosen = [0] * rows
    if (counts == k).all():
        columns = (flat % width).reshape(rows, k)
        candidates = cast("Scores | Logits", np.take_along_axis(scores, columns, axis=1))
        weights = _weights(candidates, samplers)
        for r, position in enumerate(_pick_rows(weights, samplers, indices)):
            chosen[r] = int(columns[r, position])
        return chosen
    ends = np.cumsum(counts)
    for r in range(rows):
        candidates = flat[ends[r] - counts[r] : ends[r]] % width
        weights = _weights(scores[r, candidates][None, :], [samplers[r]])
        chosen[r] = int(candidates[_pick_rows(weights, [samplers[r]], [indices[r]])[0]])
    return chosen


def at_least_kth(scores: Scores | Logits, k: int) -> IntArray:
    """Flat indices (row-major) of every score at least its row's k-th best.

    The k-th best of the maxima of 2k blocks of a row is a lower bound of the row's k-th best
    (k blocks hold a score at least as high), and only the few scores that reach it need
    ranking: two passes over the row, no partition of it."""
    rows, width = scores.shape
    blocks = 2 * k
    if width < 8 * blocks:  # blocks too short to leave few scores above the bound
        # (numpy's stubs lose the dtype of a partition of a union of array types)
        kth = cast("Scores | Logits", np.partition(scores, width - k, axis=1)[:, width - k])
        return np.flatnonzero(scores >= kth[:, None])
    edges = np.linspace(0, width, blocks, endpoint=False).astype(np.intp)
    maxima = np.maximum.reduceat(scores, edges, axis=1)
    bound = cast("Scores | Logits", np.partition(maxima, blocks - k, axis=1)[:, blocks - k])
    above = np.flatnonzero(scores >= bound[:, None])
    row, column = np.divmod(above, width)
    counts = np.bincount(row, minlength=rows)
    values = scores[row, column]
    # Each row's scores above its bound, padded to the widest row with -inf, then ranked.
    widest = int(counts.max())
    padded = np.full((rows, widest), -np.inf, dtype=scores.dtype)
    starts = np.cumsum(counts) - counts
    padded[row, np.arange(above.size) - np.repeat(starts, counts)] = values
    kth = np.partition(padded, widest - k, axis=1)[:, widest - k]
    kept: IntArray = above[values >= kth[row]]
    return kept


def uniforms(samplers: Sequence[Sampler], indices: Sequence[int]) -> Scores:
    """Each row's uniform draw in [0, 1), from its request's seed and the token's index alone:
    SplitMix64's output at step index + 1 of the sequence the mixed seed starts."""
    seeds = _mix(np.asarray([s.seed for s in samplers], dtype=np.uint64))
    steps = np.asarray(indices, dtype=np.uint64) + np.uint64(1)
    drawn = _mix(seeds + steps * _GOLDEN_GAMMA) >> np.uint64(11)
    return drawn.astype(np.float64) * 2.0**-53


_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64's finaliser (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    mixed: npt.NDArray[np.uint64] = z ^ (z >> np.uint64(31))
    return mixed


def _weights(scores: Scores | Logits, samplers: Sequence[Sampler]) -> Scores:
    """exp((score - best) / temperature) per row, min-p applied, zeros after each row up to
    whole blocks; every operation runs once over all rows."""
    rows, width = scores.shape
    params = [s.params for s in samplers]
    weights = np.empty((rows, _whole_blocks(width)), dtype=np.float64)
    weights[:, width:] = -np.inf
    # (score - best) / temperature is in [-inf, 0]: the best token weighs exp(0) = 1, and no
    # temperature the API accepts can make a NaN of it.
    with np.errstate(over="ignore"):
        best = scores.max(axis=1, keepdims=True)
        # In float64 whatever the input: a row draws the same from float32 logits or a copy.
        np.subtract(scores, best, out=weights[:, :width], dtype=np.float64)
        weights /= np.asarray([p.temperature for p in params], dtype=np.float64)[:, None]
    np.exp(weights, out=weights)
    # min-p: with the best weighing 1, the threshold is min_p itself.
    min_p = np.asarray([p.min_p for p in params], dtype=np.float64)[:, None]
    if min_p.any():
        weights *= weights >= min_p
    return weights


def _pick_rows(weights: Scores, samplers: Sequence[Sampler], indices: Sequence[int]) -> list[int]:
    """Per row, where the running sum of its weights (top-p applied, in place) passes u x
    their total, u the request's uniform draw for its index."""
    top_p = np.asarray([s.params.top_p for s in samplers], dtype=np.float64)
    cut = np.flatnonzero(top_p < 1.0)
    if cut.size and weights.shape[1] <= TOP_P_HEAD:
        # The head is the whole row: rank every cut row at once.
        weights[cut] = _top_p_rows(weights[cut], top_p[cut])
    else:
        for r in cut:
            _keep_top_p(weights[r], float(top_p[r]))
    drawn = uniforms(samplers, indices)
    return _first_passing_rows(weights, drawn * weights.sum(axis=1))


def _top_p_rows(weights: Scores, top_p: Scores) -> Scores:
    """_keep_top_p of rows no wider than TOP_P_HEAD, all at once (a new array)."""
    ranked = np.ascontiguousarray(np.sort(weights, axis=1)[:, ::-1])
    last = _first_passing_rows(ranked, top_p * weights.sum(axis=1), side="left")
    threshold = ranked[np.arange(len(ranked)), last]
    kept: Scores = weights * (weights >= threshold[:, None])
    return kept


def _keep_top_p(row: Scores, top_p: float) -> None:
    """Zero all but the most likely weights whose mass first reaches top_p of the row's (the
    last one's ties kept too). Only the TOP_P_HEAD largest are sorted when they carry that
    mass, as they do in a trained model's peaked distributions; otherwise the whole row."""
    target = top_p * row.sum()
    head = min(row.size, TOP_P_HEAD)
    largest = np.partition(row, row.size - head)[row.size - head :]
    if head < row.size and not largest.sum() >= target:
        largest = row
    ranked = np.zeros(_whole_blocks(largest.size), dtype=np.float64)
    ranked[: largest.size] = np.sort(largest)[::-1]
    np.multiply(row, row >= ranked[_first_passing(ranked, target, side="left")], out=row)


def _first_passing(values: Scores, target: float, side: Side = "right") -> int:
    """The first position where the running sum of `values` (non-negative, whole blocks)
    passes `target` ("right") or reaches it ("left"); the nearest position with a positive
    value at or before it, should rounding land on a zero."""
    return _first_passing_rows(values[None, :], np.asarray([target]), side)[0]


def _first_passing_rows(values: Scores, targets: Scores, side: Side = "right") -> list[int]:
    """_first_passing for each row of `values` and its target, all rows at once: block totals
    first (their running sum finds each row's block), then the running sum inside that block."""
    rows, width = values.shape
    blocked = values.reshape(rows, width // BLOCK, BLOCK)
    totals = np.cumsum(blocked.sum(axis=2), axis=1)
    goal = targets[:, None]
    # The running sums never decrease: counting the sums before the target is a binary search.
    before = totals <= goal if side == "right" else totals < goal
    block = np.minimum(np.count_nonzero(before, axis=1), totals.shape[1] - 1)
    every = np.arange(rows)
    offset = np.where(block > 0, totals[every, block - 1], 0.0)
    inside = np.cumsum(blocked[every, block], axis=1) + offset[:, None]
    before = inside <= goal if side == "right" else inside < goal
    positions = block * BLOCK + np.minimum(np.count_nonzero(before, axis=1), BLOCK - 1)
    found: list[int] = positions.tolist()
    for r in np.flatnonzero(values[every, positions] <= 0.0):
        kept = np.flatnonzero(values[r, : positions[r] + 1] > 0.0)
        found[r] = int(kept[-1]) if kept.size else int(values[r].argmax())
    return found


def _make_finite(scores: Scores) -> None:
    """Overflowed scores become the largest finite ones, in place: order is kept, NaN cannot
    appear."""
    if not np.isfinite(scores).all():
        np.nan_to_num(scores, copy=False, nan=-_BIG, posinf=_BIG, neginf=-_BIG)
