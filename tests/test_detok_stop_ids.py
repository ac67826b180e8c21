"""stop_token_ids: the stream ends with FINISH_REASON_STOP at a listed token, and the token's
text, as any generated token's, is part of the output (a special token has none)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.sequences import accept_all, completion, deltas, sequence, usage
from tokenwire.server.domain import CompletionEvent, FinishReason
from tokenwire.server.tokenizer import Tokenizer

PROMPT = "say:"
SAID = "x = 1; y"


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _semicolon(tokenizer: Tokenizer, ids: list[int]) -> int:
    """The id among ids that decodes to ";" alone: an ordinary, non-special token."""
    semicolon = next(i for i in ids if tokenizer.decode([i]) == ";")
    assert semicolon not in tokenizer.inner.get_added_tokens_decoder()
    return semicolon


def test_a_non_special_stop_token_s_text_ends_the_output(
    loop: asyncio.AbstractEventLoop, tokenizer: Tokenizer
) -> None:
    """stop_token_ids=[";"] on "x = 1; y": the output is "x = 1;", the decode of all generated
    ids, the stream ends with FINISH_REASON_STOP, and Usage counts the ";" token."""
    generated = tokenizer.encode(SAID)
    semicolon = _semicolon(tokenizer, generated)
    seq = sequence(loop, tokenizer, tokenizer.encode(PROMPT), stop_token_ids=(semicolon,))
    events = accept_all(seq, generated)
    ended = generated[: generated.index(semicolon) + 1]
    assert "".join(deltas(events)) == tokenizer.decode(ended) == "x = 1;"
    assert completion(events) == CompletionEvent(FinishReason.STOP)
    counted = usage(events)
    assert counted is not None
    assert counted.completion_tokens == len(ended)


def test_a_stop_string_the_stop_token_completes_is_not_sent(
    loop: asyncio.AbstractEventLoop, tokenizer: Tokenizer
) -> None:
    """stop=["1;"] and stop_token_ids=[";"]: the stop token ends the stream (FINISH_REASON_STOP)
    and its text, like any, is cut at the stop string it completes: "x = " goes out."""
    generated = tokenizer.encode(SAID)
    semicolon = _semicolon(tokenizer, generated)
    prompt = tokenizer.encode(PROMPT)
    seq = sequence(loop, tokenizer, prompt, stop=("1;",), stop_token_ids=(semicolon,))
    events = accept_all(seq, generated)
    assert "".join(deltas(events)) == "x = "
    assert completion(events) == CompletionEvent(FinishReason.STOP)


def test_a_special_stop_token_adds_no_text(
    loop: asyncio.AbstractEventLoop, tokenizer: Tokenizer
) -> None:
    """A special token in stop_token_ids ends the stream with no text of its own, as the decode
    of all generated ids, special tokens skipped, has none."""
    end = tokenizer.token_id("<|end|>")
    assert end is not None
    generated = [*tokenizer.encode("x = 1"), end]
    seq = sequence(loop, tokenizer, tokenizer.encode(PROMPT), stop_token_ids=(end,))
    events = accept_all(seq, generated)
    assert "".join(deltas(events)) == tokenizer.decode(generated) == "x = 1"
    assert completion(events) == CompletionEvent(FinishReason.STOP)
