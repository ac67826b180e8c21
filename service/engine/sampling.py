"""Token choice per request: logit bias, penalties, temperature, top-k, top-p, min-p, seeded RNG.

A token's random draw depends only on the request's seed and the token's index: a seeded
request samples the same tokens whatever else runs in its batch, and a generation continued
from its first k tokens (on this replica or another) draws exactly what it would have drawn.
Adjusted scores are float64 and sanitised before exponentiation, and the weights
exp((score - best) / temperature) lie in [0, 1]: no parameter the API accepts (a tiny
repetition penalty, a tiny temperature) can turn them into NaN probabilities. The weights are
float32 (as the logits are) and every running sum over them is float64 from block totals on.

The rows of a step that sample are drawn in one pass (`sample`): temperature, exponentiation,
min-p and the draw's running sums run over all of them at once, and no row sorts its whole
vocabulary unless it asks for top-p and its most likely 256 tokens fall short of the mass
(top-k keeps the tokens scoring at least its k-th best score, as Hugging Face's warper does;
top-p keeps the most likely tokens until their mass reaches top_p, ties with the last one kept
included). Each row's draw is the token at which the
running sum of its kept probabilities, in vocabulary order, passes u x their total, for one
uniform u from the request's seed and the token's index (SplitMix64: `uniforms`).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Collection, Sequence
from typing import Literal, cast

import numpy as np
import numpy.typing as npt

from tokenwire.server.domain import SamplingParams

Logits = npt.NDArray[np.float32]
Scores = npt.NDArray[np.float64]
Weights = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.intp]
Side = Literal["left", "right"]


LOGPROB_FLOOR = -9999.0
"""The log-probability reported for a token the distribution gives no mass (a -inf or NaN
logit, or a finite one beside +inf logits), and the lowest one reported at all: a number JSON
can carry, as vLLM's OpenAI server clamps it."""


def log_normaliser(logits: Logits) -> float:
    """log(sum(exp(logits))) in float64 over the finite logits: a token's log-probability is its
    logit minus this (log_softmax_at). A NaN logit has no mass, as a -inf one; where some logits
    are +inf they hold all the mass, and the normaliser is +inf."""
    peak = float(logits.max())
    if not math.isfinite(peak):  # a NaN or +inf logit, or no finite one
        if np.isposinf(logits).any():
            return math.inf
        finite = logits[np.isfinite(logits)]
        return log_normaliser(finite) if finite.size else -math.inf
    return peak + float(np.log(np.exp(logits.astype(np.float64) - peak).sum()))


def log_softmax_at(logits: Logits, token_id: int, normaliser: float | None = None) -> float:
    """Natural-log probability of token_id under the unmodified distribution (`normaliser`:
    the row's log_normaliser, when it is known already), never below LOGPROB_FLOOR."""
    norm = log_normaliser(logits) if normaliser is None else normaliser
    return max(_log_probability(logits, token_id, norm), LOGPROB_FLOOR)


def _log_probability(logits: Logits, token_id: int, normaliser: float) -> float:
    """The token's log-probability, -inf where it has no mass; +inf logits share all of it."""
    logit = float(logits[token_id])
    if normaliser == math.inf:
        if logit != math.inf:
            return -math.inf
        # 0.0 - log(1) is 0.0, where -log(1) would be -0.0.
        return 0.0 - math.log(np.count_nonzero(np.isposinf(logits)))
    value = logit - normaliser
    return value if not math.isnan(value) else -math.inf


def top_logprobs(
    logits: Logits, n: int, normaliser: float | None = None
) -> list[tuple[int, float]]:
    """The n most likely token ids with their log-probabilities (never below LOGPROB_FLOOR),
    most likely first (equal ones by id); found by the n-th largest logit, no sort of the whole
    row. Tokens without mass (-inf or NaN logits) are not listed: there may be fewer than n."""
    n = min(n, logits.size)
    if n <= 0:
        return []
    norm = log_normaliser(logits) if normaliser is None else normaliser
    ranked = logits
    if np.isnan(ranked).any():  # numpy ranks NaN above everything: as -inf, it has no mass
        ranked = np.where(np.isnan(ranked), np.float32(-np.inf), ranked)
    threshold = np.partition(ranked, ranked.size - n)[ranked.size - n]
    candidates = np.flatnonzero(ranked >= threshold)
    best = candidates[np.argsort(-ranked[candidates], kind="stable")][:n]
    listed = [(int(i), _log_probability(ranked, int(i), norm)) for i in best]
    return [(i, max(p, LOGPROB_FLOOR)) for i, p in listed if p > -math.inf]


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
TOP_P_HEAD = 256
"""How many of a row's largest weights (at least) top-p ranks first (the whole row if they
fall short of its mass). On the benchmark model's rows at temperature 0.7, 64 fell short for
most rows and 512 ranked more than it saved."""
BOUND_GROUPS = 1024
"""How many strided groups a row's bound of its k-th best takes the maxima of (at least 2k,
at most an eighth of the row): more groups, a tighter bound."""
_BIG = float(np.finfo(np.float64).max)
_TINY = float(np.finfo(np.float32).tiny)


