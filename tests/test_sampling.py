"""Token choice: each knob does what it says on a known distribution."""

from __future__ import annotations

import dataclasses

import numpy as np

from tokenwire.server.domain import SamplingParams
from tokenwire.server.engine.sampling import (
    BLOCK,
    TOP_P_HEAD,
    Sampler,
    _bound_of_kth,
    _first_passing,
    _first_passing_rows,
    _top_p_rows,
    log_softmax_at,
    sample,
    top_logprobs,
    uniforms,
)

LOGITS = np.log(np.asarray([0.5, 0.3, 0.15, 0.05], dtype=np.float32))


def _draws(params: SamplingParams, n: int = 400, history: list[int] | None = None) -> list[int]:
    sampler = Sampler(params)
    return [sampler.choose(LOGITS, index=index, generated=history or []) for index in range(n)]


def test_temperature_zero_is_argmax() -> None:
    """Greedy always picks the most likely token."""
    assert set(_draws(SamplingParams(temperature=0.0), n=20)) == {0}


def test_top_k_one_is_argmax_even_when_sampling() -> None:
    """top_k=1 leaves only the most likely token to sample."""
    assert set(_draws(SamplingParams(temperature=1.5, top_k=1, seed=1))) == {0}


def test_top_p_cuts_the_tail() -> None:
    """top_p=0.8 keeps tokens 0 and 1 (mass 0.8) and never samples 2 or 3."""
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.8, seed=2))) == {0, 1}


def test_unrestricted_sampling_reaches_the_tail() -> None:
    """Without top-k/top-p every token with mass is eventually sampled."""
    assert set(_draws(SamplingParams(temperature=1.0, seed=3), n=2000)) == {0, 1, 2, 3}


def test_repetition_penalty_moves_greedy_off_a_seen_token() -> None:
    """Penalising token 0 (already generated) makes greedy pick token 1."""
    penalised = _draws(SamplingParams(temperature=0.0, repetition_penalty=2.0), n=1, history=[0])
    assert penalised == [1]


def test_same_seed_same_draws() -> None:
    """Two samplers with one seed draw the same sequence."""
    params = SamplingParams(temperature=1.0, seed=99)
    assert _draws(params, n=50) == _draws(params, n=50)


def test_logprob_is_log_of_the_softmax() -> None:
    """log_softmax_at returns log p of the unmodified distribution."""
    assert abs(log_softmax_at(LOGITS, 1) - float(np.log(0.3))) < 1e-5


def test_tiny_repetition_penalty_with_sampling_still_picks_a_token() -> None:
    """repetition_penalty 1e-38 overflows float32 scores; the sampler still returns a valid id."""
    logits = np.asarray([30.0, 20.0, -5.0, 1.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=1.0, repetition_penalty=1e-38, seed=4))
    picks = {sampler.choose(logits, index=i, generated=[0, 1, 2]) for i in range(50)}
    assert picks <= {0, 1, 2, 3}
    assert picks


def test_denormal_temperature_samples_like_greedy() -> None:
    """A temperature of 1e-45 (inside the accepted range) picks the most likely token."""
    sampler = Sampler(SamplingParams(temperature=1e-45, seed=5))
    assert {sampler.choose(LOGITS, index=i) for i in range(20)} == {0}


def test_infinite_logits_do_not_produce_nan_probabilities() -> None:
    """Logits with +inf and -inf entries are sampled among the +inf ones, never NaN."""
    logits = np.asarray([np.inf, -np.inf, np.inf, 0.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.7, top_p=0.5, seed=6))
    assert {sampler.choose(logits, index=i) for i in range(50)} <= {0, 2}


def test_a_draw_depends_only_on_seed_and_index() -> None:
    """Token i of a seeded request is the same whether or not tokens 0..i-1 were drawn by this
    sampler: a continuation on another replica draws what the first would have."""
    params = SamplingParams(temperature=1.0, seed=77)
    sampler = Sampler(params)
    first = [sampler.choose(LOGITS, index=i) for i in range(40)]
    resumed = Sampler(params)
    assert [resumed.choose(LOGITS, index=i) for i in range(25, 40)] == first[25:]
    assert len(set(first)) > 1


def test_presence_and_frequency_penalties_follow_the_openai_formula() -> None:
    """Token 0 loses presence + frequency * count: 0.4 after one occurrence keeps it ahead of
    token 1 (gap 0.51), 0.6 after two does not."""
    params = SamplingParams(temperature=0.0, presence_penalty=0.2, frequency_penalty=0.2)
    assert Sampler(params).choose(LOGITS, index=0, generated=[0]) == 0
    assert Sampler(params).choose(LOGITS, index=0, generated=[0, 0]) == 1


def test_logit_bias_steers_greedy() -> None:
    """A +5 bias on the least likely token makes it the greedy choice."""
    params = SamplingParams(temperature=0.0, logit_bias=((3, 5.0),))
    assert Sampler(params).choose(LOGITS, index=0) == 3


def test_min_p_drops_tokens_below_the_fraction_of_the_best() -> None:
    """min_p=0.5 keeps tokens at least half as likely as token 0 (p=0.5): only 0 and 1."""
    assert set(_draws(SamplingParams(temperature=1.0, min_p=0.5, seed=8))) == {0, 1}


