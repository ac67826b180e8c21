"""SentencePiece-style tokenizers (Llama 2, Mistral, Gemma): a generated token's text is what it
adds after the prompt, so the space its "▁" stands for is kept, from the first token on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import sentencepiece
from tests.sequences import accept_all, deltas, sequence
from tokenwire.server.tokenizer import TextStream, Tokenizer

pytestmark = pytest.mark.compute

SENTENCE = "Hello world é;x a"


def _after_prompt(tokenizer: Tokenizer, prompt: list[int], generated: list[int]) -> str:
    """What the generated ids add to the prompt's text: decode(all)[len(decode(prompt)):]."""
    return tokenizer.decode(prompt + generated)[len(tokenizer.decode(prompt)) :]


def test_the_first_generated_token_keeps_its_leading_space(
    loop: asyncio.AbstractEventLoop, sp_tokenizer: Tokenizer
) -> None:
    """Prompt "Hello", generated "▁world ▁a": the stream says " world a", as decode(prompt +
    generated) continues the prompt's text (and as vLLM streams it), not "world a"."""
    prompt = sp_tokenizer.encode("Hello")
    generated = sp_tokenizer.encode(" world a")[-2:]
    assert [sp_tokenizer.inner.id_to_token(i) for i in generated] == ["▁world", "▁a"]
    events = accept_all(sequence(loop, sp_tokenizer, prompt, max_tokens=2), generated)
    assert deltas(events) == [" world", " a"]
    assert "".join(deltas(events)) == _after_prompt(sp_tokenizer, prompt, generated)


def test_a_resumed_stream_goes_on_with_the_text_of_the_uninterrupted_one(
    loop: asyncio.AbstractEventLoop, sp_tokenizer: Tokenizer
) -> None:
    """Resumed after any number of delivered tokens (continuation_ids), a stream's deltas are
    those the uninterrupted stream had from there on, leading spaces and characters spelt in
    byte tokens included."""
    prompt, rest = sp_tokenizer.encode("Hello"), sp_tokenizer.encode(SENTENCE)[1:]
    assert any(str(sp_tokenizer.inner.id_to_token(i)).startswith("<0x") for i in rest)
    whole = deltas(accept_all(sequence(loop, sp_tokenizer, prompt, max_tokens=len(rest)), rest))
    assert "".join(whole) == _after_prompt(sp_tokenizer, prompt, rest) == SENTENCE[len("Hello") :]
    for delivered in range(1, len(rest)):
        resumed = sequence(
            loop, sp_tokenizer, prompt, max_tokens=len(rest), continuation=tuple(rest[:delivered])
        )
        assert deltas(accept_all(resumed, rest[delivered:])) == whole[delivered:]


def test_a_prompt_ending_in_special_tokens_keeps_the_first_tokens_leading_space(
    loop: asyncio.AbstractEventLoop, sp_tokenizer: Tokenizer
) -> None:
    """Prompt "Hello" and then five </s> (special, decoding to nothing), generated "▁world":
    the stream says " world", as decode(prompt + generated) continues the text before them,
    however many special tokens end the prompt."""
    eos = sp_tokenizer.token_id("</s>")
    assert eos is not None
    assert sp_tokenizer.decode([eos]) == ""
    ids = sp_tokenizer.encode("Hello") + [eos] * 5
    generated = sp_tokenizer.encode(" world")[-1:]
    events = accept_all(sequence(loop, sp_tokenizer, ids, max_tokens=1), generated)
    assert deltas(events) == [" world"] == [_after_prompt(sp_tokenizer, ids, generated)]


