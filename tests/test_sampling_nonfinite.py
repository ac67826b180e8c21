"""Non-finite logits (a model's NaN, +inf or -inf) in token choice and logprobs.

Every kind of row ranks a NaN logit as -inf: plain greedy rows (one argmax, on the host or in
the device's greedy graph) as the rows whose scores are adjusted do. A log-probability is
never NaN and never below LOGPROB_FLOOR: the normaliser sums the finite logits, +inf logits
hold all the mass, and tokens without mass are not listed as alternatives.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import onnxruntime as ort
import pytest

from tests.sequences import sequence
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.domain import SamplingParams, TokenEvent
from tokenwire.server.engine.logits import HostLogits, LogitsReader
from tokenwire.server.engine.sampling import (
    LOGPROB_FLOOR,
    log_normaliser,
    log_softmax_at,
    top_logprobs,
)
from tokenwire.server.engine.sequence import Sequence
from tokenwire.server.engine.token_choice import TokenChooser
from tokenwire.server.tokenizer import Tokenizer

VOCAB = 64
CPU = ["CPUExecutionProvider"]


def _row(
    loop: asyncio.AbstractEventLoop,
    tokenizer: Tokenizer,
    n: int,
    sampling: SamplingParams,
    *,
    logprobs: bool = False,
    alternatives: int = 0,
) -> Sequence:
    return sequence(
        loop,
        tokenizer,
        [5, 6],
        max_tokens=8,
        sampling=sampling,
        request_id=f"r{n}",
        logprobs=logprobs,
        top_logprobs=alternatives,
    )


def _row_logits(rows: int, fill: float, at: int) -> np.ndarray:
    """Logits whose best finite token is 10 (5.0), with `fill` at id `at`."""
    logits = np.zeros((rows, VOCAB), dtype=np.float32)
    logits[:, 10] = 5.0
    logits[:, at] = fill
    return logits


def test_the_host_argmax_ranks_a_nan_logit_last() -> None:
    """HostLogits.argmax picks each row's best finite id where a NaN logit comes before it
    (numpy's argmax alone would return the NaN's id)."""
    logits = _row_logits(3, np.nan, 3)
    logits[2, :] = np.nan  # a row of NaN only: id 0, as the adjusted scores choose
    assert HostLogits(logits).argmax(VOCAB).tolist() == [10, 10, 0]


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["fp16", "fp32"])
def test_the_device_argmax_ranks_a_nan_logit_last(dtype: type[np.floating]) -> None:
    """The greedy graph (the argmax of logits left on the device) picks each row's best finite
    id, a NaN at id 0 or after the best one included, as the host does."""
    logits = _row_logits(3, np.nan, 0).astype(dtype)
    logits[1, 0] = 0.0
    logits[1, 20] = np.nan
    logits[2, :] = np.nan
    reader = LogitsReader(CPU, half=dtype is np.float16)
    best = reader.argmax(ort.OrtValue.ortvalue_from_numpy(logits[:, None, :].copy()))[:, -1]
    assert best.tolist() == [10, 10, 0]
    assert best.tolist() == HostLogits(logits.astype(np.float32)).argmax(VOCAB).tolist()


def test_plain_and_adjusted_greedy_rows_pick_the_same_token_beside_a_nan_logit(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """In one step, a plain greedy row, a penalised greedy row and a greedy row asking for
    logprobs all take the best finite token, not the NaN before it."""
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    rows = [
        _row(loop, tokenizer, 0, SamplingParams(temperature=0.0)),
        _row(loop, tokenizer, 1, SamplingParams(temperature=0.0, repetition_penalty=1.0001)),
        _row(loop, tokenizer, 2, SamplingParams(temperature=0.0), logprobs=True),
    ]
    TokenChooser(VOCAB, tokenizer.token_text).choose(rows, HostLogits(_row_logits(3, np.nan, 3)), 0)
    assert [r.generated for r in rows] == [[10], [10], [10]]


def test_plain_greedy_rows_alone_skip_a_nan_logit(loop: asyncio.AbstractEventLoop) -> None:
    """A step of plain greedy rows only (the one-argmax fast path) takes the best finite
    token, not the NaN before it."""
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    rows = [_row(loop, tokenizer, n, SamplingParams(temperature=0.0)) for n in range(2)]
    TokenChooser(VOCAB, tokenizer.token_text).choose(rows, HostLogits(_row_logits(2, np.nan, 3)), 0)
    assert [r.generated for r in rows] == [[10], [10]]


def test_a_nan_logit_leaves_the_other_logprobs_as_without_it() -> None:
    """A NaN logit has no mass: the normaliser, a token's logprob and the alternatives are
    those of the same row without it (the NaN token itself at the floor, never listed)."""
    row = _row_logits(1, np.nan, 3)[0]
    without = np.delete(row, 3)
    assert log_normaliser(row) == log_normaliser(without)
    assert log_softmax_at(row, 10) == log_softmax_at(without, 9)
    assert log_softmax_at(row, 3) == LOGPROB_FLOOR
    listed = top_logprobs(row, 3)
    assert [i for i, _ in listed] == [10, 0, 1]
    assert [p for _, p in listed] == [p for _, p in top_logprobs(without, 3)]


def test_infinite_logits_hold_all_the_probability() -> None:
    """Two +inf logits share all the mass: each has log(1/2), a finite token the floor, and
    the alternatives are those two only."""
    row = _row_logits(1, np.inf, 3)[0]
    row[7] = np.inf
    assert log_softmax_at(row, 3) == log_softmax_at(row, 7) == -math.log(2)
    assert log_softmax_at(row, 10) == LOGPROB_FLOOR
    assert top_logprobs(row, 5) == [(3, -math.log(2)), (7, -math.log(2))]


def test_a_lone_infinite_logit_has_log_probability_zero() -> None:
    """One +inf logit holds all the mass: its log-probability is 0.0 (not -0.0, which JSON
    would carry as "-0.0")."""
    logprob = log_softmax_at(_row_logits(1, np.inf, 3)[0], 3)
    assert logprob == 0.0
    assert math.copysign(1.0, logprob) == 1.0


def test_masked_tokens_are_at_the_floor_and_never_alternatives() -> None:
    """Tokens with -inf logits (masked) report LOGPROB_FLOOR, and top_logprobs lists only the
    tokens with probability, fewer than asked for where they are fewer."""
    row = np.full(VOCAB, -np.inf, dtype=np.float32)
    row[[40, 41, 42]] = [3.0, 2.0, 1.0]
    assert log_softmax_at(row, 0) == LOGPROB_FLOOR
    listed = top_logprobs(row, 5)
    assert [i for i, _ in listed] == [40, 41, 42]
    assert all(math.isfinite(p) and p < 0 for _, p in listed)


def test_a_row_without_finite_logits_reports_the_floor() -> None:
    """A row whose logits are all -inf or NaN gives no token any probability: the one chosen
    (id 0, as every kind of row chooses there) reports the floor, and no alternative is
    listed."""
    row = np.full(VOCAB, -np.inf, dtype=np.float32)
    row[5] = np.nan
    assert log_softmax_at(row, 0) == LOGPROB_FLOOR
    assert top_logprobs(row, 3) == []


def test_logprob_events_are_finite_beside_non_finite_logits(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Greedy and sampled rows asking for logprobs and 5 alternatives, where most logits are
    -inf and one is NaN, get finite logprobs at or above the floor, and as alternatives only
    the tokens with probability."""
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1)]
    rows = [
        _row(loop, tokenizer, n, sampling, logprobs=True, alternatives=5)
        for n, sampling in enumerate(kinds)
    ]
    logits = np.full((2, VOCAB), -np.inf, dtype=np.float32)
    logits[:, [10, 11, 12]] = [3.0, 2.0, 1.0]
    logits[:, 3] = np.nan
    TokenChooser(VOCAB, tokenizer.token_text).choose(rows, HostLogits(logits), 0.0)
    for seq in rows:
        token = next(e for e in seq.outbox if isinstance(e, TokenEvent))
        assert token.logprob is not None
        assert math.isfinite(token.logprob)
        assert LOGPROB_FLOOR <= token.logprob < 0
        assert [a.token_id for a in token.top_logprobs] == [10, 11, 12]
        assert all(math.isfinite(a.logprob) for a in token.top_logprobs)
