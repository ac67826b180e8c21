"""The OpenAI-compatible routes, driven by the official openai SDK against the real edge."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests import sse
from tests.conftest import (
    MODEL,
    RunningEdge,
    RunningServer,
    eventually,
    start_edge,
    start_server,
)
from tests.fakes import RecordingObserver
from tests.replicas import SlowOpening
from tokenwire.server.domain import FinishReason
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer


@pytest.fixture
async def sdk(edge: RunningEdge) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="unused", max_retries=0)
    yield client
    await client.close()


async def test_models_lists_the_served_model(sdk: openai.AsyncOpenAI) -> None:
    """GET /v1/models returns one model, the one the server serves."""
    models = await sdk.models.list()
    assert len(models.data) == 1
    assert models.data[0].id


async def test_models_retrieve_gives_the_served_model_card(sdk: openai.AsyncOpenAI) -> None:
    """GET /v1/models/{id} of the served model returns its card, as the list has it."""
    card = await sdk.models.retrieve(MODEL)
    assert card.model_dump() == (await sdk.models.list()).data[0].model_dump()


async def test_models_retrieve_of_another_model_is_404(sdk: openai.AsyncOpenAI) -> None:
    """GET /v1/models/{id} of a model that is not served is OpenAI's 404 model_not_found."""
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.models.retrieve("org/other-model")
    body = caught.value.body
    assert isinstance(body, dict)
    assert (body["param"], body["code"]) == ("model", "model_not_found")


async def test_chat_completion_without_streaming(sdk: openai.AsyncOpenAI) -> None:
    """A non-streamed chat completion has an assistant message, finish_reason and usage."""
    reply = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a loop."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in {"length", "stop"}
    assert reply.usage is not None
    assert reply.usage.completion_tokens <= 8


async def test_chat_stream_chunks_follow_the_openai_format(sdk: openai.AsyncOpenAI) -> None:
    """Chunks carry deltas, a final finish_reason chunk, and a usage chunk with no choices."""
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


async def test_completions_stream_and_whole_agree(sdk: openai.AsyncOpenAI) -> None:
    """Greedy /v1/completions gives the same text streamed and not streamed."""
    whole = await sdk.completions.create(
        model=MODEL, prompt="def fib(n):", max_tokens=16, temperature=0
    )
    stream = await sdk.completions.create(
        model=MODEL, prompt="def fib(n):", max_tokens=16, temperature=0, stream=True
    )
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert whole.object == "text_completion"
    assert text == whole.choices[0].text != ""


async def test_stop_sequence_is_honoured_and_not_returned(sdk: openai.AsyncOpenAI) -> None:
    """A stop string found in the output ends it with finish_reason stop, without the string."""
    base = await sdk.completions.create(
        model=MODEL, prompt="import os\n", max_tokens=24, temperature=0
    )
    text = base.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        stop = text.strip()[:2]
    cut = await sdk.completions.create(
        model=MODEL, prompt="import os\n", max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)


async def test_invalid_parameter_raises_bad_request(sdk: openai.AsyncOpenAI) -> None:
    """top_p out of range surfaces as openai.BadRequestError naming the field."""
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.completions.create(model=MODEL, prompt="x", top_p=3.0)
    assert "top_p" in str(caught.value)


async def test_n_above_eight_is_rejected_naming_n(sdk: openai.AsyncOpenAI) -> None:
    """n=9 is a 400 whose param is n."""
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], n=9
        )
    assert caught.value.body["param"] == "n"  # type: ignore[index]


async def test_client_disconnect_cancels_upstream_at_once(paced: RunningServer) -> None:
    """Closing an OpenAI-style stream cancels the generation within a second."""
    edge = await start_edge(paced.target)
    body = {"model": MODEL, "prompt": "def long():", "max_tokens": 450, "stream": True}
    try:
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
            http.stream(
                "POST", "/v1/completions", json=body, headers={"X-Request-ID": "oai-drop"}
            ) as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    break
        assert await eventually(lambda: paced.engine.active_count == 0, within_s=1)
    finally:
        await edge.edge.stop()
    assert isinstance(paced.observer, RecordingObserver)
    record = paced.observer.finished["oai-drop"]
    assert record.finish_reason == FinishReason.CANCELLED
    assert record.completion_tokens < 450


OPENING = {
    "native": ("/v1/generate", {"prompt": "def long():", "max_tokens": 50}),
    "completions stream": (
        "/v1/completions",
        {"model": MODEL, "prompt": "def long():", "max_tokens": 50, "stream": True},
    ),
    "chat whole": (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50},
    ),
}


