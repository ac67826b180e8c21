"""OpenAI semantics of the edge, through the official openai SDK against a real edge and server:
model ids, max_tokens, n choices, refused and accepted fields, OpenAI error bodies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import (
    MODEL,
    RunningEdge,
    RunningServer,
    eventually,
    start_edge,
    start_server,
)
from tests.fakes import RecordingObserver, ScriptedModel
from tokenwire.edge.body import Fields
from tokenwire.edge.openai_request import chat_turns
from tokenwire.server.domain import FinishReason
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer

CHAT = [{"role": "user", "content": "Write a loop."}]
# EOS ignored: every choice runs to max_tokens, so token counts are known.
LONG = {"ignore_eos": True}


@pytest.fixture
async def sdk(edge: RunningEdge) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="unused", max_retries=0)
    yield client
    await client.close()


def _error(caught: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
    """The OpenAI error object of a refused call (the SDK unwraps `{"error": ...}`)."""
    body = caught.value.body
    assert isinstance(body, dict)
    assert set(body) == {"message", "type", "param", "code"}
    return body


async def _create(sdk: openai.AsyncOpenAI, chat: bool, stream: bool, **fields: Any) -> Any:
    """One chat or completions call; a stream is read to its end."""
    if chat:
        reply = await sdk.chat.completions.create(messages=CHAT, stream=stream, **fields)
    else:
        reply = await sdk.completions.create(prompt="def f():", stream=stream, **fields)
    if stream:
        return [chunk async for chunk in reply]
    return reply


ROUTES = [
    pytest.param(chat, stream, id=f"{'chat' if chat else 'completions'}-{mode}")
    for chat in (True, False)
    for stream, mode in ((False, "whole"), (True, "stream"))
]


@pytest.mark.parametrize(("chat", "stream"), ROUTES)
async def test_unknown_model_is_404_model_not_found(
    sdk: openai.AsyncOpenAI, chat: bool, stream: bool
) -> None:
    """A model that is neither served nor an alias is OpenAI's 404 model_not_found."""
    with pytest.raises(openai.NotFoundError) as caught:
        await _create(sdk, chat, stream, model="gpt-4o", max_tokens=2)
    error = _error(caught)
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "model",
        "model_not_found",
    )
    assert "gpt-4o" in error["message"]


async def test_alias_is_served_and_listed(served: RunningServer) -> None:
    """With TOKENWIRE_MODEL_ALIASES set, /v1/models lists each alias, retrieves it by id, and
    requests may use it."""
    edge = await start_edge(served.target, model_aliases=("gpt-3.5-turbo", "tiny"))
    try:
        async with openai.AsyncOpenAI(
            base_url=f"{edge.url}/v1", api_key="unused", max_retries=0
        ) as client:
            listed = [m.id for m in (await client.models.list()).data]
            retrieved = (await client.models.retrieve("tiny")).id
            reply = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
    finally:
        await edge.edge.stop()
    assert listed == [MODEL, "gpt-3.5-turbo", "tiny"]
    assert retrieved == "tiny"
    assert reply.model == MODEL
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize(("chat", "stream"), ROUTES)
async def test_max_tokens_zero_is_400(sdk: openai.AsyncOpenAI, chat: bool, stream: bool) -> None:
    """max_tokens (and chat's max_completion_tokens) below 1 is a 400 naming that field."""
    name = "max_completion_tokens" if chat else "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        await _create(sdk, chat, stream, model=MODEL, **{name: 0})
    error = _error(caught)
    assert (error["param"], error["code"]) == (name, "integer_below_min_value")


@pytest.mark.parametrize(("chat", "stream"), ROUTES)
async def test_server_limit_names_the_field_the_request_used(
    sdk: openai.AsyncOpenAI, chat: bool, stream: bool
) -> None:
    """A max_tokens above the server's cap is refused as an integer above its range, naming
    max_completion_tokens when the request used it."""
    name = "max_completion_tokens" if chat else "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        await _create(sdk, chat, stream, model=MODEL, **{name: 100_000})
    error = _error(caught)
    assert (error["param"], error["code"]) == (name, "integer_above_max_value")
    assert error["message"] == f"{name}: must be at most 512, got 100000"