def test_suppressed_ids_are_never_chosen() -> None:
    """Suppressing the most likely token (EOS before min_tokens) leaves the others."""
    sampler = Sampler(SamplingParams(temperature=0.0))
    assert sampler.choose(LOGITS, index=0, suppress={0}) == 1


def test_top_logprobs_are_the_most_likely_first() -> None:
    """The top 2 alternatives are tokens 0 and 1 with their log-probabilities."""
    best = top_logprobs(LOGITS, 2)
    assert [i for i, _ in best] == [0, 1]
    assert abs(best[0][1] - np.log(0.5)) < 1e-6


def _batch_rows(rows: int, vocab: int, seed: int) -> tuple[np.ndarray, list[Sampler]]:
    """Random logits (some rows peaked, some flat) and samplers with every truncation."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, vocab)) * rng.uniform(0.1, 6.0, (rows, 1))).astype(
        np.float32
    )
    kinds = [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.3, top_k=40),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=0.9, top_k=200, top_p=0.5, min_p=0.01),
        SamplingParams(temperature=0.6, top_p=0.999),
    ]
    samplers = [
        Sampler(dataclasses.replace(kinds[r % len(kinds)], seed=int(rng.integers(2**62))))
        for r in range(rows)
    ]
    return logits, samplers


def test_a_row_draws_the_same_alone_and_in_any_batch() -> None:
    """Drawn with 11 other rows of other settings, from float32 logits or a float64 copy, each
    row gets the token it gets alone: a seeded stream does not depend on its neighbours."""
    logits, samplers = _batch_rows(12, 3000, seed=11)
    for index in range(30):
        together = sample(logits, samplers, [index] * 12)
        copied = sample(logits.astype(np.float64), samplers, [index] * 12)
        alone = [sample(logits[r : r + 1], samplers[r : r + 1], [index])[0] for r in range(12)]
        assert together == alone == copied


def test_draw_frequencies_follow_the_probabilities() -> None:
    """4,000 draws from p = (0.5, 0.3, 0.15, 0.05) land on each token within 0.03 of p."""
    draws = _draws(SamplingParams(temperature=1.0, seed=12), n=4000)
    frequencies = np.bincount(draws, minlength=4) / len(draws)
    assert np.abs(frequencies - np.exp(LOGITS)).max() < 0.03


def test_uniform_draws_spread_evenly_over_indices_and_over_seeds() -> None:
    """The uniforms behind draws fill each tenth of [0, 1) with 10 % +- 1 % of 20,000 draws:
    the tokens of one request (consecutive indices), and one token of consecutive seeds (the
    extremes of the seed range included)."""
    n = 20_000
    one_seed = uniforms([Sampler(SamplingParams(seed=2**64 - 1))] * n, list(range(n)))
    seeds = [Sampler(SamplingParams(seed=s)) for s in range(n)]
    many_seeds = uniforms(seeds, [7] * n)
    for drawn in (one_seed, many_seeds):
        assert ((drawn >= 0.0) & (drawn < 1.0)).all()
        tenths = np.bincount((drawn * 10).astype(int), minlength=10) / n
        assert np.abs(tenths - 0.1).max() < 0.01


def test_the_two_level_running_sum_finds_what_a_plain_cumsum_finds() -> None:
    """For weights with runs of zeros and random targets, the block-wise search returns the
    position np.searchsorted finds on the whole cumulative sum, and never a zero weight."""
    rng = np.random.default_rng(13)
    for _ in range(200):
        weights = rng.exponential(1.0, 4 * BLOCK) * (rng.random(4 * BLOCK) < 0.3)
        cumulative = np.cumsum(weights)
        target = rng.random() * cumulative[-1]
        found = _first_passing(weights, target)
        assert found == int(np.searchsorted(cumulative, target, side="right"))
        assert weights[found] > 0


def test_the_search_of_many_rows_finds_what_each_row_finds_alone() -> None:
    """Searched together, with either side, each row of weights (runs of zeros, some rows
    all zero but one) gets the position np.searchsorted finds on its own cumulative sum."""
    rng = np.random.default_rng(16)
    for side in ("right", "left"):
        weights = rng.exponential(1.0, (9, 3 * BLOCK)) * (rng.random((9, 3 * BLOCK)) < 0.3)
        weights[0] = 0.0
        weights[0, 5] = 1.0
        cumulative = np.cumsum(weights, axis=1)
        targets = rng.random(9) * cumulative[:, -1]
        found = _first_passing_rows(weights, targets, side=side)
        expected = [
            int(np.searchsorted(row, target, side=side))
            for row, target in zip(cumulative, targets, strict=True)
        ]
        assert found == expected
        assert all(weights[r, position] > 0 for r, position in enumerate(found))


def _weight_rows(spreads: list[float], width: int, seed: int) -> np.ndarray:
    """float32 weights (the best of each row weighs 1), zeros up to whole blocks: the larger
    a row's spread, the fewer of its most likely tokens carry its mass."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((len(spreads), width)) * np.asarray(spreads)[:, None]
    weights = np.zeros((len(spreads), -(-width // BLOCK) * BLOCK), dtype=np.float32)
    weights[:, :width] = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights


def test_top_p_of_many_rows_keeps_what_each_row_keeps_alone() -> None:
    """Rows whose mass lies in their TOP_P_HEAD largest weights, or beyond them, or spread over
    the whole row, cut together with their own top_p, each keep exactly what they keep alone."""
    weights = _weight_rows([12.0, 3.0, 2.0, 0.05, 8.0, 1.0, 2.5], 20_000, seed=17)
    top_p = np.random.default_rng(18).uniform(0.05, 0.99, 7)
    together = _top_p_rows(weights.copy(), top_p)
    for row, p, kept in zip(weights, top_p, together, strict=True):
        alone = _top_p_rows(row[None, :].copy(), np.asarray([p]))[0]
        assert np.array_equal(alone, kept)


def test_the_bound_of_the_kth_best_stays_tight_where_likely_tokens_crowd_the_first_ids() -> None:
    """On rows whose scores fall with the token id (a vocabulary numbered by frequency, as a
    model's likely tokens are), the bound of the k-th best lets at most 2k scores reach it;
    it is never above the k-th best."""
    rng = np.random.default_rng(21)
    width, k = 20_000, 50
    falling = -np.log1p(np.arange(width)) * 2.0
    scores = (falling + rng.standard_normal((4, width)) * 0.5).astype(np.float32)
    bound = _bound_of_kth(scores, k)
    kth = np.sort(scores, axis=1)[:, width - k]
    assert (bound <= kth).all()
    assert ((scores >= bound[:, None]).sum(axis=1) <= 2 * k).all()


def test_rows_tied_at_their_k_th_score_draw_the_same_alone_and_together() -> None:
    """Where some rows' k-th best score is tied (they keep more than k candidates), every
    row still draws what it draws alone, and only among its candidates."""
    rng = np.random.default_rng(18)
    logits = np.round(rng.standard_normal((8, 500)) * 2).astype(np.float32)
    logits[1::2] = rng.standard_normal((4, 500)).astype(np.float32)  # untied rows between
    samplers = [
        Sampler(SamplingParams(temperature=1.0, top_k=20, seed=int(rng.integers(2**62))))
        for _ in range(8)
    ]
    kth = np.sort(logits, axis=1)[:, -20]
    for index in range(20):
        together = sample(logits, samplers, [index] * 8)
        alone = [sample(logits[r : r + 1], samplers[r : r + 1], [index])[0] for r in range(8)]
        assert together == alone
        assert all(logits[r, token] >= kth[r] for r, token in enumerate(together))


def test_top_p_keeps_what_a_full_sort_keeps_however_far_the_mass_spreads() -> None:
    """top_p keeps the tokens a full descending sort keeps (with float64 running sums), on
    rows whose mass lies in their TOP_P_HEAD largest weights, beyond them (where those carry
    less than half of it, and more), and across the whole row (a flat one), and in rows too
    narrow for a head."""
    for width in (20_000, 700):
        weights = _weight_rows([12.0, 2.0, 0.05, 2.4], width, seed=14)
        ranked = np.sort(weights, axis=1)[:, ::-1].astype(np.float64)
        running = np.cumsum(ranked, axis=1)
        spread = [int(np.searchsorted(r, 0.9 * r[-1])) for r in running]
        if width == 20_000:
            assert spread[0] < TOP_P_HEAD < spread[3] < spread[1] < spread[2]
            head = running[:, TOP_P_HEAD - 1] / running[:, -1]
            assert head[1] < 0.5 < head[3] < 0.9
        kept = _top_p_rows(weights.copy(), np.full(4, 0.9))
        for r in range(4):
            expected = weights[r] >= ranked[r, spread[r]]
            assert ((kept[r] > 0) == expected).all()
            assert np.array_equal(kept[r][expected], weights[r][expected])


def test_top_logprobs_list_equal_tokens_by_id_and_stop_at_n() -> None:
    """Three tokens tie for best: the top 2 are the two lowest ids, each with its
    log-probability (its logit minus the log normaliser)."""
    logits = np.asarray([0.0, 2.0, 2.0, 1.0, 2.0], dtype=np.float32)
    best = top_logprobs(logits, 2)
    assert [i for i, _ in best] == [1, 2]
    expected = 2.0 - float(np.log(np.exp(logits.astype(np.float64)).sum()))
    assert all(abs(logp - expected) < 1e-9 for _, logp in best)


def test_suppressed_ids_stay_out_when_every_other_logit_is_minus_infinity() -> None:
    """A suppressed token is never chosen, greedy or sampled, even where all other logits are
    -inf (a suppressed id must rank below them)."""
    logits = np.asarray([5.0, -np.inf, -np.inf, -np.inf], dtype=np.float32)
    greedy = Sampler(SamplingParams(temperature=0.0))
    sampled = Sampler(SamplingParams(temperature=1.0, seed=15))
    assert greedy.choose(logits, index=0, suppress={0}) != 0
    assert 0 not in {sampled.choose(logits, index=i, suppress={0}) for i in range(50)}
