"""The edge's shared resume store: two edges in front of one server, one real redis-server.

A stream started on one edge can be resumed on the other (it reads what the first writes); ids,
owners and expiry answer as with the in-memory store; a dead store is a 503, never a 500.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.conftest import (
    MODEL,
    RunningEdge,
    RunningServer,
    cancelled_after,
    eventually,
    start_edge,
    start_server,
)
from tests.fakes import ScriptedModel
from tests.procs import EdgeProcess, ServerProcess
from tests.redisproc import RedisServer, free_port
from tokenwire.common.settings import SettingsError
from tokenwire.edge.redis_store import RedisStreams
from tokenwire.edge.resumable import ResumableStreams
from tokenwire.edge.settings import EdgeSettings
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer

BODY = {"prompt": "class Tree:", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
K1 = {"Authorization": "Bearer k1"}
K2 = {"Authorization": "Bearer k2"}


async def _pair(target: str, url: str, **overrides: object) -> tuple[RunningEdge, RunningEdge]:
    settings = {"resume_store": url, "resume_window_s": 2.0, "resume_lease_s": 0.5, **overrides}
    return await start_edge(target, **settings), await start_edge(target, **settings)


@pytest.fixture
async def edges(
    served: RunningServer, redis_server: RedisServer
) -> AsyncIterator[tuple[RunningEdge, RunningEdge]]:
    """Edges A and B in front of the shared server, both on one Redis."""
    a, b = await _pair(served.target, redis_server.url)
    yield a, b
    await a.edge.stop()
    await b.edge.stop()


async def _events(
    http: httpx.AsyncClient, method: str, url: str, **kwargs: object
) -> list[ServerSentEvent]:
    async with aconnect_sse(http, method, url, **kwargs) as source:  # type: ignore[arg-type]
        return [e async for e in source.aiter_sse()]


async def _first(
    http: httpx.AsyncClient, count: int, body: dict[str, object], **kwargs: object
) -> list[ServerSentEvent]:
    """Start a stream and leave after `count` events (it keeps generating for the window)."""
    events: list[ServerSentEvent] = []
    async with aconnect_sse(http, "POST", "/v1/generate", json=body, **kwargs) as source:  # type: ignore[arg-type]
        async for event in source.aiter_sse():
            events.append(event)
            if len(events) == count:
                break
    return events


async def _status_within(http: httpx.AsyncClient, path: str, status: int, within_s: float) -> int:
    """GET path until it answers `status` or within_s passes; the last status it answered."""
    deadline = asyncio.get_running_loop().time() + within_s
    while (answer := (await http.get(path)).status_code) != status:
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.02)
    return answer


def _text(events: list[ServerSentEvent]) -> str:
    return "".join(json.loads(e.data)["text"] for e in events if e.event == "token")


async def test_a_resume_on_another_edge_gets_exactly_the_missing_events(
    edges: tuple[RunningEdge, RunningEdge],
) -> None:
    """Leave edge A's stream after 5 events; Last-Event-ID on edge B (A alive) replays the rest:
    ids 1..n once each, then `done`, and the text of an uninterrupted run."""
    a, b = edges
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
    ):
        whole = await _events(on_a, "POST", "/v1/generate", json=BODY)
        first = await _first(on_a, 5, BODY)
        rest = await _events(on_b, "GET", "/v1/generate", headers={"Last-Event-ID": first[-1].id})
    request_id = first[0].id.rsplit(":", 1)[0]
    events = first + rest
    assert [e.id for e in events] == [f"{request_id}:{i}" for i in range(1, len(events) + 1)]
    assert events[-1].event == "done"
    assert _text(events) == _text(whole)


async def test_a_finished_stream_replays_whole_on_either_edge_at_once(
    edges: tuple[RunningEdge, RunningEdge],
) -> None:
    """A stream that has ended, read again from its start (GET .../events, no Last-Event-ID)
    on its own edge and on the other, gives every event through `done` at once, well within
    the resume window, not an error when the window ends."""
    a, b = edges
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
    ):
        live = await _events(on_a, "POST", "/v1/generate", json=BODY)
        request_id = live[0].id.rsplit(":", 1)[0]
        for http in (on_a, on_b):
            started = asyncio.get_running_loop().time()
            again = await _events(http, "GET", f"/v1/generate/{request_id}/events")
            assert asyncio.get_running_loop().time() - started < 1.0
            assert [(e.id, e.event, e.data) for e in again] == [
                (e.id, e.event, e.data) for e in live
            ]


async def test_an_unknown_id_is_the_same_404_as_in_memory(
    served: RunningServer, edges: tuple[RunningEdge, RunningEdge]
) -> None:
    """A never-seen id on the Redis store answers exactly what the in-memory store answers."""
    memory = await start_edge(served.target)
    try:
        replies = []
        for edge in (edges[0], memory):
            async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
                replies.append(
                    await http.get("/v1/generate/nope/events", headers={"Last-Event-ID": "nope:3"})
                )
    finally:
        await memory.edge.stop()
    redis_reply, memory_reply = replies
    assert redis_reply.status_code == 404
    assert (redis_reply.status_code, redis_reply.json()) == (
        memory_reply.status_code,
        memory_reply.json(),
    )


async def test_streams_opened_together_keep_no_more_than_the_total(
    served: RunningServer, redis_server: RedisServer
) -> None:
    """Six streams opened at once on a Redis-backed edge, each generating past its own 4 KiB
    bound, keep at most the 8 KiB total between them while they generate, and every reader
    gets its whole stream."""
    edge = await start_edge(
        served.target,
        resume_store=redis_server.url,
        resume_stream_bytes=4096,
        resume_total_bytes=8192,
    )
    store = edge.store
    assert isinstance(store, RedisStreams)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, store.bytes)
            await asyncio.sleep(0)

    body = {**BODY, "max_tokens": 80, "ignore_eos": True}
    watcher = asyncio.create_task(watch())
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            streams = await asyncio.gather(
                *(_events(http, "POST", "/v1/generate", json=body) for _ in range(6))
            )
    finally:
        watcher.cancel()
        await edge.edge.stop()
    assert [sum(e.event == "token" for e in events) for events in streams] == [80] * 6
    assert 0 < peak <= 8192


async def _resume_after_drop(target: str, **overrides: object) -> httpx.Response:
    """Leave a stream after 2 events on an edge with a 1 KiB buffer; once it has generated
    every token, resume it from the second event."""
    edge = await start_edge(
        target, resume_window_s=5.0, resume_stream_bytes=1024, resume_lease_s=0.5, **overrides
    )
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            first = await _first(http, 2, {**BODY, "max_tokens": 60})
            # The edge generates no stream once the last event is stored.
            assert await eventually(lambda: edge.store.live == 0)
            return await http.get("/v1/generate", headers={"Last-Event-ID": first[-1].id})
    finally:
        await edge.edge.stop()


async def test_a_resume_from_dropped_events_is_the_same_410_as_in_memory(
    served: RunningServer, redis_server: RedisServer
) -> None:
    """Events trimmed from the stored stream: the resume is the in-memory store's JSON 410,
    answered before any stream starts."""
    redis_reply = await _resume_after_drop(served.target, resume_store=redis_server.url)
    memory_reply = await _resume_after_drop(served.target)
    assert redis_reply.status_code == 410
    assert redis_reply.headers["content-type"] == "application/json"
    assert redis_reply.json() == memory_reply.json()


async def test_a_resume_past_the_last_event_is_the_same_400_as_in_memory(
    served: RunningServer, edges: tuple[RunningEdge, RunningEdge]
) -> None:
    """A seq past a finished stream's last event: the in-memory store's 400 naming
    Last-Event-ID, on the Redis store too."""
    memory = await start_edge(served.target)
    try:
        replies = []
        for edge in (edges[0], memory):
            async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
                events = await _events(http, "POST", "/v1/generate", json=BODY)
                request_id = events[0].id.rsplit(":", 1)[0]
                replies.append(
                    await http.get("/v1/generate", headers={"Last-Event-ID": f"{request_id}:999"})
                )
    finally:
        await memory.edge.stop()
    redis_reply, memory_reply = replies
    assert redis_reply.status_code == 400
    assert redis_reply.json() == memory_reply.json()


async def test_another_keys_stream_is_404_on_every_edge(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """k2 resuming or cancelling k1's live stream on the other edge gets the unknown-id 404."""
    a, b = await _pair(paced.target, redis_server.url, api_keys=("k1", "k2"))
    try:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
        ):
            long = {"prompt": "x", "max_tokens": 150, "ignore_eos": True}
            await _first(on_a, 1, long, headers={**K1, "X-Request-ID": "k1-stream"})
            foreign = await on_b.get(
                "/v1/generate/k1-stream/events", headers={**K2, "Last-Event-ID": "k1-stream:0"}
            )
            cancel = await on_b.post("/v1/generate/k1-stream/cancel", json={}, headers=K2)
            unknown = await on_b.get(
                "/v1/generate/never/events", headers={**K2, "Last-Event-ID": "never:0"}
            )
            own = await _events(
                on_b,
                "GET",
                "/v1/generate/k1-stream/events",
                headers={**K1, "Last-Event-ID": "k1-stream:1"},
            )
    finally:
        await a.edge.stop()
        await b.edge.stop()
    expected = unknown.json()["error"]["message"].replace("never", "k1-stream")
    assert (foreign.status_code, cancel.status_code) == (404, 404)
    assert foreign.json()["error"]["message"] == expected
    assert json.loads(own[-1].data)["finish_reason"] == "length"


