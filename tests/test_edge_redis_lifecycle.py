"""A native stream's expiry and cancel in the shared (Redis) resume store, as in the in-memory
one: a reader about to attach holds the expiry off, on whichever edge it came to; a stream
dropped unfinished ends with a GONE `error` for its readers, and one whose last event came as
it was dropped ends as finished; a cancel that reaches another edge while the stream is still
opening is answered at once and cancels it once open. Real servers and edges on 127.0.0.1, one
real redis-server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse

from tests import sse
from tests.conftest import RunningEdge, RunningServer, eventually, start_edge
from tests.redisproc import RedisServer
from tests.replicas import SlowOpening
from tokenwire.edge import native, redis_readers
from tokenwire.edge.pipeline import Frame
from tokenwire.edge.redis_store import RedisStreams
from tokenwire.edge.store import StoredStream

LONG = {"prompt": "x", "max_tokens": 450, "ignore_eos": True}
"""About 4.5 s on the paced server (a token every 10 ms)."""
SHORT = {"prompt": "x", "max_tokens": 60, "ignore_eos": True}
K1 = {"Authorization": "Bearer k1"}
K2 = {"Authorization": "Bearer k2"}


async def _redis_edge(target: str, url: str, window_s: float, lease_s: float = 0.3) -> RunningEdge:
    """An edge on the Redis store whose lease is refreshed (and expiry checked) every third of
    `lease_s` (0.1 s)."""
    return await start_edge(
        target, resume_store=url, resume_window_s=window_s, resume_lease_s=lease_s
    )


async def _lapsed(url: str, request_id: str) -> bool:
    """Whether the id's keys in the store lapse (within 10 s)."""
    async with aioredis.from_url(url) as store:
        meta = f"tokenwire:resume:{request_id}:meta"
        deadline = time.monotonic() + 10
        while await store.exists(meta) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not await store.exists(meta)


def _store(edge: RunningEdge) -> RedisStreams:
    store = edge.store
    assert isinstance(store, RedisStreams)
    return store


def _slow_start(
    monkeypatch: pytest.MonkeyPatch, delay_s: float, started: asyncio.Event | None = None
) -> None:
    """Every response from now on begins reading its stream `delay_s` late (as a response
    whose body waits for a slow proxy does); `started` is set as it begins."""
    original = native.native_frames

    async def slow(stream: StoredStream, after: int) -> AsyncGenerator[Frame, None]:
        if started is not None:
            started.set()
        await asyncio.sleep(delay_s)
        async for frame in original(stream, after):
            yield frame

    monkeypatch.setattr(native, "native_frames", slow)


async def test_the_response_that_opened_a_stream_holds_it_until_it_reads(
    paced: RunningServer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no resume window, the response of the request that opened a stream, whose body
    begins reading 0.4 s late (four expiry checks), still gets every event up to `done`: the
    expiry waits for the reader about to attach."""
    _slow_start(monkeypatch, 0.4)
    edge = await _redis_edge(paced.target, redis_server.url, 0.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
            headers = {"X-Request-ID": "opened"}
            _, events = await sse.events(
                client, "POST", "/v1/generate", json=SHORT, headers=headers
            )
    finally:
        await edge.edge.stop()
    assert [e.id for e in events] == [f"opened:{seq}" for seq in range(1, 63)]
    assert json.loads(events[-1].data)["finish_reason"] == "length"


async def test_a_resume_on_another_edge_holds_the_stream_until_it_reads(
    paced: RunningServer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no resume window, a resume on edge B that found edge A's stream, whose response
    begins reading 0.5 s late, while A's one reader leaves meanwhile, still gets every event
    after its Last-Event-ID up to `done`: A's expiry waits for the reader B is about to
    attach."""
    a = await _redis_edge(paced.target, redis_server.url, 0.0)
    b = await _redis_edge(paced.target, redis_server.url, 0.0)
    started = asyncio.Event()
    body = {**SHORT, "max_tokens": 100}
    try:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=10) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b,
        ):
            headers = {"X-Request-ID": "found"}
            async with aconnect_sse(
                on_a, "POST", "/v1/generate", json=body, headers=headers
            ) as source:
                first = await anext(aiter(source.aiter_sse()))
                _slow_start(monkeypatch, 0.5, started)
                resume = asyncio.create_task(
                    sse.events(
                        on_b,
                        "GET",
                        "/v1/generate/found/events",
                        headers={"Last-Event-ID": first.id},
                    )
                )
                await asyncio.wait_for(started.wait(), 5)
            # A's reader has left: nobody reads the stream, and its window is 0.
            _, rest = await asyncio.wait_for(resume, 10)
    finally:
        await a.edge.stop()
        await b.edge.stop()
    assert [e.id for e in rest] == [f"found:{seq}" for seq in range(2, 103)]
    assert json.loads(rest[-1].data)["finish_reason"] == "length"


