"""A step's token choice: plain greedy rows, adjusted greedy rows and sampling rows together."""

from __future__ import annotations

import asyncio

import numpy as np

from tests.sequences import sequence
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.domain import SamplingParams
from tokenwire.server.engine.logits import HostLogits
from tokenwire.server.engine.sequence import Sequence
from tokenwire.server.engine.token_choice import TokenChooser
from tokenwire.server.tokenizer import TextStream, Tokenizer

VOCAB = 64


def _row(
    loop: asyncio.AbstractEventLoop, tokenizer: Tokenizer, n: int, sampling: SamplingParams
) -> Sequence:
    return sequence(loop, tokenizer, [5, 6], max_tokens=8, sampling=sampling, request_id=f"r{n}")


def test_a_row_whose_draw_breaks_fails_alone(loop: asyncio.AbstractEventLoop) -> None:
    """One sampling row whose draw raises (its seed forced out of range) ends with an error;
    the plain greedy row, the penalised greedy row and the other sampling rows of the same
    step get their tokens."""
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    rows = [
        _row(loop, tokenizer, 0, SamplingParams(temperature=0.0)),
        _row(loop, tokenizer, 1, SamplingParams(temperature=0.0, repetition_penalty=2.0)),
        _row(loop, tokenizer, 2, SamplingParams(temperature=0.9, top_p=0.9, seed=3)),
        _row(loop, tokenizer, 3, SamplingParams(temperature=0.9, seed=4)),
        _row(loop, tokenizer, 4, SamplingParams(temperature=0.9, top_k=5, seed=5)),
    ]
    rows[3].sampler.seed = -1  # numpy's generator refuses a negative seed: this row's draw fails
    logits = np.zeros((len(rows), VOCAB), dtype=np.float32)
    logits[:, 7] = 5.0
    logits[1, 6] = 6.0  # the best, but seen in the prompt: halved, it falls below token 7
    TokenChooser(VOCAB, tokenizer.token_text).choose(rows, HostLogits(logits), 0.0)
    assert rows[0].generated == [7]
    assert rows[1].generated == [7]
    assert [len(rows[i].generated) for i in (2, 4)] == [1, 1]
    assert rows[3].generated == []
    assert rows[3].error is not None
    assert all(rows[i].error is None for i in (0, 1, 2, 4))


class _BrokenFlush(TextStream):
    """A text pipeline whose end-of-stream flush raises."""

    def finish(self, *, armed: bool = True) -> tuple[str, str | None]:
        raise ValueError("flush broke")


def test_a_row_whose_text_breaks_as_it_ends_fails_with_an_error(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """A row whose last token (its stop id) breaks the text pipeline's flush ends with an
    error, so its stream has a terminal event, and the other row of the step is served."""
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    rows = [_row(loop, tokenizer, n, SamplingParams(temperature=0.0)) for n in range(2)]
    rows[0].stop_ids = frozenset({7})
    broken = TextStream.create(tokenizer, ())
    rows[0].text = _BrokenFlush(broken.detokenizer, broken.matcher)
    logits = np.zeros((len(rows), VOCAB), dtype=np.float32)
    logits[:, 7] = 5.0
    TokenChooser(VOCAB, tokenizer.token_text).choose(rows, HostLogits(logits), 0.0)
    assert rows[0].error is not None
    assert rows[0].finished
    assert rows[1].generated == [7]
    assert rows[1].error is None


class _BrokenPush(TextStream):
    """A text pipeline that raises on every token."""

    def push(self, token_id: int, *, armed: bool = True) -> tuple[str, str | None]:
        raise ValueError("push broke")


def test_a_token_whose_text_breaks_is_not_counted(loop: asyncio.AbstractEventLoop) -> None:
    """A row whose text pipeline breaks on its token fails without that token: its stream
    never got it, so its record counts no generated token and no token time."""
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    row = _row(loop, tokenizer, 0, SamplingParams(temperature=0.0))
    broken = TextStream.create(tokenizer, ())
    row.text = _BrokenPush(broken.detokenizer, broken.matcher)
    logits = np.zeros((1, VOCAB), dtype=np.float32)
    logits[0, 7] = 5.0
    TokenChooser(VOCAB, tokenizer.token_text).choose([row], HostLogits(logits), 0.0)
    assert row.error is not None
    record = row.record(1.0)
    assert (record.completion_tokens, record.token_times) == (0, ())
