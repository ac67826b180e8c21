"""Logprobs carry each token's own bytes, so tokens that split a character join back into it.

A token that holds only part of a multi-byte UTF-8 character reads U+FFFD as text; its bytes
are the part it holds. The tokenizer gives them (byte-level BPE through GPT-2's byte alphabet,
SentencePiece byte fallback `<0xNN>` as its byte, `▁` as a space), the server sends them with
logprobs, and the edge serves them as OpenAI's `bytes` and in native token events, which the
resume store keeps. The end-to-end tests run a real server, whose scripted model emits the
tokens of a text with accents and an emoji, behind a real edge.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests import sentencepiece
from tests.conftest import MODEL, RunningServer, start_edge, start_server
from tests.fakes import ScriptedModel
from tests.redisproc import RedisServer
from tokenwire.client.messages import Token
from tokenwire.edge.openai_format import logprobs
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer

TEXT = "wörld 🐍 naïve café"
"""Two- and four-byte characters, each split over several tokens of the bundled tokenizer."""
TEXTS = (TEXT, "déjà vu ✓ 日本語 😀👍🏽", "Ünïcödé\n\t¿¡ —«»")
PROMPT_IDS = [5, 6, 7]


def _joined(token_bytes: list[list[int]]) -> str:
    return bytes(b for one in token_bytes for b in one).decode("utf-8")


def test_byte_level_tokens_that_split_a_character_hold_its_bytes(tokenizer: Tokenizer) -> None:
    """Each bundled-tokenizer token of "ö" and of "🐍" (text U+FFFD alone) holds a part of
    the character's UTF-8, and the parts join into it."""
    for character in ("ö", "🐍"):
        ids = tokenizer.encode(character)
        assert len(ids) > 1
        assert {tokenizer.token_text(i) for i in ids} == {"\ufffd"}
        assert b"".join(tokenizer.token_bytes(i) for i in ids) == character.encode()


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_token_bytes_of_a_text_join_into_its_utf8(
    tokenizer: Tokenizer, text: str
) -> None:
    """The bundled tokenizer's token_bytes of encode(text), joined, are text's UTF-8."""
    assert b"".join(tokenizer.token_bytes(i) for i in tokenizer.encode(text)) == text.encode()


def test_every_byte_level_token_bytes_decode_as_its_text(tokenizer: Tokenizer) -> None:
    """Across the bundled vocabulary (special tokens included) a token's bytes, decoded with
    U+FFFD for what is only part of a character, are its token_text: the decoder agrees."""
    for token_id in range(tokenizer.vocab_size):
        own = tokenizer.token_bytes(token_id)
        assert own.decode("utf-8", "replace") == tokenizer.token_text(token_id), token_id


@pytest.mark.parametrize("layout", sorted(sentencepiece.LAYOUTS))
def test_a_sentencepiece_piece_keeps_the_space_its_meta_symbol_stands_for(
    tmp_path: Path, layout: str
) -> None:
    """In a SentencePiece layout, the bytes of "▁Hello" are " Hello" and of "▁" a space."""
    tokenizer = Tokenizer.from_dir(sentencepiece.write(tmp_path, layout))
    hello, space = tokenizer.token_id("▁Hello"), tokenizer.token_id("▁")
    assert hello is not None
    assert space is not None
    assert (tokenizer.token_bytes(hello), tokenizer.token_bytes(space)) == (b" Hello", b" ")


@pytest.mark.parametrize("layout", sorted(sentencepiece.LAYOUTS))
def test_a_sentencepiece_byte_fallback_token_is_its_byte(tmp_path: Path, layout: str) -> None:
    """In a SentencePiece layout, `<0xNN>` is the byte NN (`<0xC3>` is b"\\xc3", not the
    U+FFFD its text reads), so the byte tokens of "ö" join into it."""
    tokenizer = Tokenizer.from_dir(sentencepiece.write(tmp_path, layout))
    for byte in (0x0A, 0x41, 0xC3, 0xB6, 0xF0):
        token_id = tokenizer.token_id(f"<0x{byte:02X}>")
        assert token_id is not None
        assert tokenizer.token_bytes(token_id) == bytes([byte])
    pieces = [tokenizer.inner.id_to_token(i) for i in tokenizer.encode("ö")]
    assert pieces[-2:] == ["<0xC3>", "<0xB6>"]
    assert b"".join(tokenizer.token_bytes(i) for i in tokenizer.encode("ö")[-2:]) == b"\xc3\xb6"


def test_openai_bytes_of_a_server_that_sends_none_are_the_token_texts_utf8() -> None:
    """A Token without token_bytes (a server that predates them) gets its own text's UTF-8 as
    OpenAI's bytes, as before."""
    token = Token(text="", id=5, index=0, logprob=-0.5, token_text="é")
    assert logprobs([token], chat=True)["content"][0]["bytes"] == [0xC3, 0xA9]


@dataclasses.dataclass
class Scripted:
    """A scripted model (the tests set its script) behind a real server."""

    model: ScriptedModel
    server: RunningServer

    def answer(self, prompt_tokens: int, text: str, tokenizer: Tokenizer) -> int:
        """After a prompt of prompt_tokens tokens, the model generates text's tokens, then EOS;
        return how many tokens text has (a max_tokens that ends the stream before the EOS,
        whose logprob entry is the token's own text, `<|endoftext|>`, and no content)."""
        ids = tokenizer.encode(text)
        self.model.script = {prompt_tokens + i: token for i, token in enumerate(ids)}
        return len(ids)