async def test_each_streamed_chat_choice_opens_with_a_role_chunk_without_logprobs(
    sdk: openai.AsyncOpenAI,
) -> None:
    """A streamed chat choice starts, as OpenAI's and vLLM's do, with a chunk holding the role,
    empty content and no logprobs; its tokens follow one chunk each, so the SDKs' stream
    helpers (which start a choice from its first chunk) count each token's logprobs once."""
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        max_tokens=4,
        logprobs=True,
        stream=True,
    )
    by_choice: dict[int, list[Any]] = {0: [], 1: []}
    async for chunk in stream:
        for choice in chunk.choices:
            by_choice[choice.index].append(choice)
    for choices in by_choice.values():
        first = choices[0]
        assert (first.delta.role, first.delta.content, first.logprobs) == ("assistant", "", None)
        assert all(c.delta.role is None for c in choices[1:])
        entries = [e for c in choices[1:] if c.logprobs for e in c.logprobs.content or []]
        assert len(entries) == 4


async def test_a_refusal_that_refers_to_max_tokens_names_max_completion_tokens(
    sdk: openai.AsyncOpenAI,
) -> None:
    """A refusal of another field whose message refers to max_tokens (min_tokens above it)
    names max_completion_tokens there when the chat request used that field."""
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=4,
            extra_body={"min_tokens": 6},
        )
    error = _error(caught)
    assert error["param"] == "min_tokens"
    assert error["message"] == "min_tokens: must be at most max_completion_tokens (4), got 6"


@pytest.mark.parametrize(
    ("content", "max_tokens"),
    [("word " * 5000, 2), ("hi", 510)],
    ids=["prompt", "max_tokens"],
)
async def test_a_request_the_context_cannot_hold_is_context_length_exceeded(
    sdk: openai.AsyncOpenAI, content: str, max_tokens: int
) -> None:
    """A conversation longer than the context, or a max_tokens the context has no room for
    after the prompt, is a 400 with OpenAI's code context_length_exceeded, which client
    libraries read as a context overflow."""
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens
        )
    error = _error(caught)
    assert error["code"] == "context_length_exceeded"
    assert "the context length" in error["message"]


BATCH = ["def a():", "class B:"]


async def _alone(sdk: openai.AsyncOpenAI, prompt: str | list[int], **fields: Any) -> Any:
    return await sdk.completions.create(model=MODEL, prompt=prompt, extra_body=LONG, **fields)


async def test_a_batch_of_prompts_numbers_choices_prompt_by_prompt(
    sdk: openai.AsyncOpenAI,
) -> None:
    """A completions batch (a list of prompts, as LangChain's OpenAI LLM sends them) with n=2
    answers 2 choices per prompt, indexed prompt by prompt, each the text its prompt gets
    alone; usage counts each prompt once and every choice's tokens."""
    fields: dict[str, Any] = {"max_tokens": 4, "temperature": 0}
    alone = [await _alone(sdk, prompt, **fields) for prompt in BATCH]
    reply = await _alone(sdk, BATCH, n=2, **fields)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    expected = [a.choices[0].text for a in alone for _ in range(2)]
    assert [c.text for c in reply.choices] == expected
    assert expected[0] != expected[2]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert reply.usage.completion_tokens == 16


async def test_a_streamed_batch_of_token_id_prompts_matches_each_alone(
    sdk: openai.AsyncOpenAI,
) -> None:
    """A streamed batch of token id prompts: each index's deltas join to the text its prompt
    gets alone, and the usage chunk sums the prompts' tokens."""
    batch = [[101, 102, 103], [104, 105]]
    fields: dict[str, Any] = {"max_tokens": 5, "temperature": 0}
    alone = [(await _alone(sdk, ids, **fields)).choices[0].text for ids in batch]
    stream = await _alone(sdk, batch, stream=True, stream_options={"include_usage": True}, **fields)
    texts = ["", ""]
    chunks = [chunk async for chunk in stream]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == alone
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 5


async def test_each_prompt_of_a_seeded_batch_samples_as_it_would_alone(
    sdk: openai.AsyncOpenAI,
) -> None:
    """With a seed, each prompt of a batch gets the text a request of that prompt alone with
    the same seed gets: batching does not change a seeded answer."""
    fields: dict[str, Any] = {"max_tokens": 8, "temperature": 1.0, "seed": 7}
    alone = [(await _alone(sdk, prompt, **fields)).choices[0].text for prompt in BATCH]
    reply = await _alone(sdk, BATCH, **fields)
    assert [c.text for c in reply.choices] == alone


async def test_a_batch_over_the_generation_limit_is_refused_naming_prompt(
    sdk: openai.AsyncOpenAI,
) -> None:
    """A batch whose prompts times n exceed the generations one request may open is a 400
    naming prompt, saying how many it asked for, before anything runs."""
    with pytest.raises(openai.BadRequestError) as caught:
        await _alone(sdk, ["x"] * 9, n=8, max_tokens=2)
    error = _error(caught)
    assert (error["param"], error["code"]) == ("prompt", "unsupported_value")
    assert "72 generations" in error["message"]


