"""stop_token_ids: the stream ends with FINISH_REASON_STOP at a listed token, which, like EOS,
adds no text to the output (as in vLLM), while text held back before it still goes out."""

from __future__ import annotations

import asyncio

import pytest

from tests.sequences import accept_all, completion, deltas, sequence, usage
from tokenwire.server.domain import CompletionEvent, FinishReason
from tokenwire.server.tokenizer import Tokenizer

PROMPT = "say:"
SAID = "x = 1; y"


def _semicolon(tokenizer: Tokenizer, ids: list[int]) -> int:
    """The id among ids that decodes to ";" alone: an ordinary, non-special token."""
    semicolon = next(i for i in ids if tokenizer.decode([i]) == ";")
    assert semicolon not in tokenizer.inner.get_added_tokens_decoder()
    return semicolon


def test_a_non_special_stop_token_adds_no_text(
    loop: asyncio.AbstractEventLoop, tokenizer: Tokenizer
) -> None:
    """stop_token_ids=[";"] on "x = 1; y": the output is "x = 1", without the ";" that ended
    it, the stream ends with FINISH_REASON_STOP, and Usage counts the ";" token."""
    generated = tokenizer.encode(SAID)
    semicolon = _semicolon(tokenizer, generated)
    seq = sequence(loop, tokenizer, tokenizer.encode(PROMPT), stop_token_ids=(semicolon,))
    events = accept_all(seq, generated)
    ended = generated[: generated.index(semicolon) + 1]
    assert "".join(deltas(events)) == tokenizer.decode(ended[:-1]) == "x = 1"
    assert completion(events) == CompletionEvent(FinishReason.STOP)
    counted = usage(events)
    assert counted is not None
    assert counted.completion_tokens == len(ended)


def test_text_held_back_for_a_stop_string_goes_out_at_a_stop_token(
    loop: asyncio.AbstractEventLoop, tokenizer: Tokenizer
) -> None:
    """stop=["1;"] and stop_token_ids=[";"]: "1" is held back as the start of the stop string,
    the ";" token ends the stream (FINISH_REASON_STOP) without completing the string, and the
    held "1" goes out: the output is "x = 1"."""
    generated = tokenizer.encode(SAID)
    semicolon = _semicolon(tokenizer, generated)
    prompt = tokenizer.encode(PROMPT)
    seq = sequence(loop, tokenizer, prompt, stop=("1;",), stop_token_ids=(semicolon,))
    events = accept_all(seq, generated)
    assert "".join(deltas(events)) == "x = 1"
    assert completion(events) == CompletionEvent(FinishReason.STOP)


def _byte_token(tokenizer: Tokenizer, byte: int) -> int:
    """The id of the token that is this one byte alone."""
    return next(i for i in range(tokenizer.vocab_size) if tokenizer.token_bytes(i) == bytes([byte]))


@pytest.mark.parametrize("end", ["length", "eos"])
def test_a_stop_string_the_streams_last_text_completes_ends_it_at_that_string(
    loop: asyncio.AbstractEventLoop, tokenizer: Tokenizer, end: str
) -> None:
    """stop=["\\ufffd"], and the stream's last tokens the first bytes of an emoji that never
    completes (U+FFFD in the text the stream ends with, at its max_tokens or at EOS): the
    output is cut before the stop string and the stream ends FINISH_REASON_STOP_SEQUENCE
    naming it, not with its length or EOS as if nothing had been cut."""
    a = next(i for i in tokenizer.encode("a") if tokenizer.decode([i]) == "a")
    generated = [a, _byte_token(tokenizer, 0xF0), _byte_token(tokenizer, 0x9F)]
    eos = frozenset({0})
    if end == "eos":
        generated.append(0)
    seq = sequence(
        loop,
        tokenizer,
        tokenizer.encode(PROMPT),
        max_tokens=len(generated),
        eos_ids=eos,
        stop=("\ufffd",),
    )
    events = accept_all(seq, generated)
    assert "".join(deltas(events)) == "a"
    assert completion(events) == CompletionEvent(FinishReason.STOP_SEQUENCE, "\ufffd")