async def test_a_refused_resume_on_another_edge_holds_nothing_past_its_readers(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """With no resume window, a resume on edge B refused (its Last-Event-ID past the stream's
    last event) holds nothing for a reader that will never come: when the stream's one reader
    on edge A then leaves, the generation is cancelled at the server at once, not when what
    the refused resume held lapses (2 s)."""
    a = await _redis_edge(paced.target, redis_server.url, 0.0)
    b = await _redis_edge(paced.target, redis_server.url, 0.0)
    try:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=10) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b,
        ):
            headers = {"X-Request-ID": "kept"}
            async with aconnect_sse(
                on_a, "POST", "/v1/generate", json=LONG, headers=headers
            ) as source:
                first = await anext(aiter(source.aiter_sse()))
                assert first.id == "kept:1"
                refused = await on_b.get(
                    "/v1/generate/kept/events", headers={"Last-Event-ID": "kept:9999"}
                )
            left = asyncio.get_running_loop().time()
            stopped = await eventually(lambda: paced.engine.active_count == 0, within_s=3)
            took = asyncio.get_running_loop().time() - left
    finally:
        await a.edge.stop()
        await b.edge.stop()
    assert refused.status_code == 400
    assert stopped
    assert took < 1.0


async def test_a_reader_on_a_stream_dropped_unfinished_gets_a_gone_error(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """A reader attached to a stream that is dropped unfinished (its edge's marks never reach
    the store, so nobody reads it as far as the store knows, and its window passes) gets the
    stored events, then an `error` event (GONE) saying it expired, with the next seq: never a
    stream that just stops, nor one whose events vanish under its reader."""
    edge = await _redis_edge(paced.target, redis_server.url, 0.3)
    store = _store(edge)

    async def unmarked(*_: Any, **__: Any) -> int:
        return 1

    store.scripts["WATCH"] = unmarked  # type: ignore[assignment]
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
            headers = {"X-Request-ID": "dropped"}
            _, events = await sse.events(client, "POST", "/v1/generate", json=LONG, headers=headers)
    finally:
        await edge.edge.stop()
    assert len(events) > 1
    assert {event.event for event in events[:-1]} == {"token"}
    assert [event.id for event in events] == [f"dropped:{seq}" for seq in range(1, len(events) + 1)]
    assert events[-1].event == "error"
    assert json.loads(events[-1].data)["code"] == "GONE"
    assert len(events) < 400


async def test_a_stream_whose_last_event_comes_as_it_is_dropped_ends_as_finished(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """A stream nobody read for its window, whose `done` (a cancel, here the edge's drain) is
    queued while the edge drops it, ends with that `done` as a finished stream does: a replay
    gets every event up to it, and its id stays taken (409), not a 410 for a stream that
    finished and an id free again a second later."""
    edge = await _redis_edge(paced.target, redis_server.url, 2.0)
    store = _store(edge)
    drop = store.scripts["ABANDON"]

    async def dropped_as_cancelled(*args: Any, **kwargs: Any) -> Any:
        verdict = await drop(*args, **kwargs)
        store.cancel_all()  # comes while the drop's answer is on its way
        return verdict

    store.scripts["ABANDON"] = dropped_as_cancelled  # type: ignore[assignment]
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
            headers = {"X-Request-ID": "raced"}
            await sse.first_event(client, "POST", "/v1/generate", json=LONG, headers=headers)
            assert await eventually(lambda: store.live == 0, within_s=6)
            replay, events = await sse.events(client, "GET", "/v1/generate/raced/events")
            again = await client.post("/v1/generate", json=SHORT, headers=headers)
    finally:
        await edge.edge.stop()
    assert replay.status_code == 200
    assert [event.id for event in events] == [f"raced:{seq}" for seq in range(1, len(events) + 1)]
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"
    assert again.status_code == 409


async def _behind_a_lapsed_stream(
    edge: RunningEdge, url: str, request_id: str, *, reopen: bool
) -> list[tuple[int, str]]:
    """A finished stream's reader that read its first event, then fell behind until the
    stream's keys lapsed (its window of 1 s), after which (with `reopen`) another stream took
    the id: the (seq, name) of what that reader gets. Readers read the store one event at a
    time here (READ_COUNT), so the reader holds none of the rest when the keys lapse."""
    headers = {"X-Request-ID": request_id}
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        await sse.events(http, "POST", "/v1/generate", json=SHORT, headers=headers)
        reader = (await _store(edge).get(request_id, None)).follow(0)
        first = await anext(reader)
        assert await _lapsed(url, request_id)
        if reopen:
            body = {**SHORT, "max_tokens": 100}
            await sse.events(http, "POST", "/v1/generate", json=body, headers=headers)
        rest = [event async for event in reader]
    return [(e.seq, e.name) for e in [first, *rest]]


@pytest.mark.parametrize("reopen", [False, True], ids=["lapsed", "id-taken-since"])
async def test_a_reader_behind_a_stream_whose_keys_lapsed_gets_a_gone_error(
    paced: RunningServer, redis_server: RedisServer, reopen: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that fell behind a finished stream until its keys lapsed gets a GONE `error`
    for the events it had not read: it does not end silently, nor go on with the events of a
    stream that took the id since."""
    monkeypatch.setattr(redis_readers, "READ_COUNT", 1)
    edge = await _redis_edge(paced.target, redis_server.url, 1.0)
    try:
        read = await _behind_a_lapsed_stream(
            edge, redis_server.url, f"behind-{reopen}", reopen=reopen
        )
    finally:
        await edge.edge.stop()
    assert read == [(1, "token"), (0, "error")]


async def test_a_cancel_on_another_edge_while_the_stream_opens_cancels_it_once_open(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """A cancel that reaches edge B while edge A's server is still opening the stream answers
    `cancelled: true` (not 404), and the stream, once open, ends with `done` / cancelled
    instead of running to its end."""
    replica = SlowOpening(paced.target, 0.5)
    await replica.start()
    a = await _redis_edge(replica.target, redis_server.url, 2.0)
    b = await _redis_edge(paced.target, redis_server.url, 2.0)
    try:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=10) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b,
        ):
            headers = {"X-Request-ID": "early"}
            reading = asyncio.create_task(
                sse.events(on_a, "POST", "/v1/generate", json=LONG, headers=headers)
            )
            await asyncio.sleep(0.2)  # A has claimed the id; the replica answers at 0.5 s
            reply = await on_b.post("/v1/generate/early/cancel", json={})
            _, events = await asyncio.wait_for(reading, 10)
    finally:
        await a.edge.stop()
        await b.edge.stop()
        await replica.stop()
    assert reply.json() == {"request_id": "early", "cancelled": True}
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"
    assert len(events) < 100


async def test_a_cancel_while_another_edge_opens_the_stream_is_answered_at_once(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """With API keys, a cancel that reaches edge B while edge A's server takes 3 s to open the
    stream is answered at once (within 1 s): for another key, the 404 of an unknown id; for
    the key that opened it, `cancelled: true`, and the stream, once open, ends with `done` /
    cancelled."""
    replica = SlowOpening(paced.target, 3.0)
    await replica.start()
    keys = {"resume_window_s": 2.0, "resume_lease_s": 0.3, "api_keys": ("k1", "k2")}
    a = await start_edge(replica.target, resume_store=redis_server.url, **keys)
    b = await start_edge(paced.target, resume_store=redis_server.url, **keys)
    try:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=10) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b,
        ):
            headers = {**K1, "X-Request-ID": "opening"}
            reading = asyncio.create_task(
                sse.events(on_a, "POST", "/v1/generate", json=LONG, headers=headers)
            )
            await asyncio.sleep(0.3)  # A has claimed the id; the replica answers at 3 s
            started = time.monotonic()
            foreign = await on_b.post("/v1/generate/opening/cancel", json={}, headers=K2)
            foreign_s = time.monotonic() - started
            started = time.monotonic()
            own = await on_b.post("/v1/generate/opening/cancel", json={}, headers=K1)
            own_s = time.monotonic() - started
            _, events = await asyncio.wait_for(reading, 10)
    finally:
        await a.edge.stop()
        await b.edge.stop()
        await replica.stop()
    assert foreign.status_code == 404
    assert foreign_s < 1.0
    assert own.json() == {"request_id": "opening", "cancelled": True}
    assert own_s < 1.0
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"
    assert len(events) < 100


async def test_an_id_whose_edge_died_opening_it_is_free_once_its_claim_lapses(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """An id claimed by an edge that died before its server answered is free again once its
    claim lapses (three of that edge's leases, at least 3 s), not a minute later: a new stream
    under it on another edge is served."""
    a = await _redis_edge(paced.target, redis_server.url, 2.0)
    await _store(a).claim("orphaned")
    await a.edge.stop()  # dies with the id claimed
    b = await _redis_edge(paced.target, redis_server.url, 2.0)
    headers = {"X-Request-ID": "orphaned"}
    try:
        assert await _lapsed(redis_server.url, "orphaned")
        async with httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
            _, events = await sse.events(on_b, "POST", "/v1/generate", json=SHORT, headers=headers)
    finally:
        await b.edge.stop()
    assert events[-1].event == "done"


async def test_an_edge_whose_claim_lapsed_while_its_server_opened_gives_the_id_up(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """Edge A claims an id and its server takes 1 s to open the stream; meanwhile A's claim
    lapses (deleted here, as when A could not renew it) and edge B claims the id. When A's
    server answers, A does not open its stream over B's claim: its caller gets a 409, and B's
    claim stands."""
    replica = SlowOpening(paced.target, 1.0)
    await replica.start()
    a = await _redis_edge(replica.target, redis_server.url, 2.0)
    b = await _redis_edge(paced.target, redis_server.url, 2.0)
    meta = "tokenwire:resume:contested:meta"
    try:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=10) as on_a,
            aioredis.from_url(redis_server.url) as store,
        ):
            headers = {"X-Request-ID": "contested"}
            opening = asyncio.create_task(on_a.post("/v1/generate", json=SHORT, headers=headers))
            assert await eventually(lambda: replica.started > 0)
            await store.delete(meta)
            await _store(b).claim("contested")
            answer = await asyncio.wait_for(opening, 10)
            claimer = await store.hget(meta, "claimer")
    finally:
        await a.edge.stop()
        await b.edge.stop()
        await replica.stop()
    assert answer.status_code == 409
    assert claimer is not None
    assert claimer.decode().startswith(f"{_store(b).edge}:")


async def test_an_id_an_edge_is_opening_is_taken_there_even_where_its_claim_lapsed(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """An edge whose server takes 1 s to open a stream refuses a second request under the same
    id (409) even where the id's claim in the store has lapsed meanwhile (deleted here): the
    second never claims it over the first, which opens its stream as asked."""
    replica = SlowOpening(paced.target, 1.0)
    await replica.start()
    a = await _redis_edge(replica.target, redis_server.url, 2.0)
    headers = {"X-Request-ID": "twice"}
    try:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=10) as on_a,
            aioredis.from_url(redis_server.url) as store,
        ):
            first = asyncio.create_task(
                sse.events(on_a, "POST", "/v1/generate", json=SHORT, headers=headers)
            )
            assert await eventually(lambda: replica.started > 0)
            await store.delete("tokenwire:resume:twice:meta")
            second = await on_a.post("/v1/generate", json=SHORT, headers=headers)
            _, events = await asyncio.wait_for(first, 10)
    finally:
        await a.edge.stop()
        await replica.stop()
    assert second.status_code == 409
    assert events[-1].event == "done"


async def test_a_cancel_of_an_id_whose_edge_died_opening_it_is_answered_at_once(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """An id claimed by an edge that died before its server answered (its claim holds for
    three leases, 30 s here): a cancel on another edge is answered at once, and that edge
    then stops at once, with no request of it still waiting on the claim."""
    a = await _redis_edge(paced.target, redis_server.url, 2.0, lease_s=10.0)
    await _store(a).claim("orphan")
    await a.edge.stop()  # dies with the id claimed
    b = await _redis_edge(paced.target, redis_server.url, 2.0, lease_s=10.0)
    try:
        async with httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
            reply = await asyncio.wait_for(on_b.post("/v1/generate/orphan/cancel", json={}), 1.0)
    finally:
        started = time.monotonic()
        await b.edge.stop()
        stop_s = time.monotonic() - started
    assert reply.json() == {"request_id": "orphan", "cancelled": True}
    assert stop_s < 1.0
