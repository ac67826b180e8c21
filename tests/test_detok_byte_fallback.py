"""Byte-fallback tokenizers (Llama 2, Mistral, Gemma): bytes that form no character with the
bytes before them never fail a request; they come out as U+FFFD where they come."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import sentencepiece
from tests.conftest import collect, start_server
from tests.fakes import ScriptedModel
from tests.sequences import accept_all, completion, deltas, sequence
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.domain import CompletionEvent, FinishReason
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import TextStream, Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def llama2(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(sentencepiece.write(tmp_path_factory.mktemp("llama2"), "llama2"))


def _ids(tokenizer: Tokenizer, *tokens: str) -> list[int]:
    ids = [tokenizer.token_id(token) for token in tokens]
    assert None not in ids
    return [i for i in ids if i is not None]


def _stray(tokenizer: Tokenizer) -> list[int]:
    """ "a", a newline (as Llama 2 spells it: the byte token <0x0A>), a stray continuation byte,
    "o", "b": the full decode shows the run <0x0A><0x85> as two U+FFFD, after "\\n" went out."""
    return _ids(tokenizer, "a", "<0x0A>", "<0x85>", "o", "b")


def test_a_stray_byte_after_a_byte_spelt_character_does_not_fail_the_request(
    loop: asyncio.AbstractEventLoop, llama2: Tokenizer
) -> None:
    """The stray byte shows as U+FFFD where it came, the newline already sent stays, and the
    request goes on to its end."""
    generated = _stray(llama2)
    seq = sequence(loop, llama2, llama2.encode("Hello"), max_tokens=len(generated))
    events = accept_all(seq, generated)
    assert seq.error is None
    assert deltas(events) == ["a", "\n", "", "\ufffdo", "b"]
    assert completion(events) == CompletionEvent(FinishReason.LENGTH)


def test_the_same_ids_as_a_continuation_resume_the_stream(
    loop: asyncio.AbstractEventLoop, llama2: Tokenizer
) -> None:
    """Resumed with those ids delivered (continuation_ids), the stream is built and goes on
    with the uninterrupted stream's text."""
    generated = _stray(llama2)
    seq = sequence(
        loop, llama2, llama2.encode("Hello"), max_tokens=8, continuation=tuple(generated[:4])
    )
    assert deltas(accept_all(seq, generated[4:])) == ["b"]


def test_a_stream_ending_on_a_stray_byte_ends_with_one_u_fffd(llama2: Tokenizer) -> None:
    """ "é" spelt in byte tokens, a stray byte, then the end: the flush gives one U+FFFD for the
    stray byte; the bytes of the "é" already sent are not counted again (the full decode shows
    all three bytes as U+FFFD)."""
    stream = TextStream.create(llama2, ())
    assert [stream.push(i)[0] for i in _ids(llama2, "<0xC3>", "<0xA9>", "<0x85>")] == ["", "é", ""]
    assert stream.flush() == "\ufffd"


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_any_ids_decode_without_failing(llama2: Tokenizer, data: st.DataObject) -> None:
    """For any ids, byte tokens in any order included, every step and the flush give text, and
    ids that spell whole characters give the full decode's text."""
    byte = st.integers(0, 255).map(lambda b: llama2.token_id(f"<0x{b:02X}>"))
    token = st.one_of(byte, st.integers(0, llama2.vocab_size - 1))
    ids = [i for i in data.draw(st.lists(token, max_size=24)) if i is not None]
    stream = TextStream.create(llama2, ())
    text = "".join(stream.push(i)[0] for i in ids) + stream.flush()
    full = llama2.decode(ids)
    assert text == full or "\ufffd" in full


async def test_the_server_streams_and_resumes_through_stray_bytes(llama2: Tokenizer) -> None:
    """Through a real server: the generation that meets a stray byte ends normally (it failed
    with INTERNAL), and the same ids as continuation_ids resume it (it failed with UNKNOWN)."""
    prompt, generated = llama2.encode("Hello"), _stray(llama2)
    eos = llama2.token_id("</s>")
    assert eos is not None
    spec = dataclasses.replace(
        ModelSpec.from_dir(BUNDLED_MODEL_DIR),
        vocab_size=llama2.vocab_size,
        eos_token_ids=frozenset({eos}),
    )
    running = await start_server(ScriptedModel.continuing(spec, len(prompt), generated), llama2)
    fresh = pb.GenerateRequest(prompt="Hello", max_tokens=20)
    resumed = pb.GenerateRequest(prompt="Hello", max_tokens=20, continuation_ids=generated[:4])
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            streams = [await collect(stub, request) for request in (fresh, resumed)]
    finally:
        await running.server.drain()
    texts = ["".join(m.token.text for m in s if m.WhichOneof("event") == "token") for s in streams]
    assert texts == ["a\n\ufffdob", "b"]
    assert [s[-1].completion.finish_reason for s in streams] == [pb.FINISH_REASON_STOP] * 2
