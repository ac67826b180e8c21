"""What one client, or many, can hold at the edge is bounded: a stream whose client stops reading
holds a few events of each choice (the rest waits at the server), a client that takes no data
for send_timeout_s is cut and its generations cancelled, and connections beyond
max_connections are refused while those within it are served. A real server and a real edge
on 127.0.0.1; the stalled clients are raw sockets that read nothing."""

from __future__ import annotations

import asyncio
import errno
import json
import resource
import socket
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx
import pytest
from structlog.testing import capture_logs

from tests.conftest import MODEL, RunningEdge, RunningServer, eventually, start_edge
from tokenwire.edge import pipeline
from tokenwire.edge.connections import (
    ACCEPT_FAILED,
    FD_RESERVE,
    PROBE_ROOM,
    STORE_RESERVE,
    connection_cap,
)

MAX_TOKENS = 480
"""Near the bundled model's 512-token context: with 20 top logprobs, far more than the socket
buffers between the edge and a client that reads nothing can take."""


def _chat(n: int, *, stream: bool = True) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "n": n,
        "max_tokens": MAX_TOKENS,
        "stream": stream,
        "logprobs": True,
        "top_logprobs": 20,
        "ignore_eos": True,
    }


NATIVE = {
    "prompt": "def f(x):",
    "max_tokens": MAX_TOKENS,
    "logprobs": True,
    "top_logprobs": 20,
    "ignore_eos": True,
}
ROUTES = {"native": ("/v1/generate", NATIVE), "chat": ("/v1/chat/completions", _chat(2))}


class RawClient:
    """One HTTP/1.1 request on a socket with a 4 KiB receive buffer, read only when asked."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def post(cls, port: int, path: str, body: dict[str, Any]) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        client = cls(sock)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            payload = json.dumps(body).encode()
            headers = [
                ("Host", "127.0.0.1"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(payload))),
            ]
            request = client.conn.send(h11.Request(method="POST", target=path, headers=headers))
            data = client.conn.send(h11.Data(data=payload))
            end = client.conn.send(h11.EndOfMessage())
            await loop.sock_sendall(sock, (request or b"") + (data or b"") + (end or b""))
        except BaseException:
            sock.close()
            raise
        return client

    async def body(self, within_s: float, pause_s: float = 0.0) -> bytes:
        """Read the whole response body (the stream to its end); with pause_s, 4 KiB at a
        time, pausing that long after each read."""
        loop = asyncio.get_running_loop()
        size = 4096 if pause_s else 65536
        parts: list[bytes] = []
        async with asyncio.timeout(within_s):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await loop.sock_recv(self.sock, size))
                    if pause_s:
                        await asyncio.sleep(pause_s)
                elif isinstance(event, h11.Data):
                    parts.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return b"".join(parts)

    def close(self) -> None:
        self.sock.close()


def _small_send_buffers(edge: RunningEdge) -> None:
    """Connections the edge accepts from now on get a 16 KiB kernel send buffer (accepted
    sockets inherit the listener's): what the kernel takes of a stalled stream is then a few
    events, whatever the system's TCP autotuning allows (4 MiB by default)."""
    for server in edge.edge.server.servers:
        for sock in server.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)


def _connections(edge: RunningEdge) -> int:
    """HTTP connections the edge holds open."""
    return len(edge.edge.server.server_state.connections)


@pytest.fixture
async def quick_cut(paced: RunningServer) -> AsyncIterator[RunningEdge]:
    """An edge in front of the paced server (a token every 10 ms: a 480-token stream runs
    ~5 s) that cuts a client after 0.5 s without progress and cancels a dropped native
    stream at once."""
    running = await start_edge(paced.target, send_timeout_s=0.5, resume_window_s=0.0)
    yield running
    await running.edge.stop()


async def test_a_stalled_chat_stream_holds_a_few_events_of_each_choice(
    served: RunningServer, edge: RunningEdge
) -> None:
    """A chat stream with 8 choices whose client reads nothing holds at most
    HELD_PER_CHOICE + 1 events of each choice at the edge once the server has generated all of
    them: the edge stops taking events from its upstream calls, and the rest stay upstream."""
    n = 8
    _small_send_buffers(edge)
    client = await RawClient.post(edge.edge.port, "/v1/chat/completions", _chat(n))
    try:

        def stalled() -> bool:
            backlogs = list(pipeline.BACKLOGS)
            return (
                served.engine.running_count == 0
                and len(backlogs) == 1
                and backlogs[0].held >= pipeline.HELD_PER_CHOICE * n
            )

        assert await eventually(stalled, within_s=60)
        [backlog] = pipeline.BACKLOGS
        assert backlog.held <= (pipeline.HELD_PER_CHOICE + 1) * n
        assert backlog.taken < n * MAX_TOKENS // 4
    finally:
        client.close()


