"""Logprobs at the edge: always numbers JSON can carry, and streamed offsets that add up.

A model whose logits are -inf for most of its vocabulary (masked tokens) and NaN for one id
is served behind a real server and edge: whole OpenAI responses, OpenAI stream chunks and
native SSE events hold finite logprobs (never below -9999, vLLM's floor) and list only tokens
with probability as alternatives. The edge floors what a server sends as well, for servers
that send -inf or NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import MODEL, RunningEdge, start_edge, start_server
from tests.fakes import ScriptedModel
from tokenwire.client.messages import Token, TopLogprob
from tokenwire.edge.logprob_json import LOGPROB_FLOOR
from tokenwire.edge.native_format import native_event
from tokenwire.edge.openai_format import logprobs
from tokenwire.server.engine import ModelSpec
from tokenwire.server.engine.logits import HostLogits, Logits
from tokenwire.server.engine.types import FloatArray
from tokenwire.server.tokenizer import Tokenizer

LIKELY = [400, 401, 402]
CHAT = [{"role": "user", "content": "hi"}]


class MaskedModel(ScriptedModel):
    """Logits of -inf but for three ids (3.0, 2.0, 1.0) and a NaN at id 300."""

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Logits, list[FloatArray]]:
        logits, present = super().forward(*args, **kwargs)
        masked = np.full_like(logits.host(), -np.inf)
        masked[:, LIKELY] = [3.0, 2.0, 1.0]
        masked[:, 300] = np.nan
        return HostLogits(masked), present


@pytest.fixture(scope="module")
async def masked(spec: ModelSpec, tokenizer: Tokenizer) -> AsyncIterator[httpx.AsyncClient]:
    """An edge in front of a server of the masked model."""
    server = await start_server(MaskedModel(spec, {}), tokenizer)
    edge = await start_edge(server.target, resume_window_s=0.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
            yield client
    finally:
        await edge.edge.stop()
        await server.server.drain()


def _strict(text: str) -> Any:
    """JSON as a standard decoder reads it: NaN, Infinity and -Infinity are refused."""

    def refuse(literal: str) -> None:
        raise AssertionError(f"{literal} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _data(body: str) -> list[Any]:
    """The JSON of every SSE data line but [DONE]."""
    lines = [line.removeprefix("data:").strip() for line in body.splitlines()]
    return [_strict(line) for line in lines if line.startswith(("{", "[")) and line != "[DONE]"]


def _finite(value: float) -> bool:
    return math.isfinite(value) and LOGPROB_FLOOR <= value <= 0


async def test_a_whole_chat_response_with_masked_logits_lists_only_likely_alternatives(
    masked: httpx.AsyncClient,
) -> None:
    """A whole chat response asking for 5 alternatives is a 200 of standard JSON: each token's
    logprob finite, its alternatives the three tokens with probability."""
    response = await masked.post(
        "/v1/chat/completions",
        json={"messages": CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": 5},
    )
    assert response.status_code == 200, response.text
    content = _strict(response.text)["choices"][0]["logprobs"]["content"]
    assert len(content) == 2
    for entry in content:
        assert _finite(entry["logprob"])
        assert len(entry["top_logprobs"]) == len(LIKELY)
        assert all(_finite(a["logprob"]) for a in entry["top_logprobs"])


async def test_streamed_completion_chunks_with_masked_logits_are_standard_json(
    masked: httpx.AsyncClient,
) -> None:
    """Every chunk of a completions stream asking for 5 alternatives is standard JSON (no NaN,
    no -Infinity), with finite logprobs and the three tokens with probability listed."""
    response = await masked.post(
        "/v1/completions",
        json={"prompt": "x", "max_tokens": 2, "logprobs": 5, "stream": True},
    )
    assert response.status_code == 200, response.text
    chunks = [c for c in _data(response.text) if c["choices"] and c["choices"][0]["logprobs"]]
    assert len(chunks) == 2
    for chunk in chunks:
        probs = chunk["choices"][0]["logprobs"]
        assert all(_finite(p) for p in probs["token_logprobs"])
        assert [len(alternatives) for alternatives in probs["top_logprobs"]] == [len(LIKELY)]


async def test_native_token_events_with_masked_logits_are_standard_json(
    masked: httpx.AsyncClient,
) -> None:
    """Native SSE token events asking for 5 alternatives are standard JSON, with finite
    logprobs and the three tokens with probability listed."""
    response = await masked.post(
        "/v1/generate",
        json={"prompt": "x", "max_tokens": 2, "logprobs": True, "top_logprobs": 5},
    )
    assert response.status_code == 200, response.text
    tokens = [d for d in _data(response.text) if "logprob" in d]
    assert len(tokens) == 2
    for token in tokens:
        assert _finite(token["logprob"])
        assert sorted(a["id"] for a in token["top_logprobs"]) == LIKELY


# What a server that reports raw values would send: a masked token chosen, -inf and NaN
# alternatives beside a likely one.
RAW = Token(
    text="a",
    id=5,
    index=0,
    logprob=-math.inf,
    top_logprobs=(
        TopLogprob(7, -0.25, "b"),
        TopLogprob(8, -math.inf, "c"),
        TopLogprob(9, math.nan, "d"),
    ),
    token_text="a",
)


def test_the_native_format_floors_non_finite_logprobs_a_server_sends() -> None:
    """A token event whose logprob is -inf reports -9999, and its -inf and NaN alternatives
    are left out."""
    _, data = native_event(RAW)
    assert data["logprob"] == LOGPROB_FLOOR
    assert data["top_logprobs"] == [{"id": 7, "logprob": -0.25, "text": "b"}]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_the_openai_format_floors_non_finite_logprobs_a_server_sends(chat: bool) -> None:
    """OpenAI logprobs of a token whose logprob is -inf report -9999 (completions list the
    sampled token too), and its -inf and NaN alternatives are left out."""
    body = _strict(json.dumps(logprobs([RAW], chat=chat)))
    if chat:
        [entry] = body["content"]
        assert entry["logprob"] == LOGPROB_FLOOR
        assert [a["token"] for a in entry["top_logprobs"]] == ["b"]
    else:
        assert body["token_logprobs"] == [LOGPROB_FLOOR]
        assert body["top_logprobs"] == [{"a": LOGPROB_FLOOR, "b": -0.25}]


@pytest.mark.parametrize("asked", [0, 1, 2])
async def test_completions_top_logprobs_list_the_sampled_token_and_the_most_likely(
    masked: httpx.AsyncClient, asked: int
) -> None:
    """/v1/completions with logprobs=N lists at each position the sampled token first and
    then the N most likely, as OpenAI and vLLM do (up to N+1 entries): here a bias makes the
    least likely of the three tokens with probability the sampled one."""
    response = await masked.post(
        "/v1/completions",
        json={
            "prompt": "x",
            "max_tokens": 2,
            "logprobs": asked,
            "temperature": 0,
            "logit_bias": {str(LIKELY[-1]): 100},
        },
    )
    assert response.status_code == 200, response.text
    probs = response.json()["choices"][0]["logprobs"]
    for sampled, listed in zip(probs["tokens"], probs["top_logprobs"], strict=True):
        assert next(iter(listed)) == sampled
        assert len(listed) == asked + 1


async def test_streamed_completion_text_offsets_count_each_choices_text(
    edge: RunningEdge,
) -> None:
    """The text_offset of each streamed completions chunk is where its token starts in its own
    choice's text: two streamed choices each give the offsets of the whole response."""
    body = {"model": MODEL, "prompt": "def f():", "max_tokens": 8, "temperature": 0}
    body |= {"logprobs": 1, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
        whole = await client.post("/v1/completions", json=body)
        streamed = await client.post("/v1/completions", json=body | {"stream": True, "n": 2})
    assert whole.status_code == streamed.status_code == 200
    expected = whole.json()["choices"][0]["logprobs"]["text_offset"]
    offsets: dict[int, list[int]] = {0: [], 1: []}
    for chunk in _data(streamed.text):
        for choice in chunk["choices"]:
            if choice["logprobs"] is not None:
                offsets[choice["index"]] += choice["logprobs"]["text_offset"]
    assert len(expected) == 8
    assert expected[-1] > 0
    assert offsets == {0: expected, 1: expected}


async def test_text_offsets_of_a_character_spelt_in_byte_tokens_point_into_the_text(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """ "a", the four byte tokens of "😀", then "b": every completions text_offset points into
    the choice's text, streamed as whole: the byte tokens at the emoji, "b" right after it
    (not four characters on, where the tokens' own texts, U+FFFD each, would put it)."""
    emoji = [_byte_token(tokenizer, value) for value in "😀".encode()]
    text, whole, streamed = await _offsets_around(spec, tokenizer, emoji)
    assert text == "a😀b"
    assert whole == [0, 1, 1, 1, 1, 2] == streamed


async def test_a_token_after_a_character_broken_off_starts_after_its_replacement(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """ "a", the first byte of "😀" alone, then "b": the text is "a\ufffdb" and "b" starts at
    2, after the U+FFFD the broken-off byte became, streamed as whole."""
    lead = _byte_token(tokenizer, "😀".encode()[0])
    text, whole, streamed = await _offsets_around(spec, tokenizer, [lead])
    assert text == "a\ufffdb"
    assert whole == [0, 1, 2] == streamed


async def _offsets_around(
    spec: ModelSpec, tokenizer: Tokenizer, middle: list[int]
) -> tuple[str, list[int], list[int]]:
    """A completion of "a", the `middle` ids, then "b" from a scripted model, with logprobs:
    its text and its text_offset list, whole and streamed."""
    a, b = tokenizer.token_id("a"), tokenizer.token_id("b")
    assert a is not None
    assert b is not None
    prompt = tokenizer.encode("x = ")
    model = ScriptedModel.continuing(spec, len(prompt), [a, *middle, b])
    running = await start_server(model, tokenizer)
    edge = await start_edge(running.target)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": len(middle) + 2, "logprobs": 0}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            whole = (await http.post("/v1/completions", json=body)).json()["choices"][0]
            streamed = await _streamed_offsets(http, body | {"stream": True})
    finally:
        await edge.edge.stop()
        await running.server.drain()
    return whole["text"], whole["logprobs"]["text_offset"], streamed


async def _streamed_offsets(http: httpx.AsyncClient, body: dict[str, Any]) -> list[int]:
    offsets: list[int] = []
    async with aconnect_sse(http, "POST", "/v1/completions", json=body) as source:
        async for event in source.aiter_sse():
            if event.data != "[DONE]":
                for choice in json.loads(event.data)["choices"]:
                    if choice["logprobs"]:
                        offsets += choice["logprobs"]["text_offset"]
    return offsets


def _byte_token(tokenizer: Tokenizer, byte: int) -> int:
    return next(i for i in range(tokenizer.vocab_size) if tokenizer.token_bytes(i) == bytes([byte]))