@pytest.mark.parametrize(
    ("prompt", "param"),
    [(["ok", 5], "prompt[1]"), (["ok", []], "prompt[1]"), ([], "prompt"), ({}, "prompt")],
    ids=["number", "empty-ids", "empty-list", "object"],
)
async def test_a_bad_prompt_is_refused_naming_the_entry(
    sdk: openai.AsyncOpenAI, prompt: Any, param: str
) -> None:
    """A prompt of the wrong shape is a 400 naming `prompt`, or the entry of a batch at
    fault (`prompt[1]`)."""
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert _error(caught)["param"] == param


@pytest.mark.parametrize(
    ("prompt", "param"),
    [
        ([[1, 2], [3, 10**9]], "prompt[1][1]"),
        (["def a():", "x" * 300_000], "prompt[1]"),
        ([5, 10**9], "prompt[1]"),
        ([[1, 2, 3, 10**9]], "prompt[0][3]"),
    ],
    ids=["batch-ids", "batch-text", "ids", "batch-of-one"],
)
async def test_a_prompt_the_server_refuses_is_named_by_its_place(
    sdk: openai.AsyncOpenAI, prompt: Any, param: str
) -> None:
    """A prompt the server refuses (an id past the vocabulary, a text past its size limit) is
    named by its place: the batch entry, and the id within it."""
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    error = _error(caught)
    assert error["param"] == param
    assert error["message"].startswith(f"{param}: ")


async def test_a_batch_max_tokens_refusal_names_the_prompt_it_overflows(
    sdk: openai.AsyncOpenAI,
) -> None:
    """A batch whose max_tokens one prompt's room in the context cannot hold is a 400 on
    max_tokens whose message names that prompt by its place (`prompt[1] has 401 tokens`)."""
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.completions.create(model=MODEL, prompt=["hi", "word " * 400], max_tokens=300)
    error = _error(caught)
    assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")
    assert ": prompt[1] has " in error["message"], error["message"]


@pytest.mark.parametrize(("prompt", "param"), [("", "prompt"), (["a", ""], "prompt[1]")])
async def test_an_empty_prompt_is_refused_as_empty(
    sdk: openai.AsyncOpenAI, prompt: Any, param: str
) -> None:
    """An empty completions prompt (alone or in a batch) is a 400 naming it that says it is
    empty."""
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    error = _error(caught)
    assert (error["param"], error["message"]) == (param, f"{param}: must not be empty")


async def test_a_refusal_keeps_the_value_it_echoes_as_sent(sdk: openai.AsyncOpenAI) -> None:
    """A refusal that echoes the caller's value keeps it as sent: field names inside it are
    not renamed as the refusal's own wording is (max_tokens -> max_completion_tokens)."""
    stop = "see max_tokens " * 8
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(
            model=MODEL, messages=CHAT, max_completion_tokens=4, stop=[stop]
        )
    error = _error(caught)
    assert error["param"].startswith("stop")
    assert "see max_tokens see max_tokens" in error["message"]
    assert "max_completion_tokens" not in error["message"]


async def test_a_refused_request_answers_with_its_request_id(sdk: openai.AsyncOpenAI) -> None:
    """A refused request's answer carries X-Request-ID (the caller's, where it sent a valid
    one), as OpenAI's errors do: the SDK's error has the id the edge's log line goes by."""
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            temperature=9,
            extra_headers={"X-Request-ID": "refused-1"},
        )
    assert caught.value.request_id == "refused-1"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_chat_prompt_refusal_names_messages(sdk: openai.AsyncOpenAI, stream: bool) -> None:
    """A conversation the server finds too long is refused naming `messages`, not `prompt`."""
    huge = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model=MODEL, messages=huge, max_tokens=2, stream=stream)
    assert _error(caught)["param"] == "messages"


