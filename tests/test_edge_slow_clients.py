"""Clients that hold the edge's connections without finishing a request: a connection that
sends nothing, a request head trickled in, a body that never completes. Each is cut off within
its time limit, so none can hold a connection, a request or a drain open for ever."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx
import pytest

from tests.conftest import RunningEdge, RunningServer, eventually, start_edge
from tokenwire.edge import body, server

SHORT_S = 0.3


async def _closed_within(edge: RunningEdge, sent: bytes, limit_s: float) -> bytes:
    """Connect, send `sent`, and read until the edge closes the connection (within limit_s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.edge.port)
    try:
        writer.write(sent)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), limit_s)
    finally:
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed(
    edge: RunningEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that never sends a request is closed after the head time limit."""
    monkeypatch.setattr(server, "HEAD_TIMEOUT_S", SHORT_S)
    assert await _closed_within(edge, b"", 5.0) == b""


async def test_a_trickled_request_head_is_cut_off(
    edge: RunningEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request head that is still incomplete at the time limit ends the connection."""
    monkeypatch.setattr(server, "HEAD_TIMEOUT_S", SHORT_S)
    got = await _closed_within(edge, b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n", 5.0)
    assert not got.startswith(b"HTTP/1.1 200")


async def test_a_body_that_does_not_arrive_in_time_is_408(
    edge: RunningEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body still incomplete at its time limit is answered 408 naming the limit."""
    monkeypatch.setattr(body, "BODY_TIMEOUT_S", SHORT_S)
    head = (
        b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.edge.port)
    try:
        writer.write(head + b'{"prompt": ')
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5.0)
        rest = await asyncio.wait_for(reader.read(4096), 5.0)
    finally:
        writer.close()
    assert status.startswith(b"HTTP/1.1 408")
    assert b"REQUEST_TIMEOUT" in rest


async def test_a_client_leaving_mid_body_logs_no_error(
    edge: RunningEdge, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that disconnects while sending its body ends that request quietly: no
    exception reaches the server's error log."""
    head = (
        b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    state = edge.edge.server.server_state
    with caplog.at_level(logging.ERROR):
        _, writer = await asyncio.open_connection("127.0.0.1", edge.edge.port)
        writer.write(head + b'{"prompt": ')
        await writer.drain()
        # The request is in the app, reading its body.
        reading = await eventually(lambda: edge.edge.ctx.drain.in_flight == 1)
        writer.close()
        # uvicorn drops a request's task once it has run (and logged any exception it raised).
        ended = await eventually(lambda: not state.tasks and not state.connections)
    assert (reading, ended) == (True, True)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


KEY = "k-slow"
JSON = "Content-Type: application/json\r\n"
KEYED = f"Authorization: Bearer {KEY}\r\n"


async def _answered_then_held(port: int, head: str, held: list[asyncio.StreamWriter]) -> bytes:
    """Send `head` (a request line and headers) announcing a 100-byte body, and none of it;
    read the answer, then send one byte of the body. The answer's status code; the connection
    goes on `held`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    held.append(writer)
    writer.write(f"{head}Host: 127.0.0.1\r\nContent-Length: 100\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    length = next(
        int(line.split(b":", 1)[1])
        for line in answer.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await asyncio.wait_for(reader.readexactly(length), 5.0)
    with contextlib.suppress(OSError):
        writer.write(b"{")
        await writer.drain()
    return answer.split(b" ", 2)[1]


async def _closed(edge: RunningEdge) -> bool:
    """Whether the edge has no connection open, within 3 s."""
    return await eventually(lambda: not edge.edge.server.server_state.connections, 3.0)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        ("GET /healthz HTTP/1.1\r\n", b"200"),
        ("GET /v1/models HTTP/1.1\r\n", b"401"),
        (f"POST /v1/generate HTTP/1.1\r\n{JSON}{KEYED}", b"408"),
    ],
    ids=["probe", "no-key", "body-late"],
)
async def test_a_request_whose_body_its_route_leaves_unread_ends_its_connection(
    served: RunningServer, monkeypatch: pytest.MonkeyPatch, head: str, status: bytes
) -> None:
    """A route that answers without reading the whole body (a probe, a 401 to a request
    without a key, a 408) ends the connection with its answer (after reading and dropping the
    body's rest for LINGER_S at most): a client that goes on sending that body holds nothing
    open. Two such clients on an edge of 2 connections leave a keyed request served."""
    monkeypatch.setattr(server, "HEAD_TIMEOUT_S", SHORT_S)
    monkeypatch.setattr(body, "BODY_TIMEOUT_S", SHORT_S)
    monkeypatch.setattr(server, "LINGER_S", SHORT_S)
    edge = await start_edge(served.target, api_keys=(KEY,), max_connections=2)
    held: list[asyncio.StreamWriter] = []
    try:
        answers = [await _answered_then_held(edge.edge.port, head, held) for _ in range(2)]
        closed = await _closed(edge)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge.edge.port}") as client:
            keyed = await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    finally:
        for writer in held:
            writer.close()
        await edge.edge.stop()
    assert answers == [status, status]
    assert (closed, keyed.status_code) == (True, 200)


async def test_a_body_far_over_the_limit_gets_its_413_not_a_reset(served: RunningServer) -> None:
    """A client that sends a 16 MiB body to an edge that takes 1 MiB reads its 413 every time:
    the edge reads and drops the rest of the body while its answer goes out, rather than
    closing on it unread (a connection reset, which took the answer with it)."""
    edge = await start_edge(served.target)
    content = b'{"prompt": "' + b"a" * (16 << 20) + b'"}'
    statuses: list[int | str] = []
    try:
        for _ in range(3):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge.edge.port}") as client:
                try:
                    response = await client.post(
                        "/v1/generate",
                        content=content,
                        headers={"Content-Type": "application/json"},
                    )
                    statuses.append(response.status_code)
                except httpx.TransportError as error:
                    statuses.append(type(error).__name__)
    finally:
        await edge.edge.stop()
    assert statuses == [413, 413, 413]


async def test_an_edge_stops_at_once_while_a_connection_lingers(served: RunningServer) -> None:
    """An edge told to stop while a connection reads and drops the rest of a body its answer
    left unread closes that connection at once rather than after its linger (uvicorn waits
    for every connection before it exits)."""
    edge = await start_edge(served.target)
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.edge.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        started = time.monotonic()
        await edge.edge.stop()
        took = time.monotonic() - started
    finally:
        writer.close()
    assert took < 1.0