@pytest.mark.parametrize("route", sorted(OPENING))
async def test_a_client_that_leaves_while_its_stream_opens_cancels_the_opening(
    paced: RunningServer, route: str
) -> None:
    """An HTTP client that disconnects while its server is still opening the stream (as one
    tokenizing a long prompt does) has its Generate call cancelled then, not once the server
    answers: the server never starts the generation (a native stream where no stream is kept
    for a resume)."""
    replica = SlowOpening(paced.target, 3.0)
    await replica.start()
    # Native streams are kept for a resume after a disconnect, unless the window is 0.
    edge = await start_edge(replica.target, resume_window_s=0.0)
    path, body = OPENING[route]
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            posting = asyncio.create_task(http.post(path, json=body))
            # The edge has called the replica, which answers at 3 s.
            assert await eventually(lambda: replica.started == 1, within_s=5)
            posting.cancel()
            await asyncio.wait({posting})
        assert await eventually(lambda: replica.left_early == 1, within_s=1)
    finally:
        await edge.edge.stop()
        await replica.stop()


async def test_a_native_stream_whose_client_leaves_while_it_opens_is_kept_for_a_resume(
    paced: RunningServer,
) -> None:
    """Where native streams are kept for a resume, a client that disconnects while its server
    is still opening the stream does not cancel it: it opens, and the client, back by its id,
    reads it to its end."""
    replica = SlowOpening(paced.target, 1.0)
    await replica.start()
    edge = await start_edge(replica.target, resume_window_s=10.0)
    body = {"prompt": "def long():", "max_tokens": 100}  # about 1 s on the paced server
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            headers = {"X-Request-ID": "back-later"}
            posting = asyncio.create_task(http.post("/v1/generate", json=body, headers=headers))
            # The edge has called the replica, which answers at 1 s.
            assert await eventually(lambda: replica.started == 1, within_s=5)
            posting.cancel()
            await asyncio.wait({posting})
            # The edge has opened the stream and keeps it, its client gone.
            assert await eventually(lambda: edge.streams.live == 1, within_s=3)
            _, events = await sse.events(http, "GET", "/v1/generate/back-later/events")
    finally:
        await edge.edge.stop()
        await replica.stop()
    assert replica.left_early == 0
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "length"


async def test_a_client_that_leaves_while_one_choice_opens_cancels_the_open_one(
    paced: RunningServer,
) -> None:
    """With n=2, a client that disconnects while one choice's server is still opening it
    cancels that opening and ends the choice that had opened already: nothing keeps
    generating for a client that is gone."""
    replica = SlowOpening(paced.target, 3.0, slow=lambda request: request.sampling.seed == 8)
    await replica.start()
    edge = await start_edge(replica.target)
    body = {"model": MODEL, "prompt": "def", "max_tokens": 450, "n": 2, "seed": 7}
    assert isinstance(paced.observer, RecordingObserver)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            posting = asyncio.create_task(
                http.post("/v1/completions", json=body, headers={"X-Request-ID": "half"})
            )
            # One choice runs; the other's call waits at the replica.
            assert await eventually(lambda: replica.started == 2, within_s=5)
            assert await eventually(lambda: paced.engine.active_count == 1, within_s=5)
            posting.cancel()
            await asyncio.wait({posting})
        assert await eventually(lambda: replica.left_early == 1, within_s=1)
        assert await eventually(lambda: paced.engine.active_count == 0, within_s=1)
    finally:
        await edge.edge.stop()
        await replica.stop()
    record = paced.observer.finished["half-0"]
    assert record.finish_reason == FinishReason.CANCELLED
    assert record.completion_tokens < 450


LLAMA = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "llama"


@pytest.fixture
def templated_llama(tmp_path: Path) -> Path:
    """The Llama fixture (its tokenizer adds BOS) with a chat template that writes BOS itself."""
    model_dir = tmp_path / "llama"
    shutil.copytree(LLAMA, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    )
    config_path.write_text(json.dumps(config))
    return model_dir


async def test_chat_template_renders_bos_once(templated_llama: Path) -> None:
    """A template that writes {{ bos_token }} gets the model's BOS text, and the server adds no
    second BOS: prompt_tokens is what transformers counts for the rendered template."""
    tokenizer = Tokenizer.from_dir(templated_llama)
    running = await start_server(OnnxCausalLM(templated_llama, provider="cpu"), tokenizer)
    edge = await start_edge(running.target)
    try:
        async with openai.AsyncOpenAI(
            base_url=f"{edge.url}/v1", api_key="unused", max_retries=0
        ) as client:
            model = (await client.models.list()).data[0].id
            reply = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=2
            )
    finally:
        await edge.edge.stop()
        await running.server.drain()
    rendered = tokenizer.encode("<s>hello\n")
    assert rendered.count(tokenizer.token_id("<s>")) == 1
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(rendered)


