"""Text safety: whole UTF-8 characters only, and stop strings never leak, end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer, collect, start_server
from tests.fakes import ScriptedModel
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import StopMatcher, TextStream, Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

pytestmark = pytest.mark.compute

MIXED = "print('héllo 🐍🚀 世界 данные')  # ✓ ok"
PROMPT = "say:"


def test_byte_level_tokens_split_multibyte_characters(tokenizer: Tokenizer) -> None:
    """The chosen text really exercises split characters (else the next tests prove nothing)."""
    ids = tokenizer.encode(MIXED)
    assert any("\ufffd" in tokenizer.inner.decode([i]) for i in ids)


def test_text_stream_emits_whole_characters_that_reassemble_exactly(tokenizer: Tokenizer) -> None:
    """Deltas never contain U+FFFD and join to tokenizer.decode(all ids)."""
    ids = tokenizer.encode(MIXED)
    stream = TextStream.create(tokenizer, ())
    deltas = [stream.push(i)[0] for i in ids]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + stream.flush() == tokenizer.decode(ids) == MIXED


@settings(max_examples=400, deadline=None, database=None)
@given(data=st.data())
def test_deltas_of_any_ids_join_to_the_full_decode(
    tokenizer: Tokenizer, data: st.DataObject
) -> None:
    """For any ids (byte tokens that form no character included), the deltas and the final
    flush join to tokenizer.decode(ids): a character split over tokens arrives whole, bytes
    that form none appear as U+FFFD exactly where the full decode has it, nothing is lost."""
    partial = [i for i in range(tokenizer.vocab_size) if "\ufffd" in tokenizer.inner.decode([i])]
    token = st.one_of(st.sampled_from(partial), st.integers(0, tokenizer.vocab_size - 1))
    ids = data.draw(st.lists(token, max_size=24))
    stream = TextStream.create(tokenizer, ())
    deltas = [stream.push(i)[0] for i in ids]
    assert "".join(deltas) + stream.flush() == tokenizer.decode(ids)


def test_a_stream_ending_inside_a_character_ends_with_u_fffd(tokenizer: Tokenizer) -> None:
    """Ids that end with the first bytes of a character: the flush releases U+FFFD for them,
    as the full decode shows, instead of dropping them."""
    ids = tokenizer.encode("ok 🐍")[:-1]
    stream = TextStream.create(tokenizer, ())
    deltas = [stream.push(i)[0] for i in ids]
    assert "".join(deltas) == "ok "
    assert stream.flush() == "\ufffd" == tokenizer.decode(ids).removeprefix("ok ")


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "matched"),
    [
        (["ab", "c<", "/e", "nd>tail"], ("</end>",), "abc", "</end>"),
        (["hello wo", "rld"], ("world",), "hello ", "world"),
        (["x<", "y"], ("<z>",), "x<y", None),
        (["aaa", "ab"], ("aab",), "aa", "aab"),
    ],
)
def test_stop_matcher_withholds_partial_stops(
    pieces: list[str], stops: tuple[str, ...], emitted: str, matched: str | None
) -> None:
    """Text that could start a stop string is held until it cannot; a match cuts the output."""
    assert _matched(StopMatcher(stops), pieces) == (emitted, matched)


def _matched(
    matcher: StopMatcher, pieces: list[str], armed_from: int = 0
) -> tuple[str, str | None]:
    """The text the matcher lets out of `pieces` (armed from piece `armed_from` on) and the
    stop string it found, if any."""
    out = ""
    for i, piece in enumerate(pieces):
        text, found = matcher.push(piece, armed=i >= armed_from)
        out += text
        if found:
            return out, found
    return out + matcher.flush(), None


@pytest.mark.parametrize(
    ("pieces", "armed_from", "emitted", "matched"),
    [
        # A stop string complete before the matcher is armed goes out as text.
        (["x", "ab", "y", "ab", "z"], 3, "xaby", "ab"),
        # One that begins before and ends after the arming matches.
        (["xa", "b", "c"], 1, "x", "ab"),
        # A stop string inside an ignored one, ending armed, matches where it begins.
        (["a", "a", "a"], 2, "a", "aa"),
        # Never armed within the text: nothing stops, nothing is lost.
        (["ab", "ab"], 5, "abab", None),
    ],
)
def test_a_stop_matcher_before_min_tokens_lets_stop_strings_through(
    pieces: list[str], armed_from: int, emitted: str, matched: str | None
) -> None:
    """Pushed unarmed (before min_tokens), text holding a stop string is emitted, not cut; once
    armed, a stop string that ends in the new text stops it, wherever it began."""
    assert _matched(StopMatcher(("ab", "aa")), pieces, armed_from) == (emitted, matched)


async def test_min_tokens_holds_back_stop_strings(
    scripted: RunningServer, tokenizer: Tokenizer
) -> None:
    """A stop string that completes within min_tokens does not end the stream (as in vLLM):
    the stream goes on and stops at the next one after min_tokens."""
    ids, first = tokenizer.encode(MIXED), MIXED.index("l")
    min_tokens = next(n for n in range(1, len(ids)) if len(tokenizer.decode(ids[:n])) > first)
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=200, stop=["l"], min_tokens=min_tokens)
    messages = await _stream(scripted, request)
    text = "".join(m.token.text for m in messages if m.WhichOneof("event") == "token")
    assert text == MIXED[: MIXED.index("l", first + 1)]
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE


@pytest.fixture
async def scripted(spec: ModelSpec, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    """A server whose model always continues PROMPT with MIXED followed by '<END>more'."""
    continuation = tokenizer.encode(MIXED + "<END>more")
    model = ScriptedModel.continuing(spec, len(tokenizer.encode(PROMPT)), continuation)
    running = await start_server(model, tokenizer)
    yield running
    await running.server.drain()


async def _stream(running: RunningServer, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(running.target) as channel:
        return await collect(pb_grpc.GenerationServiceStub(channel), request)


async def test_multibyte_text_reassembles_exactly_through_the_server(
    scripted: RunningServer, tokenizer: Tokenizer
) -> None:
    """Emoji and CJK split over byte-level tokens arrive whole and join to the exact text."""
    count = len(tokenizer.encode(MIXED))
    messages = await _stream(scripted, pb.GenerateRequest(prompt=PROMPT, max_tokens=count))
    deltas = [m.token.text for m in messages if m.WhichOneof("event") == "token"]
    assert len(deltas) == count
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == MIXED


async def test_stop_string_split_across_tokens_never_leaks(
    scripted: RunningServer, tokenizer: Tokenizer
) -> None:
    """No delta carries any part of the stop string; the completion names it."""
    messages = await _stream(
        scripted, pb.GenerateRequest(prompt=PROMPT, max_tokens=200, stop=["<END>"])
    )
    deltas = [m.token.text for m in messages if m.WhichOneof("event") == "token"]
    assert len(tokenizer.encode("<END>")) > 1
    assert "".join(deltas) == MIXED
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert messages[-1].completion.stop_sequence == "<END>"


async def test_eos_ends_the_stream_with_stop(scripted: RunningServer) -> None:
    """When the model emits EOS the stream ends with FINISH_REASON_STOP and the text so far."""
    messages = await _stream(scripted, pb.GenerateRequest(prompt=PROMPT, max_tokens=200))
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_STOP
    assert "".join(m.token.text for m in messages if m.WhichOneof("event") == "token") == (
        MIXED + "<END>more"
    )


async def test_a_stream_ending_after_part_of_a_character_ends_with_u_fffd(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """When EOS follows the first bytes of a character, the stream's text ends with U+FFFD for
    them, as the full decode does, rather than losing them."""
    continuation = tokenizer.encode("ok 🐍")[:-1]
    model = ScriptedModel.continuing(spec, len(tokenizer.encode(PROMPT)), continuation)
    running = await start_server(model, tokenizer)
    try:
        messages = await _stream(running, pb.GenerateRequest(prompt=PROMPT, max_tokens=50))
    finally:
        await running.server.drain()
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_STOP
    text = "".join(m.token.text for m in messages if m.WhichOneof("event") == "token")
    assert text == tokenizer.decode(continuation) == "ok \ufffd"
