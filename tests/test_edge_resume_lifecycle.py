"""A native stream's expiry in the in-memory resume store: a stream nobody reads expires, a
reader about to attach holds the expiry off, and a stream never ends without `done` or
`error`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from tests import sse
from tests.conftest import RunningServer, eventually, start_edge
from tokenwire.edge import native
from tokenwire.edge.context import EdgeContext
from tokenwire.edge.metrics import RouteName
from tokenwire.edge.pipeline import Frame
from tokenwire.edge.store import StoredStream
from tokenwire.v1 import generate_pb2 as pb

LONG = {"prompt": "x", "max_tokens": 450, "ignore_eos": True}


async def _first_event(
    client: httpx.AsyncClient, request_id: str, body: dict[str, object] = LONG
) -> ServerSentEvent:
    """Start a stream under `request_id` and leave after its first event."""
    headers = {"X-Request-ID": request_id}
    return await sse.first_event(client, "POST", "/v1/generate", json=body, headers=headers)


async def test_a_stream_nobody_ever_reads_expires_after_the_window(
    paced: RunningServer,
) -> None:
    """A stream the store opened whose response never read it (its client left before the
    body began) is dropped after the window, and its generation cancelled at the server."""
    edge = await start_edge(paced.target, resume_window_s=0.3)
    try:
        ctx = edge.edge.app.state.ctx
        assert isinstance(ctx, EdgeContext)
        request = pb.GenerateRequest(prompt="x", max_tokens=450, ignore_eos=True)
        upstream = await ctx.upstream.open(request, "unread", route=RouteName.NATIVE, owner=None)
        await edge.streams.claim("unread")
        await edge.streams.open(upstream, "unread", None)
        await edge.streams.release("unread")
        dropped = await eventually(lambda: len(edge.streams) == 0, within_s=4)
        stopped = await eventually(lambda: paced.engine.active_count == 0, within_s=2)
    finally:
        await edge.edge.stop()
    assert (dropped, stopped) == (True, True)


async def test_a_resume_whose_reading_starts_past_the_window_gets_the_whole_stream(
    paced: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume that finds the stream as its last reader leaves, while its response starts
    reading only after the stream's window has run out, still gets every event up to `done`:
    the expiry waits for it."""
    window = 0.5
    original = native.native_frames

    async def slow_start(stream: StoredStream, after: int) -> AsyncGenerator[Frame, None]:
        await asyncio.sleep(window + 0.3)
        async for frame in original(stream, after):
            yield frame

    monkeypatch.setattr(native, "native_frames", slow_start)
    edge = await start_edge(paced.target, resume_window_s=window)
    body = {**LONG, "max_tokens": 60}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
            first = await _first_event(client, "late", body)
            stream = edge.streams._streams["late"]
            assert await eventually(lambda: stream.followers == 0, within_s=2)
            _, rest = await sse.events(
                client, "GET", "/v1/generate/late/events", headers={"Last-Event-ID": first.id}
            )
    finally:
        await edge.edge.stop()
    assert rest[-1].event == "done"
    assert [e.id for e in rest] == [f"late:{seq}" for seq in range(2, 63)]


async def test_a_reader_of_a_stream_dropped_unfinished_gets_a_gone_error(
    paced: RunningServer,
) -> None:
    """A reader still on a stream that expired before it finished gets the buffered events,
    then an `error` event (GONE) saying it expired: never a stream that just stops."""
    edge = await start_edge(paced.target, resume_window_s=0.3)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
            await _first_event(client, "dropped")
        stream = edge.streams._streams["dropped"]
        reader = stream.follow(1)
        assert await eventually(lambda: len(edge.streams) == 0, within_s=4)
        rest = [event async for event in reader]
    finally:
        await edge.edge.stop()
    assert {event.name for event in rest[:-1]} == {"token"}
    assert rest[-1].name == "error"
    assert json.loads(rest[-1].data)["code"] == "GONE"


async def test_a_refused_resume_holds_no_stream_past_its_readers(
    paced: RunningServer,
) -> None:
    """With no resume window, a resume refused (its Last-Event-ID past the stream's last event)
    holds nothing for a reader that will never come: when the stream's one reader then
    leaves, the generation is cancelled at the server at once, not when the refused resume's
    reservation lapses (2 s)."""
    edge = await start_edge(paced.target, resume_window_s=0.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
            headers = {"X-Request-ID": "kept"}
            async with aconnect_sse(
                client, "POST", "/v1/generate", json=LONG, headers=headers
            ) as source:
                first = await anext(aiter(source.aiter_sse()))
                assert first.id == "kept:1"
                refused = await client.get(
                    "/v1/generate/kept/events", headers={"Last-Event-ID": "kept:9999"}
                )
            left = asyncio.get_running_loop().time()
            stopped = await eventually(lambda: paced.engine.active_count == 0, within_s=3)
            took = asyncio.get_running_loop().time() - left
    finally:
        await edge.edge.stop()
    assert refused.status_code == 400
    assert stopped
    assert took < 1.0
