"""The native SSE API of the edge, against a real edge in front of a real server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.conftest import RunningEdge, RunningServer, cancelled_after, eventually, start_edge
from tests.fakes import RecordingObserver
from tests.replicas import SlowReplica
from tokenwire.edge import native
from tokenwire.edge.upstream import Upstream
from tokenwire.server.domain import FinishReason
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

BODY = {"prompt": "def fib(n):", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


async def _events(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: object
) -> tuple[httpx.Response, list[ServerSentEvent]]:
    async with aconnect_sse(client, method, url, **kwargs) as source:  # type: ignore[arg-type]
        return source.response, [e async for e in source.aiter_sse()]


@pytest.fixture
async def http(edge: RunningEdge) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
        yield client


def _tokens(events: list[ServerSentEvent]) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in events if e.event == "token"]


def test_the_body_takes_every_generate_request_field() -> None:
    """Every GenerateRequest field (sampling's by their own names) is a native field, except
    continuation_ids and retry (the edge continues and retries broken streams itself): a field
    added to the contract cannot be missing from the SSE API unnoticed."""
    names = {f.name for f in pb.GenerateRequest.DESCRIPTOR.fields} - {"sampling"}
    names |= {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}
    assert names - {"continuation_ids", "retry"} == native.FIELDS


async def test_logit_bias_forces_a_token(http: httpx.AsyncClient) -> None:
    """A +100 logit_bias on one id makes every greedy token that id."""
    body = {**BODY, "max_tokens": 4, "logit_bias": {"42": 100}}
    _, events = await _events(http, "POST", "/v1/generate", json=body)
    assert [t["id"] for t in _tokens(events)] == [42] * 4


async def test_prompt_ids_give_what_the_prompt_text_gives(
    http: httpx.AsyncClient, tokenizer: Tokenizer
) -> None:
    """The prompt's token ids, sent as prompt_ids, stream the same tokens as the text."""
    _, by_text = await _events(http, "POST", "/v1/generate", json=BODY)
    body = {k: v for k, v in BODY.items() if k != "prompt"}
    body["prompt_ids"] = tokenizer.encode(str(BODY["prompt"]))
    _, by_ids = await _events(http, "POST", "/v1/generate", json=body)
    assert _tokens(by_ids) == _tokens(by_text)


async def test_top_logprobs_come_with_each_token(http: httpx.AsyncClient) -> None:
    """With logprobs and top_logprobs 3, each token event lists 3 alternatives, the greedy
    choice first."""
    body = {**BODY, "max_tokens": 3, "logprobs": True, "top_logprobs": 3}
    _, events = await _events(http, "POST", "/v1/generate", json=body)
    for token in _tokens(events):
        assert len(token["top_logprobs"]) == 3
        assert token["top_logprobs"][0]["id"] == token["id"]


async def test_a_stop_token_id_ends_the_stream(http: httpx.AsyncClient) -> None:
    """A stop_token_ids entry ends the stream when the model produces it, with `stop`."""
    body = {k: v for k, v in BODY.items() if k != "ignore_eos"}
    _, events = await _events(http, "POST", "/v1/generate", json=body)
    first = [t["id"] for t in _tokens(events)]
    _, events = await _events(
        http, "POST", "/v1/generate", json={**body, "stop_token_ids": [first[1]]}
    )
    assert [t["id"] for t in _tokens(events)] == first[: first.index(first[1]) + 1]
    assert json.loads(events[-1].data)["finish_reason"] == "stop"


async def test_post_streams_tokens_then_usage_then_done(http: httpx.AsyncClient) -> None:
    """POST /v1/generate yields token events, one usage, one done; ids count up from 1."""
    response, events = await _events(http, "POST", "/v1/generate", json=BODY)
    assert [e.event for e in events] == ["token"] * 12 + ["usage", "done"]
    request_id = response.headers["x-request-id"]
    assert [e.id for e in events] == [f"{request_id}:{i}" for i in range(1, 15)]
    assert json.loads(events[-2].data)["completion_tokens"] == 12
    assert json.loads(events[-1].data)["finish_reason"] == "length"


async def test_stream_headers_defeat_proxy_buffering(http: httpx.AsyncClient) -> None:
    """The response is text/event-stream with no-cache and X-Accel-Buffering: no."""
    response, _ = await _events(http, "POST", "/v1/generate", json=BODY)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"


async def test_eventsource_get_streams_the_same_events(http: httpx.AsyncClient) -> None:
    """GET /v1/generate?prompt=... (what EventSource sends) streams tokens, usage and done."""
    params = {"prompt": "import os", "max_tokens": "5", "temperature": "0", "ignore_eos": "true"}
    _, events = await _events(http, "GET", "/v1/generate", params=params)
    assert [e.event for e in events] == ["token"] * 5 + ["usage", "done"]


async def test_eventsource_get_takes_every_repeated_stop(http: httpx.AsyncClient) -> None:
    """GET /v1/generate?stop=a&stop=b stops at either: here at the first of two stops, the
    text of the stream's second token."""
    params = {"prompt": "import os", "max_tokens": "8", "temperature": "0", "ignore_eos": "true"}
    _, events = await _events(http, "GET", "/v1/generate", params=params)
    second = _tokens(events)[1]["text"]
    query = [*params.items(), ("stop", second), ("stop", "\u2603never")]
    _, events = await _events(http, "GET", "/v1/generate", params=query)
    assert json.loads(events[-1].data)["finish_reason"] == "stop_sequence"


async def test_x_request_id_is_passed_to_the_server_and_returned(http: httpx.AsyncClient) -> None:
    """An X-Request-ID header becomes the server's request id and comes back."""
    headers = {"X-Request-ID": "edge-req-1"}
    response, events = await _events(http, "POST", "/v1/generate", json=BODY, headers=headers)
    assert response.headers["x-request-id"] == "edge-req-1"
    assert json.loads(events[-2].data)["request_id"] == "edge-req-1"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "top_p": 7}, "top_p"),
        ({"prompt": "x", "max_tokens": 100_000}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "stop": ""}, "stop"),
        ({"prompt": "x", "stop": "s" * 65}, "stop"),
        ({"prompt": "x", "stop": ["a", ""]}, "stop[1]"),
    ],
)
async def test_bad_input_is_400_naming_the_field(
    http: httpx.AsyncClient, body: dict[str, object], field: str
) -> None:
    """Out-of-range or mistyped fields give HTTP 400 with the field named as the request sent
    it (one stop string is `stop`, a list's entry `stop[i]`), before streaming."""
    response = await http.post("/v1/generate", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"].startswith(f"{field}:")
    assert error["field"] == field
    assert error["code"] == "INVALID_ARGUMENT"


async def test_oversize_body_is_413(http: httpx.AsyncClient) -> None:
    """A body over the limit is refused with 413 before it is parsed."""
    response = await http.post(
        "/v1/generate",
        content=b"{" + b" " * 2_000_000 + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413


async def test_resume_with_last_event_id_replays_exactly_the_missed_events(
    http: httpx.AsyncClient, edge: RunningEdge
) -> None:
    """Drop after 5 events, reconnect with Last-Event-ID: joined text equals an unbroken run."""
    body = {
        "prompt": "class Tree:",
        "max_tokens": 40,
        "temperature": 0.8,
        "seed": 11,
        "ignore_eos": True,
    }
    _, whole = await _events(http, "POST", "/v1/generate", json=body)
    expected = "".join(json.loads(e.data)["text"] for e in whole if e.event == "token")
    first: list[ServerSentEvent] = []
    async with aconnect_sse(http, "POST", "/v1/generate", json=body) as source:
        async for event in source.aiter_sse():
            first.append(event)
            if len(first) == 5:
                break
    last_id = first[-1].id
    request_id = last_id.rsplit(":", 1)[0]
    _, rest = await _events(
        http, "POST", "/v1/generate", json={}, headers={"Last-Event-ID": last_id}
    )
    events = first + rest
    assert [e.id for e in events] == [f"{request_id}:{i}" for i in range(1, len(events) + 1)]
    text = "".join(json.loads(e.data)["text"] for e in events if e.event == "token")
    assert text == expected
    assert events[-1].event == "done"


async def test_eventsource_reconnect_url_resumes(http: httpx.AsyncClient) -> None:
    """GET with last_event_id (or the Last-Event-ID header) resumes instead of starting anew."""
    _, events = await _events(http, "POST", "/v1/generate", json=BODY)
    request_id = events[0].id.rsplit(":", 1)[0]
    _, rest = await _events(
        http, "GET", f"/v1/generate/{request_id}/events", params={"last_event_id": events[9].id}
    )
    assert [e.id for e in rest] == [e.id for e in events[10:]]


async def test_unknown_stream_is_404_and_expired_is_410(
    served: RunningServer, edge: RunningEdge
) -> None:
    """A never-seen request id is 404; one whose resume window passed is 410."""
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
        unknown = await http.get("/v1/generate/nope/events", headers={"Last-Event-ID": "nope:3"})
        _, events = await _events(http, "POST", "/v1/generate", json=BODY)
        request_id = events[0].id.rsplit(":", 1)[0]
        assert await eventually(lambda: request_id not in edge.streams._streams, within_s=5)
        gone = await http.get(f"/v1/generate/{request_id}/events")
    assert unknown.status_code == 404
    assert gone.status_code == 410


async def test_cancel_endpoint_ends_the_stream_and_frees_the_server(
    http: httpx.AsyncClient, served: RunningServer
) -> None:
    """POST /v1/generate/{id}/cancel ends the stream with done(cancelled); the slot is freed."""
    body = {"prompt": "def f():", "max_tokens": 450, "ignore_eos": True}
    events, reply = await cancelled_after(http, http, 3, body, "to-cancel")
    assert reply.json() == {"request_id": "to-cancel", "cancelled": True}
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"
    assert await eventually(lambda: served.engine.active_count == 0, within_s=2)


async def test_cancelling_a_stream_that_ended_says_it_was_not_cancelled(
    http: httpx.AsyncClient,
) -> None:
    """The cancel route on a stream that had already finished answers `cancelled: false`, as
    gRPC's Cancel does, and the stream keeps its own end (done: length) for resumes."""
    body = {"prompt": "def f():", "max_tokens": 3, "ignore_eos": True}
    _, events = await _events(
        http, "POST", "/v1/generate", json=body, headers={"X-Request-ID": "ended"}
    )
    reply = await http.post("/v1/generate/ended/cancel", json={})
    _, replay = await _events(http, "GET", "/v1/generate/ended/events")
    assert reply.json() == {"request_id": "ended", "cancelled": False}
    assert json.loads(events[-1].data)["finish_reason"] == "length"
    assert [e.data for e in replay] == [e.data for e in events]


async def test_a_cancel_asks_every_target_at_once(served: RunningServer) -> None:
    """The upstream's cancel asks all its targets together and answers when one had the
    stream: a replica that takes 2 s to answer does not hold it up."""
    slow = SlowReplica(served.target, 2.0, gives_up=False)
    await slow.start()
    upstream = Upstream(f"{slow.target},{served.target}")
    channel = grpc.aio.insecure_channel(served.target)
    asked = pb.GenerateRequest(prompt="def f():", max_tokens=400, ignore_eos=True)
    asked.request_id = "on-the-second"
    call = pb_grpc.GenerationServiceStub(channel).Generate(asked)
    try:
        await call.read()  # the stream runs at the second target
        started = time.monotonic()
        found = await upstream.cancel("on-the-second")
        took = time.monotonic() - started
    finally:
        call.cancel()
        await channel.close()
        await upstream.close()
        await slow.stop()
    assert found is True
    assert took < 1.0, took


async def test_a_cancelled_stream_ends_with_usage_then_done(
    http: httpx.AsyncClient, served: RunningServer
) -> None:
    """A stream stopped through the cancel route ends as a cancelled gRPC stream does: the
    server's `usage` (counting the tokens sent), then `done` with reason cancelled."""
    body = {"prompt": "def f():", "max_tokens": 450, "ignore_eos": True}
    events, _ = await cancelled_after(http, http, 3, body, "to-cancel-too")
    assert [e.event for e in events[-2:]] == ["usage", "done"]
    usage = json.loads(events[-2].data)
    assert usage["completion_tokens"] == sum(e.event == "token" for e in events)
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"


async def _finish_reason(served: RunningServer, request_id: str) -> FinishReason | None:
    """The request's finish reason, once the observer has its record (just after the engine
    released it)."""
    assert isinstance(served.observer, RecordingObserver)
    finished = served.observer.finished
    assert await eventually(lambda: request_id in finished, within_s=10)
    return finished[request_id].finish_reason


async def _drop_after_first_event(edge: RunningEdge, request_id: str) -> None:
    body = {"prompt": "def g():", "max_tokens": 450, "ignore_eos": True, "temperature": 0}
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
        aconnect_sse(
            http, "POST", "/v1/generate", json=body, headers={"X-Request-ID": request_id}
        ) as source,
    ):
        async for _ in source.aiter_sse():
            break


async def test_disconnect_keeps_generating_for_the_window_then_cancels(
    paced: RunningServer,
) -> None:
    """Leaving a native stream keeps it generating for the window, then cancels it upstream."""
    served = paced
    assert isinstance(served.observer, RecordingObserver)
    steps = served.observer.steps
    # 2.5 s: far longer than the check below, far shorter than the 450 tokens' 4.5 s.
    edge = await start_edge(served.target, resume_window_s=2.5)
    try:
        await _drop_after_first_event(edge, "drop-window")
        dropped_at = len(steps)
        # Twenty more decode steps (0.2 s at the least) after the client left, unless the
        # request ends first.
        await eventually(
            lambda: len(steps) >= dropped_at + 20 or served.engine.active_count == 0, within_s=2
        )
        still_running = served.engine.active_count
        assert await eventually(lambda: served.engine.active_count == 0, within_s=10)
    finally:
        await edge.edge.stop()
    assert still_running == 1
    assert await _finish_reason(served, "drop-window") == FinishReason.CANCELLED


async def test_window_zero_cancels_upstream_at_once(paced: RunningServer) -> None:
    """With resume_window_s=0 a disconnect cancels the upstream RPC within a second."""
    served = paced
    edge = await start_edge(served.target, resume_window_s=0.0)
    try:
        await _drop_after_first_event(edge, "drop-now")
        assert await eventually(lambda: served.engine.active_count == 0, within_s=1)
    finally:
        await edge.edge.stop()
    assert await _finish_reason(served, "drop-now") == FinishReason.CANCELLED


async def _leave_after(
    http: httpx.AsyncClient, count: int, body: dict[str, object]
) -> list[ServerSentEvent]:
    """Start a stream and leave after `count` events (it keeps generating for the window)."""
    events: list[ServerSentEvent] = []
    async with aconnect_sse(http, "POST", "/v1/generate", json=body) as source:
        async for event in source.aiter_sse():
            events.append(event)
            if len(events) == count:
                break
    return events


async def test_a_resume_from_events_the_buffer_dropped_is_410_before_any_event(
    served: RunningServer,
) -> None:
    """With a 1 KiB buffer, a Last-Event-ID whose next events were dropped is a plain JSON
    410, answered before any stream starts (never a 200 cut short)."""
    edge = await start_edge(served.target, resume_window_s=5.0, resume_stream_bytes=1024)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            first = await _leave_after(http, 2, {**BODY, "max_tokens": 60})
            # The edge has the whole stream (and dropped what its buffer could not hold) once
            # its pump ended, which can come after the engine finished.
            assert await eventually(lambda: edge.streams.live == 0)
            reply = await http.get("/v1/generate", headers={"Last-Event-ID": first[-1].id})
    finally:
        await edge.edge.stop()
    assert reply.status_code == 410
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"]["code"] == "GONE"


async def test_streams_opened_together_hold_no_more_than_the_total(
    served: RunningServer,
) -> None:
    """Six streams opened at once, each generating past its own 4 KiB bound, hold at most the
    8 KiB total between them (each was let in while the buffers were nearly empty), and
    every reader still gets its whole stream."""
    edge = await start_edge(
        served.target, resume_window_s=5.0, resume_stream_bytes=4096, resume_total_bytes=8192
    )
    body = {**BODY, "max_tokens": 80, "ignore_eos": True}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            streams = await asyncio.gather(
                *(_events(http, "POST", "/v1/generate", json=body) for _ in range(6))
            )
            held = edge.streams.bytes
    finally:
        await edge.edge.stop()
    assert [len(_tokens(events)) for _, events in streams] == [80] * 6
    assert 0 < held <= 8192


async def test_a_reader_a_whole_buffer_behind_gets_a_410_error_event(
    served: RunningServer,
) -> None:
    """A reader that falls so far behind that the buffer dropped its next event gets an
    `error` event (GONE, without an id) instead of a silent jump to the events still kept."""
    edge = await start_edge(served.target, resume_window_s=5.0, resume_stream_bytes=1024)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            first = await _leave_after(http, 1, {**BODY, "max_tokens": 60})
            stream = await edge.store.get(first[0].id.rsplit(":", 1)[0], None)
            reader = stream.follow(0)
            assert (await anext(reader)).seq == 1
            assert await eventually(lambda: edge.streams.live == 0)
            behind = await anext(reader)
            await reader.aclose()
    finally:
        await edge.edge.stop()
    assert (behind.seq, behind.name, json.loads(behind.data)["code"]) == (0, "error", "GONE")


async def test_a_resume_past_a_finished_streams_last_event_is_400(
    http: httpx.AsyncClient,
) -> None:
    """Last-Event-ID naming a seq the finished stream never reached is a 400 naming the
    field, not an empty stream without `done` or `error`."""
    _, events = await _events(http, "POST", "/v1/generate", json=BODY)
    request_id = events[0].id.rsplit(":", 1)[0]
    reply = await http.get(
        f"/v1/generate/{request_id}/events", headers={"Last-Event-ID": f"{request_id}:99999"}
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["field"] == "Last-Event-ID"


async def test_a_resume_from_the_event_that_ended_the_stream_is_204(
    http: httpx.AsyncClient,
) -> None:
    """Last-Event-ID naming a finished stream's `done` is 204 (nothing follows it, and 204 is
    what stops an EventSource from reconnecting), not an empty 200 it would retry forever."""
    _, events = await _events(http, "POST", "/v1/generate", json=BODY)
    assert events[-1].event == "done"
    reply = await http.get(
        f"/v1/generate/{events[-1].id.rsplit(':', 1)[0]}/events",
        headers={"Last-Event-ID": events[-1].id},
    )
    assert (reply.status_code, reply.content) == (204, b"")


async def test_a_resume_past_a_running_streams_last_event_is_400_at_once(
    paced: RunningServer,
) -> None:
    """On a stream still generating, a seq past the newest event is refused at once (query
    parameter too), instead of waiting for it and skipping the events before it."""
    edge = await start_edge(paced.target, resume_window_s=5.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            first = await _leave_after(http, 3, {"prompt": "x", "max_tokens": 450})
            request_id = first[0].id.rsplit(":", 1)[0]
            reply = await http.get("/v1/generate", params={"last_event_id": f"{request_id}:400"})
            still_running = paced.engine.active_count
            await http.post(f"/v1/generate/{request_id}/cancel", json={})
    finally:
        await edge.edge.stop()
    assert (reply.status_code, still_running) == (400, 1)
    assert reply.json()["error"]["field"] == "Last-Event-ID"


async def test_a_last_event_id_whose_request_id_breaks_the_rule_is_400_without_echoing_it(
    http: httpx.AsyncClient,
) -> None:
    """A Last-Event-ID whose id part no request id could have (8 KiB of it, or a ':' inside)
    is a 400 naming Last-Event-ID, and the error does not echo the id back."""
    for bad in ("x" * 8192 + ":3", "a:b:3"):
        reply = await http.post("/v1/generate", json={}, headers={"Last-Event-ID": bad})
        assert reply.status_code == 400, bad
        body = reply.json()
        assert body["error"]["field"] == "Last-Event-ID"
        assert len(reply.text) < 1024


async def test_stream_events_end_in_a_blank_line_of_lf(paced: RunningServer) -> None:
    """Every line of a native stream ends in "\\n" and every event, pings included, in
    "\\n\\n": a client that splits the bytes on "\\n\\n" reads each event whole (there is no
    "\\r" anywhere), as EventSource does."""
    edge = await start_edge(paced.target, ping_s=1.0)
    try:
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
            http.stream("POST", "/v1/generate", json={"prompt": "x", "max_tokens": 150}) as reply,
        ):
            raw = b"".join([chunk async for chunk in reply.aiter_raw()])
    finally:
        await edge.edge.stop()
    assert b"\r" not in raw
    *events, rest = raw.split(b"\n\n")
    assert rest == b""
    pings = [e for e in events if e.startswith(b": ping")]
    assert pings
    assert all(b"\n" not in e for e in pings)
    named = [e.split(b"\n") for e in events if e not in pings]
    assert [lines[1] for lines in named] == [b"event: token"] * 150 + [
        b"event: usage",
        b"event: done",
    ]
    assert all(
        lines[0].startswith(b"id: ") and lines[2].startswith(b"data: ") and len(lines) == 3
        for lines in named
    )
