"""Streams belong to their caller, and a request id names one stream for as long as it lives."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.conftest import MODEL, RunningEdge, RunningServer, eventually, start_edge, start_server
from tests.fakes import ScriptedModel
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer

K1 = {"Authorization": "Bearer k1"}
K2 = {"Authorization": "Bearer k2"}
LONG = {"prompt": "def f():", "max_tokens": 150, "ignore_eos": True}


@pytest.fixture
async def keyed(paced: RunningServer) -> AsyncIterator[RunningEdge]:
    """An edge with two API keys in front of a server that emits a token every 10 ms."""
    edge = await start_edge(paced.target, api_keys=("k1", "k2"), resume_window_s=1.0)
    yield edge
    await edge.edge.stop()


async def _first_event(http: httpx.AsyncClient, request_id: str) -> ServerSentEvent:
    """Start a long stream as k1 and leave after its first event (it keeps generating)."""
    headers = {**K1, "X-Request-ID": request_id}
    async with aconnect_sse(http, "POST", "/v1/generate", json=LONG, headers=headers) as source:
        async for event in source.aiter_sse():
            return event
    raise AssertionError("no event")


def _shape(response: httpx.Response, request_id: str) -> tuple[int, str]:
    """Status and body, with the id that was asked about blanked out."""
    return response.status_code, response.text.replace(request_id, "<id>")


async def test_foreign_key_resume_is_answered_like_an_unknown_id(keyed: RunningEdge) -> None:
    """k2 resuming k1's live stream gets the very status and body of an id that never existed."""
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
        await _first_event(http, "owned-by-k1")
        foreign = await http.get(
            "/v1/generate/owned-by-k1/events", headers={**K2, "Last-Event-ID": "owned-by-k1:0"}
        )
        unknown = await http.get(
            "/v1/generate/never-there/events", headers={**K2, "Last-Event-ID": "never-there:0"}
        )
        via_post = await http.post(
            "/v1/generate", json={}, headers={**K2, "Last-Event-ID": "owned-by-k1:1"}
        )
    assert _shape(foreign, "owned-by-k1") == _shape(unknown, "never-there")
    assert _shape(via_post, "owned-by-k1") == _shape(unknown, "never-there")
    assert foreign.status_code == 404


async def test_foreign_key_cancel_is_answered_like_an_unknown_id_and_does_nothing(
    keyed: RunningEdge,
) -> None:
    """k2 cancelling k1's stream gets the unknown-id 404 and k1's stream runs to its length."""
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
        first = await _first_event(http, "keep-running")
        foreign = await http.post("/v1/generate/keep-running/cancel", json={}, headers=K2)
        unknown = await http.post("/v1/generate/never-there/cancel", json={}, headers=K2)
        async with aconnect_sse(
            http,
            "GET",
            "/v1/generate/keep-running/events",
            headers={**K1, "Last-Event-ID": first.id},
        ) as source:
            rest = [event async for event in source.aiter_sse()]
    assert _shape(foreign, "keep-running") == _shape(unknown, "never-there")
    assert json.loads(rest[-1].data)["finish_reason"] == "length"


async def test_foreign_and_unknown_ids_take_the_same_time(keyed: RunningEdge) -> None:
    """Timing tells nothing either: interleaved resume and cancel calls with k2 on k1's live id
    and on an unknown id have medians within noise (0.5 ms or a quarter of the median)."""
    timings: dict[str, list[float]] = {"owned-by-k1": [], "never-there": []}
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
        await _first_event(http, "owned-by-k1")
        for _ in range(40):
            for request_id, sink in timings.items():
                started = time.perf_counter()
                await http.post(f"/v1/generate/{request_id}/cancel", json={}, headers=K2)
                await http.get(f"/v1/generate/{request_id}/events", headers=K2)
                sink.append(time.perf_counter() - started)
    foreign, unknown = (statistics.median(sink) for sink in timings.values())
    assert abs(foreign - unknown) < max(0.0005, 0.25 * unknown)