def test_an_added_tokens_bytes_are_the_text_it_streams(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    """A non-special added token "▁foo" streams " foo" (the decoder turns its "▁" into a space,
    added tokens too): its logprobs bytes are b" foo", the bytes of that text, not of "▁foo"."""
    folder = sentencepiece.write(tmp_path, "llama2")
    inner = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    inner.add_tokens([tokenizers.AddedToken("▁foo", special=False, normalized=False)])
    inner.save(str(folder / "tokenizer.json"))
    tokenizer = Tokenizer.from_dir(folder)
    foo = tokenizer.token_id("▁foo")
    assert foo is not None
    events = accept_all(sequence(loop, tokenizer, tokenizer.encode("Hello"), max_tokens=1), [foo])
    assert deltas(events) == [" foo"]
    assert tokenizer.token_bytes(foo) == b" foo"


@pytest.mark.parametrize("prompt", ["Hello \ufffd", "a\ufffd", "Hello \ufffd world"])
def test_a_u_fffd_in_the_prompt_keeps_the_first_tokens_leading_space(
    loop: asyncio.AbstractEventLoop, sp_tokenizer: Tokenizer, prompt: str
) -> None:
    """A prompt whose text holds U+FFFD near its end (sent as such, not a cut character):
    generated "▁world" still says " world", as decode(prompt + generated) continues it."""
    ids = sp_tokenizer.encode(prompt)
    generated = sp_tokenizer.encode(" world")[-1:]
    events = accept_all(sequence(loop, sp_tokenizer, ids, max_tokens=1), generated)
    assert deltas(events) == [" world"] == [_after_prompt(sp_tokenizer, ids, generated)]


def test_a_stream_ending_inside_a_character_ends_with_u_fffd_after_the_prompt(
    sp_tokenizer: Tokenizer,
) -> None:
    """Generated "▁world" and the first byte of "é", then the end: the stream says " world"
    and, at the end, U+FFFD, as decode(prompt + generated) continues the prompt's text."""
    prompt = sp_tokenizer.encode("Hello")
    generated = [sp_tokenizer.encode(" world")[-1], sp_tokenizer.encode("é")[-2]]
    stream = TextStream.create(sp_tokenizer, ())
    stream.start_after(prompt)
    assert [stream.push(i)[0] for i in generated] == [" world", ""]
    assert stream.flush() == "\ufffd"
    assert _after_prompt(sp_tokenizer, prompt, generated) == " world\ufffd"


CHARACTER = st.characters(codec="utf-8", exclude_characters="\ufffd")
PROMPT_CHARACTER = st.one_of(CHARACTER, st.just("\ufffd"))


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_deltas_join_to_what_the_generated_ids_add_to_the_prompt(
    sp_tokenizer: Tokenizer, data: st.DataObject
) -> None:
    """For any prompt (U+FFFD in its text included) and any generated pieces, specials and
    characters spelt in byte tokens, the deltas and the final flush join to decode(prompt +
    generated) less decode(prompt)."""
    prompt = sp_tokenizer.encode(data.draw(st.text(PROMPT_CHARACTER, max_size=12), "prompt"))
    piece = st.sampled_from(
        [sp_tokenizer.token_id(p) for p in (*sentencepiece.SPECIALS, *sentencepiece.PIECES)]
    )
    spelt = CHARACTER.map(lambda c: [sp_tokenizer.token_id(f"<0x{b:02X}>") for b in c.encode()])
    units = data.draw(st.lists(st.one_of(piece.map(lambda i: [i]), spelt), max_size=12))
    generated = [i for unit in units for i in unit if i is not None]
    stream = TextStream.create(sp_tokenizer, ())
    stream.start_after(prompt)
    text = "".join(stream.push(i)[0] for i in generated) + stream.flush()
    assert text == _after_prompt(sp_tokenizer, prompt, generated)


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.data())
def test_byte_level_deltas_do_not_change_after_a_prompt(
    tokenizer: Tokenizer, data: st.DataObject
) -> None:
    """Byte-level BPE (the bundled model's): for any prompt and any ids, the deltas decoded
    after the prompt are those decoded with no prompt, one by one."""
    prompt = tokenizer.encode(data.draw(st.text(max_size=12), "prompt"))
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=24), "ids")
    alone, after = TextStream.create(tokenizer, ()), TextStream.create(tokenizer, ())
    after.start_after(prompt)
    assert [after.push(i)[0] for i in ids] == [alone.push(i)[0] for i in ids]
    assert after.flush() == alone.flush()