async def test_a_stalled_chat_stream_read_again_delivers_every_event(
    served: RunningServer, edge: RunningEdge
) -> None:
    """A chat stream whose client stopped reading until the server had generated every token
    (the edge holding only its bounded backlog) delivers every chunk of every choice, then
    [DONE], once the client reads again."""
    n = 4
    _small_send_buffers(edge)
    client = await RawClient.post(edge.edge.port, "/v1/chat/completions", _chat(n))
    try:

        def stalled() -> bool:
            backlogs = list(pipeline.BACKLOGS)
            return served.engine.running_count == 0 and any(
                b.held >= pipeline.HELD_PER_CHOICE * n for b in backlogs
            )

        assert await eventually(stalled, within_s=60)
        body = (await client.body(within_s=60)).decode()
    finally:
        client.close()
    data = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    tokens = [0] * n
    for chunk in map(json.loads, data[:-1]):
        for choice in chunk["choices"]:
            # Each choice's role chunk, then one chunk per token, then its finish.
            tokens[choice["index"]] += (
                choice["finish_reason"] is None and "role" not in choice["delta"]
            )
    assert tokens == [MAX_TOKENS] * n


@pytest.mark.parametrize("route", ROUTES)
async def test_a_client_that_takes_no_data_is_cut_and_its_generations_cancelled(
    paced: RunningServer, quick_cut: RunningEdge, route: str
) -> None:
    """A client that reads nothing of its stream (native, or chat with 2 choices) for longer
    than send_timeout_s is cut: the edge drops its connection, and the server's running count
    returns to 0 with every generation cancelled, long before it could have finished."""
    path, body = ROUTES[route]
    choices = int(body.get("n", 1))
    _small_send_buffers(quick_cut)
    client = await RawClient.post(quick_cut.edge.port, path, body)
    assert paced.observer is not None
    records = paced.observer.finished  # type: ignore[attr-defined]
    try:
        assert await eventually(lambda: _connections(quick_cut) == 1)
        cut = await eventually(lambda: _connections(quick_cut) == 0, within_s=20)
        settled = await eventually(
            lambda: paced.engine.running_count == 0 and len(records) == choices, within_s=10
        )
    finally:
        client.close()
    assert (cut, settled) == (True, True)
    assert {r.outcome for r in records.values()} == {"cancelled"}
    assert all(r.completion_tokens < MAX_TOKENS for r in records.values())


async def test_a_whole_response_its_client_does_not_read_is_cut(served: RunningServer) -> None:
    """A whole (non-streamed) chat response far larger than the write buffer, whose client
    reads none of it, is cut send_timeout_s after its writing stalls: the edge does not hold
    the connection and its unsent body until the client goes."""
    edge = await start_edge(served.target, send_timeout_s=0.5)
    _small_send_buffers(edge)
    client = await RawClient.post(edge.edge.port, "/v1/chat/completions", _chat(4, stream=False))
    try:
        assert await eventually(lambda: _connections(edge) == 1)
        assert await eventually(lambda: _connections(edge) == 0, within_s=60)
    finally:
        client.close()
        await edge.edge.stop()


async def test_a_whole_response_read_slowly_but_steadily_is_not_cut(
    served: RunningServer,
) -> None:
    """A whole chat response far larger than the write buffer, read 4 KiB every 0.05 s (its
    writing stays paused for seconds, longer than send_timeout_s), arrives whole: the client
    takes some data within every send_timeout_s, so it is never cut."""
    edge = await start_edge(served.target, send_timeout_s=0.5)
    _small_send_buffers(edge)
    body = {**_chat(1, stream=False), "max_tokens": 200}
    client = await RawClient.post(edge.edge.port, "/v1/chat/completions", body)
    try:
        whole = await client.body(within_s=90, pause_s=0.05)
    finally:
        client.close()
        await edge.edge.stop()
    assert len(whole) > 200_000
    reply = json.loads(whole)
    assert reply["usage"]["completion_tokens"] == 200


