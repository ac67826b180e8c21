"""Taking over a stream from what a dead edge left in the shared (Redis) resume store: a stream
it left between its `usage` and its `done`, and one whose first server died before its first
token. The stored state is written here as a dead edge leaves it; real servers and edges on
127.0.0.1, one real redis-server."""

from __future__ import annotations

import json
import struct

import httpx
import redis.asyncio as aioredis
from httpx_sse import ServerSentEvent, aconnect_sse

from tests import sse
from tests.conftest import RunningEdge, RunningServer, eventually, start_edge, start_server
from tests.fakes import ScriptedModel
from tests.redisproc import RedisServer
from tokenwire.edge.redis_keys import Keys
from tokenwire.edge.redis_store import RedisStreams
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb


async def _edge(target: str, url: str) -> RunningEdge:
    return await start_edge(target, resume_store=url, resume_window_s=2.0, resume_lease_s=0.3)


def _store(edge: RunningEdge) -> RedisStreams:
    store = edge.store
    assert isinstance(store, RedisStreams)
    return store


async def _left_by_a_dead_edge(
    url: str,
    request_id: str,
    request: pb.GenerateRequest,
    events: list[tuple[str, dict[str, object]]],
    budget: int,
) -> None:
    """Store an open stream, its request and `events` as an edge leaves them when it dies:
    its lease lapsed, nobody has taken it over."""
    keys = Keys.of(request_id)
    ids = [int(data["id"]) for name, data in events if name == "token"]  # type: ignore[call-overload]
    async with aioredis.from_url(url) as admin:
        meta = {
            "state": "open",
            "principal": b"-",
            "request": request.SerializeToString(),
            "seed": "7",
            "budget": str(budget),
            "model": "",
            "first": 1,
            "holder": "dead:edge",
        }
        await admin.hset(keys.meta, mapping=meta)  # type: ignore[arg-type]
        for seq, (name, data) in enumerate(events, 1):
            await admin.xadd(keys.events, {"n": name, "d": json.dumps(data)}, id=f"0-{seq}")
        await admin.set(keys.ids, struct.pack(f"<{len(ids)}I", *ids))
        for key in keys.stored:
            await admin.pexpire(key, 30_000)


async def _read(
    http: httpx.AsyncClient, path: str, last: str, count: int | None = None
) -> list[ServerSentEvent]:
    """A resume's events after `last`: every one, or the first `count`."""
    got: list[ServerSentEvent] = []
    headers = {"Last-Event-ID": last} if last else {}
    async with aconnect_sse(http, "GET", path, headers=headers) as source:
        async for event in source.aiter_sse():
            got.append(event)
            if len(got) == count:
                break
    return got


async def test_a_stream_left_between_its_usage_and_its_done_ends_cancelled_when_taken_over(
    paced: RunningServer, redis_server: RedisServer
) -> None:
    """A dead edge stored 3 tokens and the `usage` of a 400-token stream, not its `done` (the
    stream had been cancelled). The edge taking it over stores no token after that `usage`:
    the stream ends right after it with `done` / cancelled, and the continuation that would
    generate on is cancelled at the server."""
    request = pb.GenerateRequest(prompt="x", max_tokens=400, ignore_eos=True)
    token = {"text": " x", "logprob": 0.0}
    stored: list[tuple[str, dict[str, object]]] = [
        ("token", {**token, "id": 100 + i, "index": i}) for i in range(3)
    ]
    stored.append(("usage", {"prompt_tokens": 2, "completion_tokens": 3}))
    await _left_by_a_dead_edge(redis_server.url, "after-usage", request, stored, 400)
    edge = await _edge(paced.target, redis_server.url)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
            rest = await _read(http, "/v1/generate/after-usage/events", "after-usage:4")
        # Its server generated at least one token: the continuation ran, and has been ended.
        stopped = await eventually(lambda: paced.engine.active_count == 0, within_s=1.0)
        assert await eventually(lambda: _store(edge).live == 0)
    finally:
        await edge.edge.stop()
    assert [(e.event, e.id) for e in rest] == [("done", "after-usage:5")]
    assert json.loads(rest[0].data)["finish_reason"] == "cancelled"
    assert stopped


async def test_a_second_takeover_asks_for_the_budget_of_the_server_whose_tokens_it_continues(
    paced: RunningServer, spec: ModelSpec, tokenizer: Tokenizer, redis_server: RedisServer
) -> None:
    """A stream that leaves max_tokens to its server, whose first server (budget 20) died
    before its first token: edge B takes it over and B's server gives it its own default
    (128) and its tokens. B dies in turn; edge C, on a server whose default is 20, takes it
    over from B's tokens: the stream runs to 128 tokens, the budget of the server whose
    tokens it continues, not to the first server's 20."""
    request = pb.GenerateRequest(prompt="x")
    await _left_by_a_dead_edge(redis_server.url, "rebudget", request, [], 20)
    token = tokenizer.encode(" x")[0]
    model = ScriptedModel(spec, dict.fromkeys(range(spec.context_length), token), 0.01)
    short = await start_server(model, tokenizer, default_max_tokens=20)
    b = await _edge(paced.target, redis_server.url)
    c = await _edge(short.target, redis_server.url)
    try:
        async with (
            httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
            httpx.AsyncClient(base_url=c.url, timeout=30) as on_c,
        ):
            first = await _read(on_b, "/v1/generate/rebudget/events", "", count=3)
            store = _store(b)
            assert await eventually(lambda: not store.followers)  # B's reader has left
            await store.close()  # edge B dies: it stops generating, and its lease lapses
            rest = await sse.events(
                on_c, "GET", "/v1/generate/rebudget/events", headers={"Last-Event-ID": first[-1].id}
            )
    finally:
        await b.edge.stop()
        await c.edge.stop()
        await short.server.drain()
    events = first + rest[1]
    assert [e.event for e in events[-2:]] == ["usage", "done"]
    indices = [json.loads(e.data)["index"] for e in events if e.event == "token"]
    assert indices == list(range(paced.engine.config.default_max_tokens))