async def test_a_resumable_id_is_taken_on_every_edge(
    edges: tuple[RunningEdge, RunningEdge],
) -> None:
    """An id whose stream started on edge A is refused on edge B with 409 naming request_id."""
    a, b = edges
    headers = {"X-Request-ID": "shared-id"}
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
    ):
        await _events(on_a, "POST", "/v1/generate", json=BODY, headers=headers)
        again = await on_b.post("/v1/generate", json=BODY, headers=headers)
    assert again.status_code == 409
    assert again.json()["error"]["field"] == "request_id"


async def test_a_cancel_on_another_edge_ends_the_stream(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """POST /cancel on edge B ends edge A's stream: its reader on A gets `done` (cancelled) and
    the server's slot is freed."""
    a, b = await _pair(paced.target, redis_server.url)
    body = {"prompt": "x", "max_tokens": 400, "ignore_eos": True}
    try:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
        ):
            events, reply = await cancelled_after(on_a, on_b, 3, body, "c1")
        assert reply.json() == {"request_id": "c1", "cancelled": True}
        assert await eventually(lambda: paced.engine.active_count == 0, within_s=5)
    finally:
        await a.edge.stop()
        await b.edge.stop()
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"
    assert len(events) < 400


async def test_cancelling_an_ended_stream_on_another_edge_says_it_was_not_cancelled(
    edges: tuple[RunningEdge, RunningEdge],
) -> None:
    """The cancel route on edge B for a stream edge A finished answers `cancelled: false`."""
    a, b = edges
    body = {"prompt": "x", "max_tokens": 3, "ignore_eos": True}
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
    ):
        async with aconnect_sse(
            on_a, "POST", "/v1/generate", json=body, headers={"X-Request-ID": "ended-b"}
        ) as source:
            events = [e async for e in source.aiter_sse()]
        reply = await on_b.post("/v1/generate/ended-b/cancel", json={})
    assert events[-1].event == "done"
    assert reply.json() == {"request_id": "ended-b", "cancelled": False}