async def test_owner_can_resume_and_cancel_its_stream(keyed: RunningEdge) -> None:
    """k1 resumes its own stream (200) and cancels it (done with reason cancelled)."""
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
        first = await _first_event(http, "mine")
        cancelled = await http.post("/v1/generate/mine/cancel", json={}, headers=K1)
        async with aconnect_sse(
            http, "GET", "/v1/generate/mine/events", headers={**K1, "Last-Event-ID": first.id}
        ) as source:
            rest = [event async for event in source.aiter_sse()]
    assert cancelled.json() == {"request_id": "mine", "cancelled": True}
    assert json.loads(rest[-1].data)["finish_reason"] == "cancelled"


async def test_foreign_expired_id_is_404_while_the_owner_sees_410(keyed: RunningEdge) -> None:
    """After the window, the owner learns the stream expired (410); k2 still gets a plain 404."""
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
        await _first_event(http, "short-lived")
        await http.post("/v1/generate/short-lived/cancel", json={}, headers=K1)
        assert await eventually(lambda: "short-lived" not in keyed.streams._streams, within_s=5)
        owner = await http.get("/v1/generate/short-lived/events", headers=K1)
        other = await http.get("/v1/generate/short-lived/events", headers=K2)
    assert (owner.status_code, other.status_code) == (410, 404)


