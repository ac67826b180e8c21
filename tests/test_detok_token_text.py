"""A token's own text (Token.token_text, TopLogprob.text) reads as the token does after other
text: a SentencePiece token's "▁" is the space it stands for."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.sequences import sequence
from tokenwire.server.domain import TokenEvent
from tokenwire.server.tokenizer import Tokenizer


@pytest.mark.parametrize(
    ("token", "text"),
    [
        ("▁Hello", " Hello"),
        ("▁", " "),
        ("a", "a"),
        ("<0x85>", "\ufffd"),
        ("<s>", "<s>"),
    ],
)
def test_a_sentencepiece_token_s_text_keeps_its_space(
    sp_tokenizer: Tokenizer, token: str, text: str
) -> None:
    """token_text("▁Hello") is " Hello" (decoded alone, the decoder drops the space: "Hello");
    a token without "▁" has no space, a stray byte is U+FFFD, a special token its text."""
    token_id = sp_tokenizer.token_id(token)
    assert token_id is not None
    assert sp_tokenizer.token_text(token_id) == text


def test_a_logprobs_token_text_keeps_its_space(
    loop: asyncio.AbstractEventLoop, sp_tokenizer: Tokenizer
) -> None:
    """With logprobs, the first generated token "▁world" reports token_text " world", as its
    streamed text is."""
    world = sp_tokenizer.token_id("▁world")
    assert world is not None
    seq = sequence(loop, sp_tokenizer, sp_tokenizer.encode("Hello"), logprobs=True)
    seq.accept(world, -0.5, time.monotonic())
    [event] = seq.take_events()
    assert isinstance(event, TokenEvent)
    assert (event.text, event.token_text) == (" world", " world")


def test_byte_level_token_text_is_the_token_decoded_alone(tokenizer: Tokenizer) -> None:
    """Byte-level BPE (the bundled model's): every id's token_text is its decode alone, special
    tokens included, as it always was."""
    for token_id in range(tokenizer.vocab_size):
        alone = tokenizer.inner.decode([token_id], skip_special_tokens=False)
        assert tokenizer.token_text(token_id) == alone