async def test_a_stream_nobody_reads_is_cancelled_after_the_window_then_410(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """Left alone for the window, the stream's generation is cancelled upstream and its id
    answers 410 to its owner on either edge."""
    a, b = await _pair(paced.target, redis_server.url, resume_window_s=0.5, resume_lease_s=0.3)
    body = {"prompt": "x", "max_tokens": 450, "ignore_eos": True}
    try:
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
            async with httpx.AsyncClient(base_url=a.url, timeout=30) as on_a:
                await _first(on_a, 1, body, headers={"X-Request-ID": "left"})
            assert await eventually(lambda: paced.engine.active_count == 0, within_s=5)
            gone = await _status_within(on_b, "/v1/generate/left/events", 410, within_s=5)
    finally:
        await a.edge.stop()
        await b.edge.stop()
    assert gone == 410


async def test_an_unreachable_store_is_503_not_500(served: RunningServer) -> None:
    """With Redis down, starting a stream is refused with 503 and the upstream call ends."""
    edge = await start_edge(served.target, resume_store=f"redis://127.0.0.1:{free_port()}/0")
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            reply = await http.post("/v1/generate", json=BODY)
            resume = await http.get("/v1/generate/x/events", headers={"Last-Event-ID": "x:1"})
        assert await eventually(lambda: served.engine.active_count == 0, within_s=5)
    finally:
        await edge.edge.stop()
    assert (reply.status_code, resume.status_code) == (503, 503)
    assert reply.json()["error"]["code"] == "UNAVAILABLE"


@pytest.mark.parametrize(
    "url",
    [
        "memcached://x:1",
        "redis://x:port/0",
        "redis://x/db",
        "redis://:6379",
        "rds://u:pw@x",
        "rds://x/0?password=pw",
    ],
)
def test_a_resume_store_that_is_no_redis_url_names_the_setting(url: str) -> None:
    """TOKENWIRE_RESUME_STORE must be empty or a redis://, rediss:// or unix:// URL the client
    can open; the error names the variable and never repeats a password."""
    with pytest.raises(SettingsError, match="resume_store") as raised:
        EdgeSettings.from_env({"TOKENWIRE_RESUME_STORE": url})
    assert "TOKENWIRE_RESUME_STORE" in str(raised.value)
    assert "pw" not in str(raised.value)


async def test_the_edge_uses_redis_only_when_told(
    edges: tuple[RunningEdge, RunningEdge], edge: RunningEdge
) -> None:
    """With --resume-store the edge's store is the Redis one; without, it stays in memory."""
    assert isinstance(edges[0].store, RedisStreams)
    assert isinstance(edge.store, ResumableStreams)


LONG = {"prompt": "def fib(n):", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
KILL_AFTER = 30


@pytest.fixture
def two_edge_processes(
    redis_server: RedisServer,
) -> Iterator[tuple[ServerProcess, EdgeProcess, EdgeProcess]]:
    """One `tokenwire serve` and two `tokenwire edge` processes sharing one Redis."""
    server = ServerProcess("--metrics-port", "0")
    store = ("--resume-store", redis_server.url, "--resume-lease-s", "1")
    a = EdgeProcess(server.target, *store)
    b = EdgeProcess(server.target, *store)
    server.wait_for("server.started")
    yield server, a, b
    for process in (a, b, server):
        process.close()


@pytest.mark.slow
async def test_a_stream_whose_edge_is_killed_continues_on_the_other_edge(
    two_edge_processes: tuple[ServerProcess, EdgeProcess, EdgeProcess],
) -> None:
    """kill -9 edge A after 30 events of a 400-token greedy stream; Last-Event-ID on edge B
    gets exactly the missing events (B continues the generation), then `done`; the joined text
    equals an uninterrupted greedy run."""
    _, a, b = two_edge_processes
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=60) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=60) as on_b,
    ):
        first = await _first(on_a, KILL_AFTER, LONG)
        a.proc.kill()
        rest = await _events(on_b, "GET", "/v1/generate", headers={"Last-Event-ID": first[-1].id})
        whole = await _events(on_b, "POST", "/v1/generate", json=LONG)
    taken = b.wait_for("edge.stream_taken_over", timeout=5)
    request_id = first[0].id.rsplit(":", 1)[0]
    events = first + rest
    assert [e.id for e in events] == [f"{request_id}:{i}" for i in range(1, len(events) + 1)]
    assert [e.event for e in events[-2:]] == ["usage", "done"]
    assert [json.loads(e.data)["index"] for e in events if e.event == "token"] == list(range(400))
    assert _text(events) == _text(whole)
    assert taken["request_id"] == request_id