async def test_n_whole_chat_returns_n_indexed_choices(sdk: openai.AsyncOpenAI) -> None:
    """n=3 returns three choices indexed 0..2; usage counts the prompt once and every
    choice's tokens."""
    reply = await sdk.chat.completions.create(
        model=MODEL, messages=CHAT, n=3, max_tokens=5, temperature=0, extra_body=LONG
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 1  # greedy: all alike
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 15
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 15


async def test_n_stream_interleaves_choices_and_sums_usage(sdk: openai.AsyncOpenAI) -> None:
    """Streamed n=3: every chunk names its choice, each choice gets its own role delta and
    finish chunk, its deltas join to the non-streamed text, and usage sums all choices."""
    whole = await sdk.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0, extra_body=LONG
    )
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        n=3,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=LONG,
    )
    chunks = [chunk async for chunk in stream]
    texts, roles, finishes = ["", "", ""], [0, 0, 0], [0, 0, 0]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        roles[choice.index] += choice.delta.role == "assistant"
        finishes[choice.index] += choice.finish_reason == "length"
    assert texts == [whole.choices[0].message.content] * 3
    assert (roles, finishes) == ([1, 1, 1], [1, 1, 1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 18


async def test_n_completions_stream_and_whole_agree(sdk: openai.AsyncOpenAI) -> None:
    """/v1/completions with n=2: streamed text per index equals the whole response's."""
    fields: dict[str, Any] = {"model": MODEL, "n": 2, "max_tokens": 8, "temperature": 0}
    whole = await sdk.completions.create(prompt="import os", **fields)
    stream = await sdk.completions.create(prompt="import os", stream=True, **fields)
    texts = ["", ""]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]


async def test_a_negative_seed_samples_as_its_unsigned_twin(sdk: openai.AsyncOpenAI) -> None:
    """seed -7 is accepted and samples exactly as seed 2^64 - 7 (the same 64 bits), twice
    alike: reproducible like any seed."""
    fields: dict[str, Any] = {"model": MODEL, "max_tokens": 12, "temperature": 1.5}
    negative = [
        (await sdk.completions.create(prompt="def", seed=-7, **fields)).choices[0].text
        for _ in range(2)
    ]
    twin = (await sdk.completions.create(prompt="def", seed=2**64 - 7, **fields)).choices[0].text
    assert negative == [twin, twin]


async def test_n_with_seed_gives_each_choice_seed_plus_index(sdk: openai.AsyncOpenAI) -> None:
    """With a seed, choice i samples as a single request with seed + i would: reproducible,
    and the choices differ from one another."""
    fields: dict[str, Any] = {"model": MODEL, "max_tokens": 12, "temperature": 1.5}
    many = await sdk.completions.create(prompt="def", n=3, seed=40, **fields)
    singles = [
        (await sdk.completions.create(prompt="def", seed=40 + i, **fields)).choices[0].text
        for i in range(3)
    ]
    assert [c.text for c in many.choices] == singles
    assert len(set(singles)) > 1


async def test_n_stream_disconnect_cancels_every_choice(paced: RunningServer) -> None:
    """Closing a streamed n=3 request cancels all three upstream generations at once."""
    edge = await start_edge(paced.target)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 450, "n": 3, "stream": True}
    try:
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
            http.stream(
                "POST", "/v1/completions", json=body, headers={"X-Request-ID": "n-drop"}
            ) as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    break
        assert await eventually(lambda: paced.engine.active_count == 0, within_s=1)
    finally:
        await edge.edge.stop()
    assert isinstance(paced.observer, RecordingObserver)
    records = [paced.observer.finished[f"n-drop-{i}"] for i in range(3)]
    assert {r.finish_reason for r in records} == {FinishReason.CANCELLED}


async def test_whole_response_disconnect_cancels_every_choice(paced: RunningServer) -> None:
    """A client that leaves before a non-streamed n=2 answer is ready cancels both choices."""
    edge = await start_edge(paced.target)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 450, "n": 2}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=0.3) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/completions", json=body, headers={"X-Request-ID": "w-drop"})
        assert await eventually(lambda: paced.engine.active_count == 0, within_s=1)
    finally:
        await edge.edge.stop()
    assert isinstance(paced.observer, RecordingObserver)
    records = [paced.observer.finished[f"w-drop-{i}"] for i in range(2)]
    assert {r.finish_reason for r in records} == {FinishReason.CANCELLED}
    assert all(r.completion_tokens < 450 for r in records)


CHAT_REFUSED = {
    "tools": (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        "unsupported_parameter",
    ),
    "tool_choice": ({"tool_choice": "auto"}, "unsupported_parameter"),
    "functions": ({"functions": [{"name": "f", "parameters": {}}]}, "unsupported_parameter"),
    "function_call": ({"function_call": "auto"}, "unsupported_parameter"),
    "response_format": ({"response_format": {"type": "json_object"}}, "unsupported_parameter"),
    "modalities": ({"modalities": ["text", "audio"]}, "unsupported_parameter"),
}
COMPLETIONS_REFUSED = {
    "echo": ({"echo": True}, "unsupported_parameter"),
    "suffix": ({"suffix": "end"}, "unsupported_parameter"),
    "best_of": ({"best_of": 2}, "unsupported_value"),
}