@pytest.fixture(scope="module")
async def scripted(spec: ModelSpec, tokenizer: Tokenizer) -> AsyncIterator[Scripted]:
    model = ScriptedModel(spec, {})
    server = await start_server(model, tokenizer)
    yield Scripted(model, server)
    await server.server.drain()


@pytest.fixture
async def edge_client(scripted: Scripted) -> AsyncIterator[httpx.AsyncClient]:
    """An edge (in-memory resume store) in front of the scripted server."""
    edge = await start_edge(scripted.server.target, resume_window_s=2.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
            yield client
    finally:
        await edge.edge.stop()


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}


async def _script_chat(
    client: httpx.AsyncClient, scripted: Scripted, tokenizer: Tokenizer
) -> dict[str, Any]:
    """Script the model to answer CHAT with TEXT (the rendered prompt's length is what a first
    call, the script empty, reports as prompt_tokens); return CHAT with max_tokens ending the
    answer at TEXT's last token."""
    scripted.model.script = {}
    probe = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1})
    assert probe.status_code == 200, probe.text
    length = scripted.answer(probe.json()["usage"]["prompt_tokens"], TEXT, tokenizer)
    return {**CHAT, "max_tokens": length}


async def test_chat_logprobs_bytes_join_into_the_content(
    scripted: Scripted, edge_client: httpx.AsyncClient, tokenizer: Tokenizer
) -> None:
    """A whole chat response whose content has characters split over tokens: the `bytes` of
    its logprobs, joined across tokens, decode to the content."""
    body = await _script_chat(edge_client, scripted, tokenizer)
    response = await edge_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == TEXT
    assert _joined([e["bytes"] for e in choice["logprobs"]["content"]]) == TEXT


async def test_streamed_chat_logprobs_bytes_join_into_the_content(
    scripted: Scripted, edge_client: httpx.AsyncClient, tokenizer: Tokenizer
) -> None:
    """A streamed chat answer's chunks: the `bytes` of their logprobs, joined across chunks,
    decode to the streamed content."""
    body = {**await _script_chat(edge_client, scripted, tokenizer), "stream": True}
    content, entries = "", []
    async with aconnect_sse(edge_client, "POST", "/v1/chat/completions", json=body) as source:
        async for event in source.aiter_sse():
            if event.data == "[DONE]":
                break
            choices = json.loads(event.data)["choices"]
            if choices and choices[0]["logprobs"]:
                content += choices[0]["delta"].get("content", "")
                entries += choices[0]["logprobs"]["content"]
    assert content == TEXT
    assert _joined([e["bytes"] for e in entries]) == TEXT


async def test_chat_top_logprobs_carry_each_alternatives_bytes(
    scripted: Scripted, edge_client: httpx.AsyncClient, tokenizer: Tokenizer
) -> None:
    """Chat top_logprobs: the most likely alternative at each position (the scripted token)
    has the token's own bytes, those of a token that splits a character included."""
    body = {**await _script_chat(edge_client, scripted, tokenizer), "top_logprobs": 2}
    response = await edge_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    expected = [list(tokenizer.token_bytes(i)) for i in tokenizer.encode(TEXT)]
    assert [e["top_logprobs"][0]["bytes"] for e in content] == expected


NATIVE = {"prompt_ids": PROMPT_IDS, "logprobs": True, "top_logprobs": 1}


async def _native_tokens(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> tuple[str, list[Any]]:
    """A native stream's request id and the data of its token events."""
    async with aconnect_sse(client, method, url, **kwargs) as source:
        events = [e async for e in source.aiter_sse()]
    request_id = events[0].id.rsplit(":", 1)[0]
    return request_id, [json.loads(e.data) for e in events if e.event == "token"]


async def _check_replayed_bytes(
    client: httpx.AsyncClient, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    """Start a native stream of TEXT, then replay it from the resume store: the replayed token
    events carry the same token_bytes (and alternatives' bytes), which join into TEXT."""
    body = {**NATIVE, "max_tokens": scripted.answer(len(PROMPT_IDS), TEXT, tokenizer)}
    request_id, live = await _native_tokens(client, "POST", "/v1/generate", json=body)
    _, replayed = await _native_tokens(client, "GET", f"/v1/generate/{request_id}/events")
    assert _joined([t["token_bytes"] for t in live]) == TEXT
    assert [t["token_bytes"] for t in replayed] == [t["token_bytes"] for t in live]
    alternatives = [[a["token_bytes"] for a in t["top_logprobs"]] for t in replayed]
    assert alternatives == [[t["token_bytes"]] for t in live]


async def test_a_replayed_native_stream_carries_the_same_token_bytes(
    scripted: Scripted, edge_client: httpx.AsyncClient, tokenizer: Tokenizer
) -> None:
    """A native stream replayed from the in-memory resume store has the token_bytes the live
    stream had (its alternatives' too), and they join into the generated text."""
    await _check_replayed_bytes(edge_client, scripted, tokenizer)


async def test_a_native_stream_replayed_from_redis_carries_the_same_token_bytes(
    scripted: Scripted, redis_server: RedisServer, tokenizer: Tokenizer
) -> None:
    """A native stream replayed from the Redis resume store has the token_bytes the live
    stream had (its alternatives' too), and they join into the generated text."""
    target = scripted.server.target
    edge = await start_edge(target, resume_store=redis_server.url, resume_window_s=2.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
            await _check_replayed_bytes(client, scripted, tokenizer)
    finally:
        await edge.edge.stop()
