"""Edge metrics: client-side TTFT, streams by route and outcome, failovers, active streams,
buffer bytes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL, RunningServer, eventually, eventually_awaited, start_edge
from tests.procs import ServerProcess

BODY = {"prompt": "def f():", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


async def _values(http: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = (await http.get("/metrics")).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _streams(
    values: dict[tuple[str, frozenset[tuple[str, str]]], float], route: str, outcome: str
) -> float:
    key = ("tokenwire_edge_streams_total", frozenset({("route", route), ("outcome", outcome)}))
    return values.get(key, 0.0)


async def test_edge_counts_outcomes_and_client_ttft(served: RunningServer) -> None:
    """Completed, disconnected, resumed (once the edge has counted the disconnect: the stream
    has no reader then) and rejected streams are counted; gauges return to 0."""
    edge = await start_edge(served.target, resume_window_s=5.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            for _ in range(2):
                async with aconnect_sse(http, "POST", "/v1/generate", json=BODY) as source:
                    [e async for e in source.aiter_sse()]
            long = {**BODY, "max_tokens": 60}
            async with aconnect_sse(http, "POST", "/v1/generate", json=long) as source:
                async for event in source.aiter_sse():
                    last_id = event.id
                    break

            async def disconnect_counted() -> bool:
                return _streams(await _values(http), "native", "client_disconnected") > 0

            assert await eventually_awaited(disconnect_counted)
            async with aconnect_sse(
                http, "POST", "/v1/generate", json={}, headers={"Last-Event-ID": last_id}
            ) as source:
                [e async for e in source.aiter_sse()]
            await http.post("/v1/generate", json={"prompt": ""})
            assert await eventually(lambda: served.engine.active_count == 0)
            values = await _values(http)
    finally:
        await edge.edge.stop()
    assert _streams(values, "native", "completed") == 3
    assert _streams(values, "native", "client_disconnected") == 1
    assert _streams(values, "native", "resumed") == 1
    assert _streams(values, "native", "rejected") == 1
    ttft = ("tokenwire_edge_time_to_first_token_seconds_count", frozenset({("route", "native")}))
    assert values[ttft] == 3
    assert values[("tokenwire_edge_active_streams", frozenset())] == 0
    assert values[("tokenwire_edge_resume_buffer_bytes", frozenset())] > 0


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_an_openai_stream_whose_tokens_add_no_text_has_its_ttft(
    served: RunningServer, chat: bool
) -> None:
    """An OpenAI stream whose one token completes its stop string (so no chunk carries a
    token's text) still records one TTFT: its first token reaches the client with the
    choice's end."""
    route, path = ("chat", "/v1/chat/completions") if chat else ("completions", "/v1/completions")
    asked: dict[str, Any] = {"model": MODEL, "max_tokens": 1, "temperature": 0}
    if chat:
        asked["messages"] = [{"role": "user", "content": "def"}]
    else:
        asked["prompt"] = "def"
    edge = await start_edge(served.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
            whole = (await http.post(path, json=asked)).json()["choices"][0]
            first = whole["message"]["content"] if chat else whole["text"]
            assert first
            body = {**asked, "max_tokens": 3, "stop": [first], "stream": True}
            streamed = await http.post(path, json=body)
            values = await _values(http)
    finally:
        await edge.edge.stop()
    assert '"finish_reason":"stop"' in streamed.text
    assert _streams(values, route, "completed") == 2
    # The whole response records no TTFT; the stream records one.
    assert (
        values[("tokenwire_edge_time_to_first_token_seconds_count", frozenset({("route", route)}))]
        == 1
    )


async def test_a_resume_refused_with_410_counts_no_outcome(served: RunningServer) -> None:
    """A resume from events the buffer dropped is refused (410) without counting `resumed`
    or `client_disconnected`: no stream was served to it."""
    edge = await start_edge(served.target, resume_window_s=5.0, resume_stream_bytes=1024)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            async with aconnect_sse(
                http, "POST", "/v1/generate", json={**BODY, "max_tokens": 60}
            ) as source:
                async for event in source.aiter_sse():
                    last_id = event.id
                    break
            assert await eventually(lambda: served.engine.active_count == 0)

            async def disconnect_counted() -> bool:
                return _streams(await _values(http), "native", "client_disconnected") > 0

            assert await eventually_awaited(disconnect_counted)
            before = await _values(http)
            reply = await http.get("/v1/generate", headers={"Last-Event-ID": last_id})
            after = await _values(http)
    finally:
        await edge.edge.stop()
    assert reply.status_code == 410
    for outcome in ("resumed", "client_disconnected"):
        assert _streams(after, "native", outcome) == _streams(before, "native", outcome)


def _ttft(values: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> tuple[float, float]:
    """(count, sum) of the native route's TTFT histogram."""
    route = frozenset({("route", "native")})
    return (
        values[("tokenwire_edge_time_to_first_token_seconds_count", route)],
        values[("tokenwire_edge_time_to_first_token_seconds_sum", route)],
    )


async def test_edge_ttft_starts_when_the_http_request_arrives(served: RunningServer) -> None:
    """A request whose body takes 0.3 s to arrive has a TTFT of at least 0.3 s: the clock
    starts at the request's arrival, not when the server accepted the stream."""

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"prompt": "def f():", '
        await asyncio.sleep(0.3)
        yield b'"max_tokens": 4}'

    edge = await start_edge(served.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            headers = {"Content-Type": "application/json"}
            async with aconnect_sse(
                http, "POST", "/v1/generate", content=slow_body(), headers=headers
            ) as source:
                [e async for e in source.aiter_sse()]
            count, seconds = _ttft(await _values(http))
    finally:
        await edge.edge.stop()
    assert count == 1
    assert seconds >= 0.3


async def test_replays_and_resumes_add_no_ttft_observation(served: RunningServer) -> None:
    """Only the first delivery of a stream is timed: replaying it whole (the events route
    without Last-Event-ID) or resuming it adds nothing to the TTFT histogram."""
    edge = await start_edge(served.target, resume_window_s=5.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            async with aconnect_sse(http, "POST", "/v1/generate", json=BODY) as source:
                events = [e async for e in source.aiter_sse()]
            request_id = events[0].id.rsplit(":", 1)[0]
            for resume in ({}, {}, {"Last-Event-ID": events[0].id}):
                async with aconnect_sse(
                    http, "GET", f"/v1/generate/{request_id}/events", headers=resume
                ) as source:
                    assert [e.id async for e in source.aiter_sse()][-1] == events[-1].id
            count, _ = _ttft(await _values(http))
    finally:
        await edge.edge.stop()
    assert count == 1


async def test_a_replay_counts_its_outcome_and_no_resume(served: RunningServer) -> None:
    """Reading a finished stream again from its start (the events route without
    Last-Event-ID) counts the replay's own outcome, `completed`, and no `resumed`."""
    edge = await start_edge(served.target, resume_window_s=5.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            async with aconnect_sse(http, "POST", "/v1/generate", json=BODY) as source:
                events = [e async for e in source.aiter_sse()]
            request_id = events[0].id.rsplit(":", 1)[0]
            async with aconnect_sse(http, "GET", f"/v1/generate/{request_id}/events") as source:
                [e async for e in source.aiter_sse()]
            values = await _values(http)
    finally:
        await edge.edge.stop()
    assert _streams(values, "native", "resumed") == 0
    assert _streams(values, "native", "completed") == 2


@pytest.mark.slow
async def test_a_failover_is_counted_by_route(served: RunningServer) -> None:
    """An OpenAI stream whose server is killed mid-stream goes on on the other target and
    counts one tokenwire_edge_failovers_total{route="completions"}."""
    first = ServerProcess("--metrics-port", "0")
    try:
        first.wait_for("server.started")
        edge = await start_edge(f"{first.target},{served.target}")
        body = {**BODY, "model": MODEL, "max_tokens": 400, "stream": True}
        try:
            async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    lines = []
                    async for line in response.aiter_lines():
                        if line.startswith("data: ") and first.proc.poll() is None:
                            first.proc.kill()
                        lines.append(line)
                values = await _values(http)
        finally:
            await edge.edge.stop()
    finally:
        first.close()
    assert "data: [DONE]" in lines
    failovers = {
        dict(labels)["route"]: value
        for (name, labels), value in values.items()
        if name == "tokenwire_edge_failovers_total"
    }
    assert failovers == {"native": 0, "completions": 1, "chat": 0}


async def test_a_stream_no_server_accepts_before_its_deadline_counts_deadline_exceeded() -> None:
    """A stream whose upstream deadline passes before any server accepts it (its only target
    takes the connection and never answers) is a 504 counted once, as `deadline_exceeded`,
    as a stream the deadline cuts later is."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        edge = await start_edge(f"127.0.0.1:{silent.getsockname()[1]}", upstream_timeout_s=0.5)
        try:
            async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
                response = await http.post("/v1/generate", json=BODY)
                values = await _values(http)
        finally:
            await edge.edge.stop()
    assert response.status_code == 504
    counted = {
        dict(labels)["outcome"]: value
        for (name, labels), value in values.items()
        if name == "tokenwire_edge_streams_total" and value
    }
    assert counted == {"deadline_exceeded": 1.0}
