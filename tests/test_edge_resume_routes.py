"""The native stream routes around a stream's opening: HEAD starts nothing, a cancel is never
lost while the stream opens, and every id a stream is accepted under is addressable."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from tests import sse
from tests.conftest import RunningEdge, RunningServer, eventually, start_edge
from tests.fakes import RecordingObserver
from tests.replicas import SlowOpening
from tokenwire.server.domain import FinishReason

LONG = {"prompt": "x", "max_tokens": 450, "ignore_eos": True}


@pytest.fixture
async def http(paced: RunningServer) -> AsyncIterator[tuple[RunningEdge, httpx.AsyncClient]]:
    """An edge with a 2 s window in front of the paced server, and a client of it."""
    edge = await start_edge(paced.target, resume_window_s=2.0)
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
        yield edge, client
    await edge.edge.stop()


async def test_head_of_generate_is_405_and_starts_nothing(paced: RunningServer) -> None:
    """HEAD /v1/generate?prompt=... is a 405 whose Allow is `GET, POST`, and no generation
    starts (its headers-only answer would never read one, nor let it expire)."""
    edge = await start_edge(paced.target, resume_window_s=0.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
            reply = await client.head(
                "/v1/generate",
                params={"prompt": "x", "max_tokens": "400", "ignore_eos": "true"},
                headers={"X-Request-ID": "headed"},
            )
            await asyncio.sleep(0.2)
            running = (paced.engine.active_count, len(edge.streams))
    finally:
        await edge.edge.stop()
    assert (reply.status_code, reply.headers["allow"]) == (405, "GET, POST")
    assert running == (0, 0)


async def test_a_cancel_while_the_stream_opens_is_accepted_and_cancels_it(
    paced: RunningServer,
) -> None:
    """A cancel that comes while the server is still opening the stream answers
    `cancelled: true`, and the stream, once open, ends with `done` / cancelled at the server
    too, instead of a 404 and a stream that runs to its end."""
    replica = SlowOpening(paced.target, 0.5)
    await replica.start()
    edge = await start_edge(replica.target, resume_window_s=2.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
            headers = {"X-Request-ID": "early"}
            reading = asyncio.create_task(
                sse.events(client, "POST", "/v1/generate", json=LONG, headers=headers)
            )
            await asyncio.sleep(0.2)  # the request is in; the replica answers at 0.5 s
            reply = await client.post("/v1/generate/early/cancel", json={})
            _, events = await asyncio.wait_for(reading, 10)
    finally:
        await edge.edge.stop()
        await replica.stop()
    assert reply.json() == {"request_id": "early", "cancelled": True}
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"
    assert isinstance(paced.observer, RecordingObserver)
    assert await eventually(lambda: "early" in paced.observer.finished, within_s=5)
    assert paced.observer.finished["early"].finish_reason == FinishReason.CANCELLED


async def test_an_id_holding_a_slash_is_resumed_and_cancelled_by_path(
    http: tuple[RunningEdge, httpx.AsyncClient],
) -> None:
    """A request id with '/' in it (`org/run-1`) is named as is in the events and cancel
    routes' paths: the resume gets the next event, the cancel stops the stream."""
    _, client = http
    first = await sse.first_event(
        client, "POST", "/v1/generate", json=LONG, headers={"X-Request-ID": "org/run-1"}
    )
    resumed = await sse.first_event(
        client, "GET", "/v1/generate/org/run-1/events", headers={"Last-Event-ID": first.id}
    )
    reply = await client.post("/v1/generate/org/run-1/cancel", json={})
    assert resumed.id == "org/run-1:2"
    assert reply.json() == {"request_id": "org/run-1", "cancelled": True}


@pytest.mark.parametrize("request_id", [".", "..", "x/.", "a/../b", "a//b", "x/"])
async def test_a_dot_segment_id_is_refused_naming_request_id(
    http: tuple[RunningEdge, httpx.AsyncClient], request_id: str
) -> None:
    """An id with `.`, `..` or an empty segment among its `/`-separated parts is refused as a
    native stream's id (no URL path keeps them: clients resolve dot segments, proxies merge
    `//`, so `x/./cancel` would cancel stream `x`) with a 400 naming request_id, before any
    stream starts."""
    edge, client = http
    reply = await client.post("/v1/generate", json={**LONG, "request_id": request_id})
    assert reply.status_code == 400
    assert reply.json()["error"]["field"] == "request_id"
    assert len(edge.streams) == 0