@pytest.mark.parametrize(("fields", "code"), CHAT_REFUSED.values(), ids=CHAT_REFUSED.keys())
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_chat_field_not_honoured_is_400_naming_it(
    sdk: openai.AsyncOpenAI, fields: dict[str, Any], code: str, stream: bool
) -> None:
    """A chat field that would change the answer and is not supported is refused by name."""
    with pytest.raises(openai.BadRequestError) as caught:
        await _create(sdk, True, stream, model=MODEL, max_tokens=2, **fields)
    error = _error(caught)
    assert (error["param"], error["code"]) == (list(fields)[-1], code)


@pytest.mark.parametrize(
    ("fields", "code"), COMPLETIONS_REFUSED.values(), ids=COMPLETIONS_REFUSED.keys()
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_completions_field_not_honoured_is_400_naming_it(
    sdk: openai.AsyncOpenAI, fields: dict[str, Any], code: str, stream: bool
) -> None:
    """A completions field that would change the answer and is not supported is refused."""
    with pytest.raises(openai.BadRequestError) as caught:
        await _create(sdk, False, stream, model=MODEL, max_tokens=2, **fields)
    error = _error(caught)
    assert (error["param"], error["code"]) == (list(fields)[-1], code)


async def test_unknown_field_is_400_unknown_parameter(sdk: openai.AsyncOpenAI) -> None:
    """A field OpenAI's API does not define (and the edge does not honour) is refused."""
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.completions.create(
            model=MODEL, prompt="x", max_tokens=2, extra_body={"mirostat_tau": 5.0}
        )
    error = _error(caught)
    assert (error["param"], error["code"]) == ("mirostat_tau", "unknown_parameter")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_fields_that_cannot_change_the_answer_are_accepted(
    sdk: openai.AsyncOpenAI, stream: bool
) -> None:
    """user, metadata, store, service_tier, parallel_tool_calls, stream_options'
    include_obfuscation (no delta is padded, whichever value), a text part's
    prompt_cache_breakpoint, and the no-op values of refused fields (tools [],
    presence_penalty 0, text response_format) are accepted."""
    part = {
        "type": "text",
        "text": "Write a loop.",
        "prompt_cache_breakpoint": {"mode": "explicit"},
    }
    messages: Any = [{"role": "user", "content": [part]}]
    reply: Any = await sdk.chat.completions.create(
        messages=messages,
        stream=stream,
        model=MODEL,
        max_tokens=2,
        user="u-1",
        metadata={"team": "a"},
        store=False,
        service_tier="auto",
        parallel_tool_calls=False,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        response_format={"type": "text"},
        # A stream's options go with a stream only (without one they are a 400, as at OpenAI).
        stream_options={"include_usage": True, "include_obfuscation": True}
        if stream
        else openai.NOT_GIVEN,
        extra_body={"tools": [], "tool_choice": "none"},
    )
    assert [chunk async for chunk in reply] if stream else reply


@pytest.mark.parametrize(("chat", "stream"), ROUTES)
async def test_vllms_extensions_at_their_defaults_are_accepted(
    sdk: openai.AsyncOpenAI, chat: bool, stream: bool
) -> None:
    """vLLM's skip_special_tokens (true), include_stop_str_in_output (false), and on chat
    add_generation_prompt (true), continue_final_message (false) and chat_template_kwargs
    ({}), at the defaults that are what the edge does, are accepted."""
    extras: dict[str, Any] = {"skip_special_tokens": True, "include_stop_str_in_output": False}
    if chat:
        extras |= {
            "add_generation_prompt": True,
            "continue_final_message": False,
            "chat_template_kwargs": {},
        }
    assert await _create(sdk, chat, stream, model=MODEL, max_tokens=2, extra_body=extras)


VLLM_REFUSED = [
    pytest.param(False, {"skip_special_tokens": False}, id="skip_special_tokens"),
    pytest.param(False, {"include_stop_str_in_output": True}, id="include_stop_str_in_output"),
    pytest.param(True, {"add_generation_prompt": False}, id="add_generation_prompt"),
    pytest.param(True, {"continue_final_message": True}, id="continue_final_message"),
    pytest.param(True, {"chat_template_kwargs": {"x": 1}}, id="chat_template_kwargs"),
]


@pytest.mark.parametrize(("chat", "extra"), VLLM_REFUSED)
async def test_vllms_extensions_asking_for_what_the_edge_does_not_do_are_400_naming_them(
    sdk: openai.AsyncOpenAI, chat: bool, extra: dict[str, Any]
) -> None:
    """A vLLM extension sent at a value other than its default (which the edge does not do)
    is a 400 unsupported_parameter naming it."""
    with pytest.raises(openai.BadRequestError) as caught:
        await _create(sdk, chat, False, model=MODEL, max_tokens=2, extra_body=extra)
    assert (_error(caught)["param"], _error(caught)["code"]) == (
        next(iter(extra)),
        "unsupported_parameter",
    )


async def test_a_stop_token_id_ends_a_completion_with_stop(
    sdk: openai.AsyncOpenAI, edge: RunningEdge
) -> None:
    """stop_token_ids (vLLM's extension) ends the answer at the first of its ids the model
    produces, finish_reason "stop", the id counted in the usage."""
    body = {"prompt": "def f():", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
        aconnect_sse(http, "POST", "/v1/generate", json=body) as source,
    ):
        ids = [json.loads(e.data)["id"] async for e in source.aiter_sse() if e.event == "token"]
    reply = await sdk.completions.create(
        model=MODEL,
        prompt="def f():",
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [ids[2]]},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == ids.index(ids[2]) + 1


async def test_completions_logprobs_zero_gives_the_chosen_tokens(sdk: openai.AsyncOpenAI) -> None:
    """logprobs=0 on /v1/completions returns each chosen token's log-probability and offset."""
    reply = await sdk.completions.create(
        model=MODEL, prompt="def f():", max_tokens=4, logprobs=0, extra_body=LONG
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens is not None
    assert logprobs.token_logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs)
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset is not None
    assert logprobs.text_offset[0] == 0


async def test_max_tokens_and_max_completion_tokens_together_are_400(
    sdk: openai.AsyncOpenAI,
) -> None:
    """Chat with both caps is a 400 naming max_tokens (one of them would be ignored)."""
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=2, max_completion_tokens=3
        )
    assert _error(caught)["param"] == "max_tokens"