@pytest.mark.slow
async def test_a_keyed_stream_taken_over_keeps_its_callers_id_and_its_scope(
    redis_server: RedisServer,
) -> None:
    """With API keys, a stream whose edge is killed goes on from the other edge under the same
    key-scoped id at the server (both calls' server log lines name it), and its Usage shows
    the caller's own id."""
    server = ServerProcess("--metrics-port", "0")
    store = ("--resume-store", redis_server.url, "--resume-lease-s", "1")
    keys = {"TOKENWIRE_API_KEYS": "k1,k2"}
    a, b = (
        EdgeProcess(server.target, *store, env=keys),
        EdgeProcess(server.target, *store, env=keys),
    )
    try:
        server.wait_for("server.started")
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=60) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=60) as on_b,
        ):
            headers = {**K1, "X-Request-ID": "keyed-stream"}
            first = await _first(on_a, KILL_AFTER, LONG, headers=headers)
            a.proc.kill()
            rest = await _events(
                on_b, "GET", "/v1/generate", headers={**K1, "Last-Event-ID": first[-1].id}
            )
        b.wait_for("edge.stream_taken_over", timeout=5)
        server.terminate()
        server.wait_for("server.stopped", timeout=30)  # every line before it has been read
        finished = [r for r in server.records if r.get("event") == "request.finished"]
    finally:
        for process in (a, b, server):
            process.close()
    [usage] = [json.loads(e.data) for e in rest if e.event == "usage"]
    scoped = {str(r["request_id"]) for r in finished}
    assert usage["request_id"] == "keyed-stream"
    assert len(finished) == 2
    assert len(scoped) == 1
    assert scoped.pop().endswith(":keyed-stream")


