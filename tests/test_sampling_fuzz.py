"""Sampling under any logits and any settings the API accepts: a valid, allowed, repeatable id."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwire.server.domain import SamplingParams
from tokenwire.server.engine.sampling import Sampler, at_least_kth

pytestmark = pytest.mark.compute

SPECIAL = st.sampled_from([np.inf, -np.inf, np.nan, 3.0e38, -3.0e38, 0.0])
LOGIT = st.one_of(st.floats(-50, 50, width=32), SPECIAL)

PARAMS = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(1e-45), st.floats(0.01, 2.0)),
    top_k=st.integers(0, 40),
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    repetition_penalty=st.one_of(st.just(1.0), st.just(1e-38), st.floats(0.1, 2.0)),
    seed=st.integers(0, 2**64 - 1),
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    logits=st.lists(LOGIT, min_size=2, max_size=600),
    params=PARAMS,
    index=st.integers(0, 10_000),
    data=st.data(),
)
def test_a_draw_is_a_valid_unsuppressed_repeatable_id(
    logits: list[float], params: SamplingParams, index: int, data: st.DataObject
) -> None:
    """Whatever the logits (infinite, NaN, huge) and settings: the id is in the vocabulary, is
    not a suppressed one, is among the top_k highest adjusted scores when top_k is set, and
    the same inputs draw it again."""
    row = np.asarray(logits, dtype=np.float32)
    suppress = set(data.draw(st.sets(st.integers(0, row.size - 1), max_size=row.size - 1)))
    generated = data.draw(st.lists(st.integers(0, row.size - 1), max_size=5))
    sampler = Sampler(params)

    def draw() -> int:
        return sampler.choose(row, index=index, generated=generated, suppress=suppress)

    token = draw()
    assert 0 <= token < row.size
    assert token not in suppress
    assert draw() == token
    if 0 < params.top_k < row.size:
        adjusted = row.astype(np.float64)
        sampler.adjust(adjusted, (), generated, suppress)
        assert adjusted[token] >= np.sort(adjusted)[::-1][params.top_k - 1]


@settings(max_examples=300, deadline=None, database=None)
@given(
    rows=st.integers(1, 5),
    width=st.integers(2, 3000),
    levels=st.sampled_from([2, 7, 50, 1000, 0]),
    wide=st.booleans(),
    data=st.data(),
)
def test_top_k_candidates_are_every_score_at_least_the_kth_best(
    rows: int, width: int, levels: int, wide: bool, data: st.DataObject
) -> None:
    """A row's top-k candidates are exactly its scores at least as high as its k-th best, ties
    included, whether the row has few distinct values or none equal (levels 0), in float32 or
    float64, and read through a strided view of wider rows."""
    k = data.draw(st.integers(1, min(width - 1, 120)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    values = rng.standard_normal((rows, width + 5)) * 3.0
    if levels:
        values = np.round(values * levels / 6.0)
    full = values.astype(dtype)
    scores = full[:, :width] if wide else np.ascontiguousarray(full[:, :width])
    kth = np.sort(scores, axis=1)[:, width - k]
    expected = np.flatnonzero(scores >= kth[:, None])
    assert np.array_equal(at_least_kth(scores, k), expected)