def _whole_blocks(size: int) -> int:
    """`size` rounded up to whole blocks."""
    return -(-size // BLOCK) * BLOCK


def sample(
    scores: Scores | Logits, samplers: Sequence[Sampler], indices: Sequence[int]
) -> list[int]:
    """One drawn token per row of `scores` (adjusted and finite; row r belongs to samplers[r]
    and is the token at position indices[r] of its generation), all rows in one pass. A row's
    token does not depend on the other rows.

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

    Only the few scores that reach a lower bound of the k-th best (`_bound_of_kth`) need
    ranking: two passes over the row, no partition of it."""
    rows, width = scores.shape
    if width < 8 * 2 * k:  # blocks too short to leave few scores above the bound
        # (numpy's stubs lose the dtype of a partition of a union of array types)
        kth = cast("Scores | Logits", np.partition(scores, width - k, axis=1)[:, width - k])
        return np.flatnonzero(scores >= kth[:, None])
    above, row, values = _at_least(scores, _bound_of_kth(scores, k))
    counts = np.bincount(row, minlength=rows)
    # Each row's scores above its bound, padded to the widest row with -inf, then ranked.
    padded = _padded_rows(values, row, counts, -np.inf)
    widest = padded.shape[1]
    kth = np.partition(padded, widest - k, axis=1)[:, widest - k]
    kept: IntArray = above[values >= kth[row]]
    return kept


def _bound_of_kth(values: Scores | Logits, k: int) -> Scores | Logits:
    """A lower bound of each row's k-th best value: the k-th best of the maxima of disjoint
    groups of the row (k groups hold a value at least that high; positions past the last whole
    round of groups are left out, which only lowers the bound). Rows at least 16k wide.

    The groups are strided, group j holding positions j, j + G, j + 2G, ... for G groups, not
    runs of neighbours: a vocabulary numbers its tokens roughly by frequency, so a model's
    likely tokens crowd its first positions, where runs would all have high maxima and the
    runs after them low ones, and the bound would fall far below the k-th best (on a trained
    model's rows, about 900 scores reached the bound of the 50th best with 100 runs, about 50
    with 1,024 strided groups)."""
    rows, width = values.shape
    groups = max(2 * k, min(BOUND_GROUPS, width // 8))
    per_group = width // groups
    maxima = values[:, : per_group * groups].reshape(rows, per_group, groups).max(axis=1)
    return cast("Scores | Logits", np.partition(maxima, groups - k, axis=1)[:, groups - k])


def _at_least(
    values: Scores | Logits | Weights, bound: npt.NDArray[np.floating]
) -> tuple[IntArray, IntArray, npt.NDArray[np.floating]]:
    """Flat indices, rows and values of every value at least its row's bound."""
    above = np.flatnonzero(values >= bound[:, None])
    row, column = np.divmod(above, values.shape[1])
    return above, row, values[row, column]


def _padded_rows(
    values: npt.NDArray[np.floating], row: IntArray, counts: IntArray, fill: float
) -> npt.NDArray[np.floating]:
    """Values listed row after row (row[i] is the row of values[i], counts per row), each
    row's left-aligned in a rectangle as wide as the widest, `fill` after them."""
    padded = np.full((counts.size, max(int(counts.max(initial=0)), 1)), fill, dtype=values.dtype)
    starts = np.cumsum(counts) - counts
    padded[row, np.arange(values.size) - np.repeat(starts, counts)] = values
    return padded


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


def _weights(scores: Scores | Logits, samplers: Sequence[Sampler]) -> Weights:
    """exp((score - best) / temperature) per row in float32, min-p applied, zeros after each
    row up to whole blocks; every operation runs once over all rows."""
    rows, width = scores.shape
    params = [s.params for s in samplers]
    weights = np.empty((rows, _whole_blocks(width)), dtype=np.float32)
    weights[:, width:] = -np.inf
    # (score - best) / temperature is in [-inf, 0]: the best token weighs exp(0) = 1, and no
    # temperature the API accepts can make a NaN of it (a temperature below float32's
    # smallest normal divides by that instead: every other token still weighs 0).
    with np.errstate(over="ignore"):
        best = scores.max(axis=1, keepdims=True)
        # float32 logits subtract in float32; a float64 copy subtracts in float64 and rounds
        # once, to the same float32 difference: a row draws the same from either.
        np.subtract(scores, best, out=weights[:, :width], casting="same_kind")
        temperature = np.asarray([p.temperature for p in params], dtype=np.float64)
        if (temperature != 1.0).any():  # x / 1 is x: the API's default skips a pass
            divisor = np.maximum(temperature, _TINY).astype(np.float32)
            np.divide(weights, divisor[:, None], out=weights)
    np.exp(weights, out=weights)
    # min-p: with the best weighing 1, the threshold is min_p itself.
    min_p = np.asarray([p.min_p for p in params], dtype=np.float32)[:, None]
    if min_p.any():
        weights *= weights >= min_p
    return weights


def _pick_rows(weights: Weights, samplers: Sequence[Sampler], indices: Sequence[int]) -> list[int]:
    """Per row, where the running sum of its weights (top-p applied, in place) passes u x
    their total, u the request's uniform draw for its index."""
    top_p = np.asarray([s.params.top_p for s in samplers], dtype=np.float64)
    cut = np.flatnonzero(top_p < 1.0)
    if cut.size:
        everyone = cut.size == len(samplers)
        kept = _top_p_rows(weights if everyone else weights[cut], top_p[cut])
        if not everyone:
            weights[cut] = kept
    totals = _running_totals(weights)
    return _first_passing_rows(weights, uniforms(samplers, indices) * totals[:, -1], totals)


def _top_p_rows(weights: Weights, top_p: Scores) -> Weights:
    """Each row (whole blocks wide) cut to its top_p, in place, all rows at once: zero all but
    the most likely weights whose mass first reaches top_p of the row's (the last one's ties
    kept too).

    The kept weights are a prefix of the row ranked from the most likely, so where they are
    few only a prefix needs ranking: every weight at least a lower bound of the row's
    TOP_P_HEAD-th best. Rows whose prefix falls short of the mass (flatter ones) are ranked
    whole: sorting a float32 row costs less than finding a longer prefix."""
    rows, width = weights.shape
    targets = top_p * _running_totals(weights)[:, -1]
    thresholds = np.zeros(rows, dtype=weights.dtype)
    short = np.arange(rows)
    if width >= 8 * 2 * TOP_P_HEAD:
        # Zeros weigh nothing: a row with fewer positive weights than the head ranks them all.
        bound = np.maximum(_bound_of_kth(weights, TOP_P_HEAD), np.finfo(np.float32).tiny)
        _, row, values = _at_least(weights, bound)
        ranked = _ranked(values, row, np.bincount(row, minlength=rows))
        totals = _running_totals(ranked)
        carried = totals[:, -1] >= targets
        reached, short = np.flatnonzero(carried), np.flatnonzero(~carried)
        last = _first_passing_rows(ranked[reached], targets[reached], totals[reached], "left")
        thresholds[reached] = ranked[reached, last]
    if short.size:
        ranked = np.sort(weights[short], axis=1)[:, ::-1]
        last = _first_passing_rows(ranked, targets[short], side="left")
        thresholds[short] = ranked[np.arange(short.size), last]
    weights *= weights >= thresholds[:, None]
    return weights


def _ranked(values: npt.NDArray[np.floating], row: IntArray, counts: IntArray) -> Weights:
    """Each row's values (listed row after row) from the largest, zeros after them up to
    whole blocks."""
    padded = _padded_rows(values, row, counts, 0.0)
    ranked = np.zeros((counts.size, _whole_blocks(padded.shape[1])), dtype=np.float32)
    ranked[:, : padded.shape[1]] = np.sort(padded, axis=1)[:, ::-1]
    return ranked


def _running_totals(values: npt.NDArray[np.floating]) -> Scores:
    """Each row's running sum at the end of each block (values whole blocks wide): blocks
    summed in the values' type, their running sum in float64."""
    rows, width = values.shape
    sums = values.reshape(rows, width // BLOCK, BLOCK).sum(axis=2)
    totals: Scores = np.cumsum(sums, axis=1, dtype=np.float64)
    return totals


def _first_passing(values: npt.NDArray[np.floating], target: float, side: Side = "right") -> int:
    """The first position where the running sum of `values` (non-negative, whole blocks)
    passes `target` ("right") or reaches it ("left"); the nearest position with a positive
    value at or before it, should rounding land on a zero."""
    return _first_passing_rows(values[None, :], np.asarray([target]), side=side)[0]


def _first_passing_rows(
    values: npt.NDArray[np.floating],
    targets: Scores,
    totals: Scores | None = None,
    side: Side = "right",
) -> list[int]:
    """_first_passing for each row of `values` and its target, all rows at once: block totals
    first (their running sum, `totals` where the caller has it, finds each row's block), then
    the running sum inside that block."""
    rows, width = values.shape
    blocked = values.reshape(rows, width // BLOCK, BLOCK)
    totals = _running_totals(values) if totals is None else totals
    goal = targets[:, None]
    # The running sums never decrease: counting the sums before the target is a binary search.
    before = totals <= goal if side == "right" else totals < goal
    block = np.minimum(np.count_nonzero(before, axis=1), totals.shape[1] - 1)
    every = np.arange(rows)
    offset = np.where(block > 0, totals[every, block - 1], 0.0)
    inside = np.cumsum(blocked[every, block], axis=1, dtype=np.float64) + offset[:, None]
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