@pytest.mark.slow
async def test_a_reader_on_the_other_edge_rides_through_the_kill(
    two_edge_processes: tuple[ServerProcess, EdgeProcess, EdgeProcess],
) -> None:
    """A reader already tailing edge A's stream on edge B, when A is killed, needs no
    reconnect: B takes the stream over and the reader's events run on to `done`, each seq once."""
    _, a, b = two_edge_processes
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=60) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=60) as on_b,
    ):
        first = await _first(on_a, 5, LONG)
        events = list(first)
        async with aconnect_sse(
            on_b, "GET", "/v1/generate", headers={"Last-Event-ID": first[-1].id}
        ) as source:
            async for event in source.aiter_sse():
                events.append(event)
                if len(events) == KILL_AFTER:
                    a.proc.kill()
    b.wait_for("edge.stream_taken_over", timeout=5)
    request_id = first[0].id.rsplit(":", 1)[0]
    assert [e.id for e in events] == [f"{request_id}:{i}" for i in range(1, len(events) + 1)]
    assert [json.loads(e.data)["index"] for e in events if e.event == "token"] == list(range(400))
    assert events[-1].event == "done"


async def test_a_store_lost_mid_stream_ends_it_with_an_error_event(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """kill -9 of Redis while a stream is read: the reader's stream ends with an `error`
    event (UNAVAILABLE, without an id, so the client's Last-Event-ID stays on the last real
    event) and the generation is cancelled upstream."""
    edge = await start_edge(paced.target, resume_store=redis_server.url, resume_lease_s=0.5)
    body = {"prompt": "x", "max_tokens": 400, "ignore_eos": True}
    events: list[ServerSentEvent] = []
    try:
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
            aconnect_sse(http, "POST", "/v1/generate", json=body) as source,
        ):
            async for event in source.aiter_sse():
                events.append(event)
                if len(events) == 3:
                    redis_server.proc.kill()
        assert await eventually(lambda: paced.engine.active_count == 0, within_s=5)
    finally:
        await edge.edge.stop()
    assert events[-1].event == "error"
    assert json.loads(events[-1].data)["code"] == "UNAVAILABLE"
    assert events[-1].id == events[-2].id  # no id of its own: a resume starts after seq 3
    assert len(events) < 400


@pytest.fixture
async def renamed(spec: ModelSpec, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    """A server like `paced` (a token every 10 ms, the same vocabulary) whose model has
    another name: another model, as far as a continuation is concerned."""
    token = tokenizer.encode(" x")[0]
    other = dataclasses.replace(spec, name="another-model")
    model = ScriptedModel(other, dict.fromkeys(range(spec.context_length), token), 0.01)
    running = await start_server(model, tokenizer)
    yield running
    await running.server.drain()


async def _taken_over(
    a_target: str, b_target: str, redis_url: str, body: dict[str, object], request_id: str
) -> list[ServerSentEvent]:
    """A native stream begun on edge A (serving from a_target) whose edge dies after 3
    events, resumed by Last-Event-ID on edge B (serving from b_target), which takes it over:
    every event the caller got, A's and then B's."""
    settings = {"resume_store": redis_url, "resume_window_s": 2.0, "resume_lease_s": 0.5}
    a = await start_edge(a_target, **settings)
    b = await start_edge(b_target, **settings)
    try:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
        ):
            first = await _first(on_a, 3, body, headers={"X-Request-ID": request_id})
            store = a.store
            assert isinstance(store, RedisStreams)
            assert await eventually(lambda: not store.followers)  # A's reader has left
            await store.close()  # edge A dies: it stops generating, and its lease lapses
            last = {"Last-Event-ID": first[-1].id}
            return first + await _events(on_b, "GET", "/v1/generate", headers=last)
    finally:
        await a.edge.stop()
        await b.edge.stop()