async def test_model_not_found_counts_as_rejected(edge: RunningEdge) -> None:
    """A 404 model_not_found counts in tokenwire_edge_streams_total{outcome="rejected"}."""
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
        refused = await http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        scrape = (await http.get("/metrics")).text
    assert refused.status_code == 404
    line = 'tokenwire_edge_streams_total{outcome="rejected",route="completions"} 1.0'
    assert line in scrape


async def test_request_without_model_gets_the_served_one(edge: RunningEdge) -> None:
    """A body with no `model` (as vLLM allows) is answered by the served model."""
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
        response = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["model"] == MODEL


async def test_stream_cut_by_the_edge_ends_with_an_error_chunk(paced: RunningServer) -> None:
    """When the edge stops with an n=2 stream still running, the stream ends with an OpenAI
    error chunk (not silently) and both generations are cancelled."""
    edge = await start_edge(paced.target)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "n": 2, "stream": True}
    lines: list[str] = []
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                lines.append(line.removeprefix("data: "))
                if len(lines) == 1:
                    stopping = asyncio.ensure_future(edge.edge.stop())
    await stopping
    assert "error" in json.loads(lines[-1])
    assert await eventually(lambda: paced.engine.active_count == 0, within_s=2)


async def test_n_beyond_free_capacity_is_429_and_frees_the_admitted_choices(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """When the server, busy with another stream, admits only some of n choices, the request
    is a 429 and the admitted generations are cancelled at once (none keeps a slot for
    nobody)."""
    slow = ScriptedModel(spec, {}, step_delay_s=0.01)
    running = await start_server(slow, tokenizer, max_batch_size=1, max_queue=2)
    edge = await start_edge(running.target)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 300, "n": 3, "ignore_eos": True}
    try:
        busy = body | {"n": 1, "stream": True}
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=busy),
        ):
            assert await eventually(lambda: running.engine.active_count == 1, within_s=2)
            refused = await http.post("/v1/completions", json=body)
            assert await eventually(lambda: running.engine.active_count == 1, within_s=1)
    finally:
        await edge.edge.stop()
        await running.server.drain()
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"prompt": "x", "n": 4}, "n"), ({"prompt": ["x", "y"], "n": 2}, "prompt")],
    ids=["n", "batch"],
)
async def test_more_generations_than_the_server_holds_is_400(
    spec: ModelSpec, tokenizer: Tokenizer, fields: dict[str, Any], param: str
) -> None:
    """A request opening more generations at once than the server holds (its rows and queue)
    is a 400 naming n, or prompt for a batch, not a 429 that no wait could end; nothing
    reaches the server."""
    slow = ScriptedModel(spec, {}, step_delay_s=0.01)
    observer = RecordingObserver()
    running = await start_server(slow, tokenizer, observer, max_batch_size=1, max_queue=2)
    edge = await start_edge(running.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            refused = await http.post(
                "/v1/completions", json={"model": MODEL, "max_tokens": 3} | fields
            )
    finally:
        await edge.edge.stop()
        await running.server.drain()
    assert observer.finished == {}
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == (param, "unsupported_value")
    assert "4 generations at once, more than the 3 requests" in error["message"]


async def test_chat_top_logprobs_list_alternatives(sdk: openai.AsyncOpenAI) -> None:
    """logprobs + top_logprobs=3 on chat: every position lists 3 alternatives, most likely
    first, and greedy's choice is the first."""
    reply = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "def f():"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content if reply.choices[0].logprobs else None
    assert content
    for position in content:
        assert len(position.top_logprobs) == 3
        assert position.top_logprobs[0].logprob == pytest.approx(position.logprob, abs=1e-5)
        ranked = [a.logprob for a in position.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)


async def test_logprobs_name_each_tokens_own_text_while_a_stop_holds_text_back(
    sdk: openai.AsyncOpenAI,
) -> None:
    """Each logprobs position names its own token's text, even where the stream holds that
    text back (it could begin a stop string) and sends it joined to the next: greedy's
    choice is its own first alternative, and the completions offsets follow the tokens."""
    first = await sdk.completions.create(
        model=MODEL, prompt="def f():", max_tokens=5, temperature=0, logprobs=1
    )
    assert first.choices[0].logprobs is not None
    tokens = first.choices[0].logprobs.tokens
    assert tokens is not None
    # A stop string that begins with the second token's text and never completes.
    held = await sdk.completions.create(
        model=MODEL,
        prompt="def f():",
        max_tokens=5,
        temperature=0,
        logprobs=1,
        stop=[tokens[1] + "\x00"],
    )
    probs = held.choices[0].logprobs
    assert probs is not None
    assert probs.tokens == tokens
    assert probs.top_logprobs is not None
    assert [next(iter(a)) for a in probs.top_logprobs] == tokens
    assert probs.text_offset == [sum(map(len, tokens[:i])) for i in range(len(tokens))]


async def _held_back_stream(sdk: openai.AsyncOpenAI, chat: bool, **fields: Any) -> list[Any]:
    """The chunks of a greedy stream whose stop string begins with one of its token's text and
    never completes, so that token's text is held back and sent joined to the next token's (the
    token is one whose text before it ends in no part of the stop string, so it adds nothing)."""
    asked: Any = True if chat else 0
    whole = await _create(
        sdk, chat, False, model=MODEL, max_tokens=6, temperature=0, logprobs=asked
    )
    probs = whole.choices[0].logprobs
    tokens = [p.token for p in probs.content] if chat else probs.tokens
    assert len(tokens) == 6
    k = next(
        k
        for k in range(1, 5)
        if tokens[k] and not any("".join(tokens[:k]).endswith(tokens[k][:j]) for j in range(1, 9))
    )
    stop = [tokens[k] + "\x00"]
    return list(
        await _create(
            sdk, chat, True, model=MODEL, max_tokens=6, temperature=0, stop=stop, **fields
        )
    )


def _texts(chunks: list[Any], chat: bool) -> list[str | None]:
    """Each chunk's text (a chat delta's content), the role and finish chunks left out."""
    choices = [c.choices[0] for c in chunks if c.choices and not c.choices[0].finish_reason]
    if chat:
        return [c.delta.content for c in choices if c.delta.role is None]
    return [c.text for c in choices]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
async def test_a_token_that_adds_no_text_makes_no_chunk(
    sdk: openai.AsyncOpenAI, chat: bool
) -> None:
    """A token whose text is held back (it could begin a stop string) sends no empty delta:
    every content chunk carries text, as OpenAI's and vLLM's streams do."""
    chunks = await _held_back_stream(sdk, chat)
    texts = _texts(chunks, chat)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert texts
    assert all(texts), texts
    assert len(texts) < 6


async def test_a_token_that_adds_no_text_keeps_its_chunk_with_logprobs(
    sdk: openai.AsyncOpenAI,
) -> None:
    """With logprobs asked for, every token has its chunk, the held-back one too (empty
    content, its logprob), so the stream's logprobs list every token."""
    chunks = await _held_back_stream(sdk, True, logprobs=True)
    texts = _texts(chunks, True)
    assert len(texts) == 6
    assert "" in texts


async def test_completions_logprobs_n_lists_n_alternatives(sdk: openai.AsyncOpenAI) -> None:
    """Completions logprobs=2: the legacy top_logprobs holds up to 2 {text: logprob} per token."""
    reply = await sdk.completions.create(
        model=MODEL, prompt="def f():", max_tokens=5, temperature=0, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.top_logprobs is not None
    assert len(logprobs.top_logprobs) == 5
    assert all(1 <= len(alternatives) <= 2 for alternatives in logprobs.top_logprobs)


async def test_logit_bias_is_honoured(sdk: openai.AsyncOpenAI, tokenizer: Tokenizer) -> None:
    """A +100 bias on one token id makes greedy completions repeat exactly that token."""
    reply = await sdk.completions.create(
        model=MODEL, prompt="x", max_tokens=4, temperature=0, logit_bias={"42": 100}
    )
    assert reply.choices[0].text == tokenizer.token_text(42) * 4


async def test_frequency_penalty_is_honoured(sdk: openai.AsyncOpenAI) -> None:
    """A strong frequency penalty changes greedy output on a prompt that repeats itself."""
    prompt = "x = 1\n" * 8
    plain = await sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    penalised = await sdk.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, frequency_penalty=2.0
    )
    assert penalised.choices[0].text != plain.choices[0].text


@pytest.mark.parametrize("nested", [False, True], ids=["ids", "list-of-one"])
async def test_completions_prompt_as_token_ids_gives_what_its_text_gives(
    sdk: openai.AsyncOpenAI, tokenizer: Tokenizer, nested: bool
) -> None:
    """A completions prompt sent as its text's token ids (alone, or as OpenAI's list of one)
    gives the text's completion, counted as the same prompt tokens."""
    ids = tokenizer.encode("def f():")
    by_text = await sdk.completions.create(
        model=MODEL, prompt="def f():", max_tokens=6, temperature=0
    )
    by_ids = await sdk.completions.create(
        model=MODEL, prompt=[ids] if nested else ids, max_tokens=6, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage is not None
    assert by_text.usage is not None
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens


def test_developer_turn_reaches_the_template_as_system() -> None:
    """OpenAI's developer role is the system role under its newer name: the model's chat
    template, which knows only `system`, gets it as that."""
    fields = Fields({"messages": [{"role": "developer", "content": "Be brief."}]})
    assert chat_turns(fields) == [{"role": "system", "content": "Be brief."}]


def test_message_name_reaches_the_template() -> None:
    """A message's `name` (which participant spoke) goes to the chat template with its turn."""
    fields = Fields({"messages": [{"role": "user", "content": "Hi.", "name": "ada"}]})
    assert chat_turns(fields) == [{"role": "user", "content": "Hi.", "name": "ada"}]


def test_text_parts_of_a_message_reach_the_template_as_parts() -> None:
    """A content list of text parts is one message whose parts go to the chat template as
    parts (the template decides how to read them, see test_chat_template)."""
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]
    fields = Fields({"messages": [{"role": "user", "content": parts}]})
    assert chat_turns(fields) == [{"role": "user", "content": parts}]


def test_empty_tool_calls_do_not_reach_the_template() -> None:
    """An assistant turn's empty tool_calls means no tool call: the turn reaches the chat
    template without the key, so a template that tests for it (Mistral v0.3's) renders the
    turn's text, not an empty tool call."""
    fields = Fields({"messages": [{"role": "assistant", "content": "b", "tool_calls": []}]})
    assert chat_turns(fields) == [{"role": "assistant", "content": "b"}]


async def test_completions_without_max_tokens_take_openais_default_of_16(
    sdk: openai.AsyncOpenAI,
) -> None:
    """A completion that sets no max_tokens stops at 16 tokens (OpenAI's default, as vLLM's),
    with finish_reason length."""
    reply = await sdk.completions.create(
        model=MODEL, prompt="def f():", extra_body={"ignore_eos": True}
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 16
    assert reply.choices[0].finish_reason == "length"


async def test_chat_without_max_tokens_takes_the_servers_default(
    sdk: openai.AsyncOpenAI, served: RunningServer
) -> None:
    """A chat completion that sets no max_tokens runs to the server's default_max_tokens."""
    reply = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == served.engine.config.default_max_tokens