@pytest.fixture
async def capped(served: RunningServer) -> AsyncIterator[RunningEdge]:
    """An edge that serves 2 connections at once."""
    running = await start_edge(served.target, max_connections=2)
    yield running
    await running.edge.stop()


def _one_connection(edge: RunningEdge) -> httpx.AsyncClient:
    """A client that keeps one connection to the edge and reuses it."""
    return httpx.AsyncClient(base_url=edge.url, timeout=10, limits=httpx.Limits(max_connections=1))


async def test_a_connection_beyond_the_cap_gets_503_while_those_within_are_served(
    capped: RunningEdge,
) -> None:
    """With max_connections=2 and two connections open, a request on a third gets 503 in the
    route's error shape with `Connection: close`, while the first two are still answered."""
    async with (
        _one_connection(capped) as first,
        _one_connection(capped) as second,
        _one_connection(capped) as third,
    ):
        assert (await first.get("/v1/models")).status_code == 200
        assert (await second.get("/v1/models")).status_code == 200
        refused = await third.post("/v1/generate", json={"prompt": "x", "max_tokens": 1})
        assert refused.status_code == 503
        assert refused.headers["connection"] == "close"
        assert refused.json()["error"]["code"] == "UNAVAILABLE"
        assert (await first.get("/v1/models")).status_code == 200
        assert (await second.get("/v1/models")).status_code == 200


async def test_health_probes_beyond_the_cap_are_answered(capped: RunningEdge) -> None:
    """With max_connections=2 and two connections open, /healthz and /readyz on further
    connections are still answered (then those connections close)."""
    async with _one_connection(capped) as first, _one_connection(capped) as second:
        assert (await first.get("/v1/models")).status_code == 200
        assert (await second.get("/v1/models")).status_code == 200
        for path in ("/healthz", "/readyz"):
            async with _one_connection(capped) as probe:
                answer = await probe.get(path)
            assert (answer.status_code, answer.headers["connection"]) == (200, "close")


async def test_a_connection_beyond_the_probe_room_is_closed_at_once(capped: RunningEdge) -> None:
    """Connections beyond max_connections + PROBE_ROOM are closed as soon as they are accepted
    (well before the request-head deadline), so the cap bounds the edge's file descriptors."""
    held = [
        await asyncio.open_connection("127.0.0.1", capped.edge.port) for _ in range(2 + PROBE_ROOM)
    ]
    try:
        assert await eventually(lambda: _connections(capped) == 2 + PROBE_ROOM)
        reader, writer = await asyncio.open_connection("127.0.0.1", capped.edge.port)
        try:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5.0)
        finally:
            writer.close()
    finally:
        for _, w in held:
            w.close()


async def test_the_soft_open_files_limit_is_raised_to_the_hard_one(served: RunningServer) -> None:
    """At start the edge raises its soft RLIMIT_NOFILE to the hard limit, so that its
    connection cap is not held to a low default (1024 on many systems)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"the hard open-files limit ({hard}) leaves nothing to raise to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        edge = await start_edge(served.target)
        try:
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        finally:
            await edge.edge.stop()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_max_connections_is_lowered_to_fit_the_open_files_limit() -> None:
    """max_connections is kept where it fits under the open-files limit with the edge's
    reserve, lowered where it does not, and halved (less the store's writers) with a Redis
    resume store, where each stream read holds a Redis connection of its own."""
    room = 1024 - FD_RESERVE - PROBE_ROOM
    assert connection_cap(900, 1024) == 900
    assert connection_cap(2000, 1024) == room
    assert connection_cap(2000, 1024, resume_store=True) == (room - STORE_RESERVE) // 2
    assert connection_cap(900, 10) == 1


async def test_failed_accepts_are_one_log_line_per_interval(edge: RunningEdge) -> None:
    """The edge's event loop reports accepts that fail for want of file descriptors (asyncio
    tries up to `backlog` of them per wake-up, each with a traceback) as one
    `edge.accept_failed` warning per interval, with their count."""
    loop = asyncio.get_running_loop()
    failure = OSError(errno.EMFILE, "Too many open files")
    with capture_logs() as logs:
        for _ in range(1000):
            loop.call_exception_handler({"message": ACCEPT_FAILED, "exception": failure})
    assert [(line["event"], line["log_level"]) for line in logs] == [
        ("edge.accept_failed", "warning")
    ]