async def test_reusing_a_resumable_id_is_409_and_does_not_mix_streams(
    served: RunningServer, edge: RunningEdge
) -> None:
    """A second stream with a still-resumable id is refused (409 naming request_id); replaying
    the first one afterwards gives its own events only."""
    body = {"prompt": "import os", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    headers = {"X-Request-ID": "reused"}
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
        async with aconnect_sse(http, "POST", "/v1/generate", json=body, headers=headers) as src:
            original = [event async for event in src.aiter_sse()]
        other = {**body, "prompt": "class A:"}
        again = await http.post("/v1/generate", json=other, headers=headers)
        async with aconnect_sse(
            http, "GET", "/v1/generate/reused/events", headers={"Last-Event-ID": "reused:0"}
        ) as src:
            replay = [event async for event in src.aiter_sse()]
    assert again.status_code == 409
    assert again.json()["error"]["field"] == "request_id"
    assert [(e.id, e.data) for e in replay] == [(e.id, e.data) for e in original]


async def test_id_reuse_attempts_leak_no_buffer_bytes(paced: RunningServer) -> None:
    """Many reuse attempts, some concurrent, are all 409; once the window passes the buffers
    are back to zero bytes and new streams are not refused as full."""
    edge = await start_edge(
        paced.target,
        resume_window_s=0.3,
        resume_stream_bytes=2048,
        resume_total_bytes=4096,
    )
    headers = {"X-Request-ID": "hot-id"}
    short = {"prompt": "x", "max_tokens": 20, "ignore_eos": True}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            async with aconnect_sse(http, "POST", "/v1/generate", json=short, headers=headers) as s:
                await anext(s.aiter_sse())
                attempts = [
                    http.post("/v1/generate", json=short, headers=headers) for _ in range(30)
                ]
                refused = await asyncio.gather(*attempts)
            assert await eventually(lambda: edge.streams.bytes == 0 and not edge.streams, 5)
            later = [
                await http.post("/v1/generate", json={**short, "max_tokens": 2}) for _ in range(4)
            ]
    finally:
        await edge.edge.stop()
    assert {r.status_code for r in refused} == {409}
    assert [r.status_code for r in later] == [200] * 4


async def test_concurrent_first_use_of_an_id_admits_exactly_one(paced: RunningServer) -> None:
    """Ten requests racing with one new id: one stream starts, nine get 409."""
    edge = await start_edge(paced.target, resume_window_s=0.3)
    body = {"prompt": "x", "max_tokens": 5, "ignore_eos": True}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            replies = await asyncio.gather(
                *(
                    http.post("/v1/generate", json=body, headers={"X-Request-ID": "race"})
                    for _ in range(10)
                )
            )
    finally:
        await edge.edge.stop()
    assert sorted(r.status_code for r in replies) == [200] + [409] * 9


async def test_an_id_is_free_again_once_its_window_passed(paced: RunningServer) -> None:
    """After the resume window the old stream is gone and its id starts a new stream."""
    edge = await start_edge(paced.target, resume_window_s=0.2)
    body = {"prompt": "x", "max_tokens": 3, "ignore_eos": True}
    headers = {"X-Request-ID": "recycled"}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            first = await http.post("/v1/generate", json=body, headers=headers)
            assert await eventually(lambda: "recycled" not in edge.streams._streams, 5)
            second = await http.post("/v1/generate", json=body, headers=headers)
    finally:
        await edge.edge.stop()
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.text.count("event: done") == 1


async def test_a_cancel_of_a_reused_id_on_another_replica_leaves_the_owners_stream_alone(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """Two replicas behind one keyed edge: k1's OpenAI stream runs on the first; k2 starts a
    stream under the same id, which lands on the second (the first no longer accepts), and
    cancels it. The cancel, sent to every replica, ends k2's stream only: k1's runs to its
    length (ids are scoped by their caller's key at the servers)."""
    token = tokenizer.encode(" x")[0]
    script = dict.fromkeys(range(spec.context_length), token)
    first, second = [
        await start_server(ScriptedModel(spec, script, 0.01), tokenizer) for _ in range(2)
    ]
    edge = await start_edge(f"{first.target},{second.target}", api_keys=("k1", "k2"))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 300, "ignore_eos": True, "stream": True}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            headers = {**K1, "X-Request-ID": "shared-id"}
            async with aconnect_sse(
                http, "POST", "/v1/completions", json=body, headers=headers
            ) as victim:
                events = victim.aiter_sse()
                await anext(events)
                first.engine.stop_accepting()  # k2's stream goes to the second replica
                own_headers = {**K2, "X-Request-ID": "shared-id"}
                async with aconnect_sse(
                    http, "POST", "/v1/generate", json=LONG, headers=own_headers
                ) as own:
                    own_stream = own.aiter_sse()
                    await anext(own_stream)
                    cancel = await http.post("/v1/generate/shared-id/cancel", json={}, headers=K2)
                    own_events = [e async for e in own_stream]
                chunks = [
                    json.loads(e.data) for e in [e async for e in events] if e.data != "[DONE]"
                ]
    finally:
        await edge.edge.stop()
        for server in (first, second):
            await server.server.drain()
    assert cancel.json()["cancelled"]
    [done] = [e for e in own_events if e.event == "done"]
    assert json.loads(done.data)["finish_reason"] == "cancelled"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert [f for f in finishes if f] == ["length"]


@pytest.mark.parametrize("n", [1, 2])
async def test_openai_requests_sharing_an_x_request_id_both_run(
    paced: RunningServer, n: int
) -> None:
    """Two /v1/completions sent at once with one X-Request-ID (as a proxy that gives calls made
    in parallel one id sends them), of one or of two choices, are both answered, under
    distinct response ids: the later runs under the id made unique instead of a 400."""
    edge = await start_edge(paced.target)
    body = {"prompt": "x", "max_tokens": 40, "ignore_eos": True, "n": n}
    headers = {"X-Request-ID": "shared"}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            replies = await asyncio.gather(
                *(http.post("/v1/completions", json=body, headers=headers) for _ in range(2))
            )
    finally:
        await edge.edge.stop()
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
    ids = {r.json()["id"] for r in replies}
    assert len(ids) == 2
    assert all(i.startswith("cmpl-shared") for i in ids)


async def test_the_bodys_request_id_wins_over_the_header(edge: RunningEdge) -> None:
    """A native stream sent with both X-Request-ID and a body request_id goes by the body's
    (as the server takes the field over the metadata): its events and its events route use
    that id."""
    body = {"prompt": "x", "max_tokens": 3, "ignore_eos": True, "request_id": "mine-1"}
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
        async with aconnect_sse(
            http, "POST", "/v1/generate", json=body, headers={"X-Request-ID": "hdr-1"}
        ) as source:
            events = [event async for event in source.aiter_sse()]
        replay = await http.get("/v1/generate/mine-1/events")
    assert {e.id.rsplit(":", 1)[0] for e in events} == {"mine-1"}
    assert replay.status_code == 200