async def test_a_takeover_on_another_model_ends_the_stream_with_an_error(
    paced: RunningServer, renamed: RunningServer, redis_server: RedisServer
) -> None:
    """Edge A's stream of the bundled model, taken over by edge B whose server serves another
    model: B splices none of that model's tokens in, the stream ends with an UNAVAILABLE
    `error` event naming both models."""
    body = {"prompt": "x", "max_tokens": 400, "ignore_eos": True}
    events = await _taken_over(paced.target, renamed.target, redis_server.url, body, "m1")
    assert events[-1].event == "error"
    error = json.loads(events[-1].data)
    assert error["code"] == "UNAVAILABLE", error
    assert "another-model" in error["message"]
    assert MODEL in error["message"]


async def test_a_takeover_asks_for_the_length_the_first_server_gave(
    paced: RunningServer, spec: ModelSpec, tokenizer: Tokenizer, redis_server: RedisServer
) -> None:
    """A stream that leaves max_tokens to its server (default 128), taken over by an edge
    whose server's default is 20, still runs to 128 tokens: the budget the first server
    announced is stored with the stream, and the continuation asks for it."""
    token = tokenizer.encode(" x")[0]
    model = ScriptedModel(spec, dict.fromkeys(range(spec.context_length), token), 0.01)
    short = await start_server(model, tokenizer, default_max_tokens=20)
    try:
        events = await _taken_over(
            paced.target, short.target, redis_server.url, {"prompt": "x"}, "b1"
        )
    finally:
        await short.server.drain()
    assert [e.event for e in events[-2:]] == ["usage", "done"]
    indices = [json.loads(e.data)["index"] for e in events if e.event == "token"]
    assert indices == list(range(paced.engine.config.default_max_tokens))


async def test_a_stream_cancelled_on_its_own_edge_ends_with_usage_then_done(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """With the Redis store, a cancel that reaches the edge generating the stream ends it as a
    cancelled gRPC stream ends: the server's `usage`, then `done` (cancelled)."""
    edge = await start_edge(paced.target, resume_store=redis_server.url, resume_lease_s=0.5)
    body = {"prompt": "x", "max_tokens": 400, "ignore_eos": True}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            events, _ = await cancelled_after(http, http, 3, body, "u1")
    finally:
        await edge.edge.stop()
    assert [e.event for e in events[-2:]] == ["usage", "done"]
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"


async def test_a_stream_whose_meta_was_evicted_leaves_nothing_to_its_ids_next_stream(
    edges: tuple[RunningEdge, RunningEdge], redis_server: RedisServer
) -> None:
    """Where Redis dropped a stream's meta but not its events (eviction under memory
    pressure), a new stream of that id starts empty: its answer and its replay hold its own
    one token, none of the earlier stream's 40."""
    a, b = edges
    headers = {"X-Request-ID": "evicted"}
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
        aioredis.Redis(port=redis_server.port) as admin,
    ):
        await _events(on_a, "POST", "/v1/generate", json=BODY, headers=headers)
        assert await admin.delete("tokenwire:resume:evicted:meta") == 1
        short = {**BODY, "max_tokens": 1}
        answer = await _events(on_b, "POST", "/v1/generate", json=short, headers=headers)
        replay = await _events(on_b, "GET", "/v1/generate/evicted/events")
    assert [e.event for e in answer] == ["token", "usage", "done"]
    assert [(e.id, e.data) for e in replay] == [(e.id, e.data) for e in answer]


async def test_a_running_stream_whose_meta_was_evicted_keeps_its_id(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """Where Redis dropped a running stream's meta (eviction), its id stays taken while the
    stream holds its lease: a new stream of that id is a 409, and leaves the running one's
    events alone."""
    a, b = await _pair(paced.target, redis_server.url)
    headers = {"X-Request-ID": "live-evicted"}
    long = {"prompt": "x", "max_tokens": 150, "ignore_eos": True}
    try:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
            aioredis.Redis(port=redis_server.port) as admin,
        ):
            await _first(on_a, 3, long, headers=headers)
            assert await admin.delete("tokenwire:resume:live-evicted:meta") == 1
            again = await on_b.post("/v1/generate", json={**long, "max_tokens": 1}, headers=headers)
            kept = await admin.xlen("tokenwire:resume:live-evicted:events")
    finally:
        await a.edge.stop()
        await b.edge.stop()
    assert again.status_code == 409
    assert kept >= 3