OPENAI_FINISH_REASONS = {"stop", "length", "content_filter", "tool_calls", "function_call"}
ROUTES = {
    "completions": ("/v1/completions", {"prompt": "x"}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
}
RUNS_LONG = {"model": MODEL, "max_tokens": 450, "ignore_eos": True}
# How the server ends a generation it cuts short (its finish reason, as the engine gives it at
# a deadline or at the end of a drain's grace), and the OpenAI error that reports it.
CUT_SHORT = {
    "deadline": (FinishReason.DEADLINE_EXCEEDED, 504, "timeout", "deadline_exceeded"),
    "cancel": (FinishReason.CANCELLED, 503, "service_unavailable", "cancelled"),
}


async def _whole_cut_by_the_server(
    paced: RunningServer, path: str, body: dict[str, object], reason: FinishReason
) -> httpx.Response:
    """A whole (non-streamed) answer whose generation the server's engine ends with `reason`
    while it runs, as it ends one whose deadline passed or one a drain cancels."""
    edge = await start_edge(paced.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            answer = asyncio.ensure_future(http.post(path, json={**RUNS_LONG, **body}))
            assert await eventually(lambda: paced.engine.active_count == 1)
            paced.engine.cancel_all(reason)
            return await answer
    finally:
        await edge.edge.stop()


@pytest.mark.parametrize("cut", sorted(CUT_SHORT))
@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_a_whole_response_its_server_cuts_short_is_an_openai_error(
    paced: RunningServer, route: str, cut: str
) -> None:
    """A non-streamed answer whose generation the server ends at its deadline is a 504, one
    it cancels a 503, each with OpenAI's error body: never a 200 whose finish_reason OpenAI
    does not have."""
    reason, status, kind, code = CUT_SHORT[cut]
    path, body = ROUTES[route]
    response = await _whole_cut_by_the_server(paced, path, body, reason)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (kind, None, code)


@pytest.mark.parametrize("cut", sorted(CUT_SHORT))
async def test_a_stream_its_server_cuts_short_ends_with_an_error_chunk(
    paced: RunningServer, cut: str
) -> None:
    """A stream whose generation the server ends at its deadline, or cancels, ends with the
    error chunk of the whole response's error (no [DONE]); no chunk carries a finish_reason
    OpenAI does not have."""
    reason, _, kind, code = CUT_SHORT[cut]
    edge = await start_edge(paced.target)
    body = {**RUNS_LONG, "prompt": "x", "stream": True}
    data: list[dict[str, Any]] = []
    try:
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=body) as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    data.append(json.loads(line.removeprefix("data: ")))
                    if len(data) == 1:
                        paced.engine.cancel_all(reason)
    finally:
        await edge.edge.stop()
    *chunks, last = data
    error = last["error"]
    assert (error["type"], error["param"], error["code"]) == (kind, None, code)
    finishes = {c["choices"][0]["finish_reason"] for c in chunks}
    assert finishes <= OPENAI_FINISH_REASONS | {None}


async def test_the_deadline_reads_the_same_whichever_side_notices_it(
    paced: RunningServer,
) -> None:
    """A whole answer whose upstream deadline (TOKENWIRE_UPSTREAM_TIMEOUT_S) passes is the
    same 504 body when gRPC ends the call as when the server ends the generation first."""
    by_server = await _whole_cut_by_the_server(
        paced, "/v1/completions", {"prompt": "x"}, FinishReason.DEADLINE_EXCEEDED
    )
    edge = await start_edge(paced.target, upstream_timeout_s=0.3)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            by_grpc = await http.post("/v1/completions", json={**RUNS_LONG, "prompt": "x"})
    finally:
        await edge.edge.stop()
    assert (by_grpc.status_code, by_grpc.json()) == (504, by_server.json())


async def test_a_whole_response_the_edge_cancels_is_503(paced: RunningServer) -> None:
    """A non-streamed answer still running when the edge's drain grace ends is a 503
    `cancelled`, as its stream's error chunk says: not a 499, which is the code of a caller
    that left."""
    edge = await start_edge(paced.target)
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
        answer = asyncio.ensure_future(
            http.post("/v1/completions", json={**RUNS_LONG, "prompt": "x"})
        )
        try:
            assert await eventually(lambda: paced.engine.active_count == 1)
        finally:
            await edge.edge.drain(grace_s=0.3)
        response = await answer
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "cancelled")


STREAMS = {
    "completions": ("/v1/completions", {"prompt": "x"}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
}


@pytest.mark.parametrize(("path", "body"), STREAMS.values(), ids=STREAMS.keys())
async def test_stream_events_end_in_a_blank_line_of_lf(
    paced: RunningServer, path: str, body: dict[str, Any]
) -> None:
    """Every line of an OpenAI stream ends in "\\n" and every event, pings included, in
    "\\n\\n", as OpenAI's and vLLM's streams do: a client that splits the bytes on "\\n\\n"
    reads each chunk, the usage chunk and [DONE] (there is no "\\r" anywhere)."""
    edge = await start_edge(paced.target, ping_s=1.0)
    request = {
        **body,
        "model": MODEL,
        "max_tokens": 150,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
            http.stream("POST", path, json=request) as response,
        ):
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await edge.edge.stop()
    assert b"\r" not in raw
    *events, rest = raw.split(b"\n\n")
    assert rest == b""
    assert all(b"\n" not in e for e in events)  # one line each: a ping or one data line
    pings = [e for e in events if e.startswith(b": ping")]
    assert pings
    data = [e.removeprefix(b"data: ") for e in events if e not in pings]
    assert data[-1] == b"[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 150
