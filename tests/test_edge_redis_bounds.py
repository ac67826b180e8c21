"""The shared resume store's connections are bounded, and readers cannot take the writers' share:
resumes beyond the edge's reader bound are refused before their response starts, a generation
writes while every reader connection is taken, and a write the store refuses for a moment is
tried again. A real server and a real edge on 127.0.0.1 with a real redis-server, the edge's
pools made small (16 connections) so the bounds are reached with a handful of clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from httpx_sse import ServerSentEvent, aconnect_sse
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.conftest import RunningEdge, RunningServer, eventually, eventually_awaited, start_edge
from tests.redisproc import RedisServer
from tokenwire.edge.context import EdgeContext
from tokenwire.edge.native_format import native_event
from tokenwire.edge.redis_pools import Pools
from tokenwire.edge.redis_store import RedisStreams

POOLS = Pools.within(16)
"""4 connections for writes, 4 for short reads, 8 for blocking reads; 6 readers admitted."""
LONG = {"prompt": "x", "max_tokens": 300, "ignore_eos": True}
"""About 3 s on the paced server (a token every 10 ms)."""


async def _small_edge(target: str, url: str) -> RunningEdge:
    """An edge on the Redis store whose pools hold POOLS' connections."""
    running = await start_edge(target, resume_store=url, resume_lease_s=0.5)
    ctx = running.edge.app.state.ctx
    assert isinstance(ctx, EdgeContext)
    await ctx.streams.close()
    ctx.streams = RedisStreams(ctx.settings, ctx.upstream, native_event, POOLS)
    return running


@pytest.fixture
async def small(paced: RunningServer, redis_server: RedisServer) -> AsyncIterator[RunningEdge]:
    running = await _small_edge(paced.target, redis_server.url)
    yield running
    await running.edge.stop()


def _store(edge: RunningEdge) -> RedisStreams:
    store = edge.store
    assert isinstance(store, RedisStreams)
    return store


async def _started(http: httpx.AsyncClient, request_id: str, body: dict[str, Any]) -> None:
    """Start a stream and leave after its first event (it goes on generating)."""
    headers = {"X-Request-ID": request_id}
    async with aconnect_sse(http, "POST", "/v1/generate", json=body, headers=headers) as source:
        async for _ in source.aiter_sse():
            return


async def _events(http: httpx.AsyncClient, method: str, **kwargs: Any) -> list[ServerSentEvent]:
    async with aconnect_sse(http, method, "/v1/generate", **kwargs) as source:
        return [event async for event in source.aiter_sse()]


async def _idle_resumes(edge: RunningEdge, request_id: str, count: int) -> list[Any]:
    """`count` resumes of the stream from raw sockets that never read: readers that hold on."""
    writers = []
    head = (
        f"GET /v1/generate/{request_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Last-Event-ID: {request_id}:1\r\n\r\n"
    )
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", edge.edge.port)
        writer.write(head.encode())
        writers.append(writer)
    return writers


async def _rejected(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    labels = {"route": "native", "outcome": "rejected"}
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tokenwire_edge_streams_total" and sample.labels == labels
    )


async def test_a_resume_beyond_the_reader_bound_is_a_503_with_retry_after(
    small: RunningEdge,
) -> None:
    """With the edge's readers at their bound, one more resume is refused before any stream
    starts: a JSON 503 (UNAVAILABLE) with Retry-After, counted as rejected."""
    store = _store(small)
    async with httpx.AsyncClient(base_url=small.url, timeout=30) as http:
        await _started(http, "held", LONG)
        idle = await _idle_resumes(small, "held", POOLS.followers)
        try:
            assert await eventually(lambda: store.seats.taken == POOLS.followers)
            before = await _rejected(http)
            refused = await http.get(
                "/v1/generate/held/events", headers={"Last-Event-ID": "held:1"}
            )
            after = await _rejected(http)
        finally:
            for writer in idle:
                writer.close()
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/json"
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "UNAVAILABLE"
    assert "stream readers" in error["message"]
    assert after == before + 1


async def test_resumes_answered_without_a_stream_leave_no_reader_counted(
    small: RunningEdge,
) -> None:
    """Resumes answered before any stream starts (204 at the last event, 400 past it), twice as
    many as the bound admits at once, are all answered so, and leave no reader counted."""
    store = _store(small)
    async with httpx.AsyncClient(base_url=small.url, timeout=30) as http:
        body = {"prompt": "x", "max_tokens": 3}
        events = await _events(http, "POST", json=body, headers={"X-Request-ID": "short"})
        ids = [events[-1].id, "short:99"] * POOLS.followers
        answers = [
            (await http.get("/v1/generate", headers={"Last-Event-ID": event_id})).status_code
            for event_id in ids
        ]
    assert answers == [204, 400] * POOLS.followers
    assert await eventually(lambda: store.seats.taken == 0)


