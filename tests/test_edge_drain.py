"""Draining the edge: readiness first, then new requests refused, in-flight streams finish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import AsyncIterator

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.conftest import MODEL, RunningEdge, RunningServer, eventually, start_edge
from tests.procs import EdgeProcess

NATIVE = {"prompt": "def f():", "max_tokens": 60, "ignore_eos": True}
OPENAI = {"model": MODEL, "prompt": "x", "max_tokens": 60, "stream": True}
OUTLASTING = 300
"""max_tokens of a stream that must run to its end after the drain's checks: 3 s on the
`paced` server, far longer than the checks take even on a loaded machine."""


async def _native_rest(http: httpx.AsyncClient, started: asyncio.Event) -> list[ServerSentEvent]:
    body = {**NATIVE, "max_tokens": OUTLASTING}
    async with aconnect_sse(http, "POST", "/v1/generate", json=body) as source:
        events = []
        async for event in source.aiter_sse():
            events.append(event)
            started.set()
        return events


async def _openai_lines(http: httpx.AsyncClient, started: asyncio.Event) -> list[str]:
    body = {**OPENAI, "max_tokens": OUTLASTING}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        lines = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                lines.append(line.removeprefix("data: "))
                started.set()
        return lines


async def test_drain_refuses_new_work_while_in_flight_streams_finish(
    paced: RunningServer,
) -> None:
    """During a drain /readyz and new requests are 503, while a native SSE stream and an OpenAI
    stream already running (long enough to outlast those checks) both reach their `done` /
    `[DONE]`; the drain reports clean."""
    edge = await start_edge(paced.target)
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
        native_started, openai_started = asyncio.Event(), asyncio.Event()
        native = asyncio.create_task(_native_rest(http, native_started))
        openai = asyncio.create_task(_openai_lines(http, openai_started))
        await asyncio.wait_for(asyncio.gather(native_started.wait(), openai_started.wait()), 10)
        drain = asyncio.create_task(edge.edge.drain(grace_s=20))
        assert await eventually(lambda: edge.edge.ctx.drain.draining, 2)
        ready = await http.get("/readyz")
        new_native = await http.post("/v1/generate", json=NATIVE)
        new_openai = await http.post("/v1/completions", json=OPENAI)
        events, lines = await asyncio.wait_for(asyncio.gather(native, openai), 20)
    clean = await asyncio.wait_for(drain, 20)
    assert (ready.status_code, new_native.status_code, new_openai.status_code) == (503, 503, 503)
    assert new_native.json()["error"]["code"] == "UNAVAILABLE"
    assert new_openai.json()["error"]["type"] == "service_unavailable"
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "length"
    assert lines[-1] == "[DONE]"
    assert clean


async def test_drain_past_its_grace_ends_streams_with_a_cancelled_done(
    paced: RunningServer,
) -> None:
    """Streams still running when the grace ends get `done` with finish_reason cancelled."""
    edge = await start_edge(paced.target)
    body = {**NATIVE, "max_tokens": 400}
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
        aconnect_sse(http, "POST", "/v1/generate", json=body) as source,
    ):
        stream = source.aiter_sse()
        events = [await anext(stream)]
        clean = await edge.edge.drain(grace_s=0.2)
        events += [event async for event in stream]
    assert not clean
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"
    assert await eventually(lambda: paced.engine.active_count == 0, 2)


@contextlib.asynccontextmanager
async def _draining(
    edge: RunningEdge, http: httpx.AsyncClient, request_id: str
) -> AsyncIterator[tuple[asyncio.Task[bool], AsyncIterator[ServerSentEvent]]]:
    """A drain of `edge` under way, held open by a running 400-token stream named
    `request_id`: the drain's task and the rest of the stream's events."""
    body = {**NATIVE, "max_tokens": 400}
    headers = {"X-Request-ID": request_id}
    async with aconnect_sse(http, "POST", "/v1/generate", json=body, headers=headers) as source:
        stream = source.aiter_sse()
        await anext(stream)
        drain = asyncio.create_task(edge.edge.drain(grace_s=20))
        assert await eventually(lambda: edge.edge.ctx.drain.draining, 2)
        yield drain, stream


async def test_cancel_of_a_running_stream_passes_during_a_drain(paced: RunningServer) -> None:
    """Cancelling an in-flight stream is not new work: it is served while draining."""
    edge = await start_edge(paced.target)
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
        _draining(edge, http, "stop-me") as (drain, stream),
    ):
        cancelled = await http.post("/v1/generate/stop-me/cancel", json={})
        events = [event async for event in stream]
    assert cancelled.status_code == 200
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"
    assert await asyncio.wait_for(drain, 10)


async def test_edge_process_drains_on_sigterm_exits_zero_and_logs_it(
    paced: RunningServer,
) -> None:
    """SIGTERM to `tokenwire edge`: /readyz 503, the open stream (long enough to outlast that
    check) ends with done(length), exit code 0, and one `edge.stopped` log line."""
    proc = await asyncio.to_thread(EdgeProcess, paced.target, "--drain-grace-s", "20")
    body = {**NATIVE, "max_tokens": OUTLASTING}
    try:
        async with (
            httpx.AsyncClient(base_url=proc.url, timeout=30) as http,
            aconnect_sse(http, "POST", "/v1/generate", json=body) as source,
        ):
            stream = source.aiter_sse()
            events = [await anext(stream)]
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait_for, "edge.draining", 10)
            ready = await http.get("/readyz")
            events += [event async for event in stream]
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        proc.close()
    assert ready.status_code == 503
    assert json.loads(events[-1].data)["finish_reason"] == "length"
    assert code == 0
    stopped = [r for r in proc.records if r.get("event") == "edge.stopped"]
    assert len(stopped) == 1
    assert stopped[0]["drained"] is True


async def test_second_signal_cuts_the_edge_drain_short(paced: RunningServer) -> None:
    """A second SIGTERM during the drain ends open streams at once with done(cancelled); the
    edge still exits 0 and logs that it did not drain cleanly."""
    proc = await asyncio.to_thread(EdgeProcess, paced.target, "--drain-grace-s", "60")
    body = {**NATIVE, "max_tokens": 450}
    try:
        async with (
            httpx.AsyncClient(base_url=proc.url, timeout=30) as http,
            aconnect_sse(http, "POST", "/v1/generate", json=body) as source,
        ):
            stream = source.aiter_sse()
            await anext(stream)
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait_for, "edge.draining", 10)
            proc.proc.send_signal(signal.SIGTERM)
            events = [event async for event in stream]
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        proc.close()
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"
    assert len(events) < 300
    assert code == 0
    assert [r["drained"] for r in proc.records if r.get("event") == "edge.stopped"] == [False]


async def test_an_empty_last_event_id_is_a_new_request_and_refused_during_a_drain(
    paced: RunningServer,
) -> None:
    """While draining, a POST with an empty Last-Event-ID header (or query parameter) starts
    no stream: it is a new request, not a resume, and gets the drain's 503."""
    edge = await start_edge(paced.target)
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
        # A running stream keeps the drain in progress while the two requests arrive.
        _draining(edge, http, "holds-the-drain") as (drain, stream),
    ):
        by_header = await http.post("/v1/generate", json=NATIVE, headers={"Last-Event-ID": ""})
        by_query = await http.post("/v1/generate?last_event_id=", json=NATIVE)
        await http.post("/v1/generate/holds-the-drain/cancel", json={})
        [_ async for _ in stream]
    assert await asyncio.wait_for(drain, 10)
    assert (by_header.status_code, by_query.status_code) == (503, 503)


async def test_a_stream_still_opening_when_the_grace_ends_is_answered_at_once() -> None:
    """A request whose server has not answered yet (it accepted the connection and says
    nothing) when the drain's grace ends is answered 503 then, and the edge stops,
    instead of both waiting for the upstream timeout."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(10)  # the accepting thread ends by itself if nothing connects
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        edge = await start_edge(target, upstream_timeout_s=30.0)
        accepting = asyncio.create_task(asyncio.to_thread(silent.accept))
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            started = time.monotonic()
            request = asyncio.create_task(http.post("/v1/generate", json=NATIVE))
            # The request is in the edge, and the edge's connection to the silent server is up.
            upstream, _ = await asyncio.wait_for(accepting, 15)
            in_flight = await eventually(lambda: edge.edge.ctx.drain.in_flight == 1)
            with upstream:
                clean = await asyncio.wait_for(edge.edge.drain(grace_s=0.5), 10)
                response = await asyncio.wait_for(request, 10)
            took = time.monotonic() - started
    assert in_flight
    assert not clean
    assert response.status_code == 503
    assert took < 5.0