async def test_new_and_running_streams_go_on_while_resumes_flood_the_edge(
    small: RunningEdge,
) -> None:
    """More idle resumes than the edge has Redis connections: those beyond the reader bound
    are refused, and meanwhile a new stream runs to its `done`, and so does the stream they
    resume (read again once they leave: every event once, then `done`)."""
    store = _store(small)
    flood = POOLS.writes + POOLS.reads + POOLS.waits
    async with httpx.AsyncClient(base_url=small.url, timeout=30) as http:
        await _started(http, "held", LONG)
        idle = await _idle_resumes(small, "held", flood)
        try:
            refused = flood - POOLS.followers
            assert await eventually_awaited(lambda: _refused_all(http, refused), within_s=10)
            new = await _events(http, "POST", json={"prompt": "y", "max_tokens": 20})
        finally:
            for writer in idle:
                writer.close()
        assert await eventually(lambda: store.seats.taken == 0)
        held = await _events(http, "GET", headers={"Last-Event-ID": "held:1"})
    assert [e.event for e in new[-2:]] == ["usage", "done"]
    assert sum(e.event == "token" for e in new) == 20
    assert [e.id for e in held] == [f"held:{seq}" for seq in range(2, len(held) + 2)]
    assert held[-1].event == "done"
    assert json.loads(held[-1].data)["finish_reason"] == "length"


async def _refused_all(http: httpx.AsyncClient, count: int) -> bool:
    return await _rejected(http) >= count


async def test_a_generation_writes_while_every_reader_connection_is_taken(
    small: RunningEdge, redis_server: RedisServer
) -> None:
    """Every connection of the readers' pool held (as by readers waiting for events): the
    stream being generated is still stored to its `done`, through the writers' own pool."""
    store = _store(small)
    pools = [(store.reads.connection_pool, POOLS.reads), (store.waits.connection_pool, POOLS.waits)]
    async with httpx.AsyncClient(base_url=small.url, timeout=30) as http:
        await _started(http, "written", LONG)
        held = [(pool, await pool.get_connection()) for pool, size in pools for _ in range(size)]
        try:
            async with aioredis.Redis(port=redis_server.port) as probe:

                async def stored_to_done() -> bool:
                    last = await probe.xrevrange("tokenwire:resume:written:events", count=1)
                    return bool(last) and last[0][1][b"n"] == b"done"

                done = await eventually_awaited(stored_to_done, within_s=15)
                events = await probe.xlen("tokenwire:resume:written:events")
        finally:
            for pool, connection in held:
                await pool.release(connection)
    assert done
    assert events == 300 + 2  # every token, `usage` and `done`


async def test_a_write_the_store_refuses_for_a_moment_is_tried_again(
    small: RunningEdge, redis_server: RedisServer
) -> None:
    """Redis refuses writes (out of memory) for a moment mid-stream: the edge tries the write
    again, and its reader gets every event once and `done`, from the one generation that
    began it (the edge never takes its own stream over)."""
    events: list[ServerSentEvent] = []
    async with (
        aioredis.Redis(port=redis_server.port) as admin,
        httpx.AsyncClient(base_url=small.url, timeout=30) as http,
    ):
        await admin.config_set("maxmemory-policy", "noeviction")
        with capture_logs() as logs:
            body = {"prompt": "x", "max_tokens": 100, "ignore_eos": True}
            headers = {"X-Request-ID": "refused"}
            async with aconnect_sse(
                http, "POST", "/v1/generate", json=body, headers=headers
            ) as source:
                async for event in source.aiter_sse():
                    events.append(event)
                    if len(events) == 3:
                        await admin.config_set("maxmemory", 1)

                        async def refused_twice() -> bool:
                            stats = await admin.info("errorstats")
                            return int(stats.get("errorstat_OOM", {}).get("count", 0)) >= 2

                        assert await eventually_awaited(refused_twice, within_s=5)
                        await admin.config_set("maxmemory", 0)
    names = {line["event"] for line in logs}
    assert [e.id for e in events] == [f"refused:{seq}" for seq in range(1, 103)]
    assert [e.event for e in events[-2:]] == ["usage", "done"]
    assert "edge.stream_write_retried" in names
    assert not names & {"edge.stream_taken_over", "edge.stream_lease_lost"}
