"""The edge's log lines: one `edge.stream` line for each request its metrics count (a stream, a
whole OpenAI response, a refusal) with the request's id, route, outcome and HTTP status, and an
`edge.stream_failover` warning when a stream goes on on another server. A real server (a
subprocess where one is killed) and a real edge on 127.0.0.1, logs captured with structlog."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from structlog.testing import capture_logs

from tests.conftest import (
    MODEL,
    RunningEdge,
    RunningServer,
    eventually,
    start_edge,
    start_server,
)
from tests.fakes import ScriptedModel
from tests.procs import EdgeProcess, ServerProcess
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer

Logs = list[dict[str, Any]]
PROMPT = "def secret_prompt_marker():"
NATIVE = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}


@pytest.fixture
async def small_bodies(served: RunningServer) -> AsyncIterator[RunningEdge]:
    """The edge in front of the shared server, refusing bodies over 1 KiB."""
    running = await start_edge(served.target, max_body_bytes=1024)
    yield running
    await running.edge.stop()


@pytest.fixture
def logs() -> Iterator[Logs]:
    with capture_logs() as captured:
        yield captured


def _lines(logs: Logs, event: str, request_id: str) -> Callable[[], Logs]:
    return lambda: [e for e in logs if e["event"] == event and e.get("request_id") == request_id]


async def _one_end_line(logs: Logs, request_id: str) -> dict[str, Any]:
    """The request's `edge.stream` line (written once its response is over), checked unique."""
    lines = _lines(logs, "edge.stream", request_id)
    assert await eventually(lambda: bool(lines()))
    [line] = lines()
    return line


@pytest.mark.parametrize(
    ("path", "body", "route"),
    [
        ("/v1/completions", {"prompt": PROMPT}, "completions"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}, "chat"),
    ],
)
async def test_a_whole_openai_response_writes_one_end_line(
    edge: RunningEdge, logs: Logs, path: str, body: dict[str, Any], route: str
) -> None:
    """A `stream: false` request writes one edge.stream line with its id, route, outcome and
    status, and nothing of its prompt."""
    request = {**body, "model": MODEL, "max_tokens": 4, "stream": False}
    headers = {"X-Request-ID": f"whole-{route}"}
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
        response = await http.post(path, json=request, headers=headers)
    assert response.status_code == 200
    line = await _one_end_line(logs, f"whole-{route}")
    assert (line["route"], line["outcome"], line["status"]) == (route, "completed", 200)
    assert "secret_prompt_marker" not in repr(logs)


REFUSALS = {
    "unknown-field": ("/v1/generate", {"json": {**NATIVE, "bogus": 1}}, 400, "native"),
    "invalid-value": (
        "/v1/completions",
        {"json": {"model": MODEL, "prompt": "x", "top_p": 7}},
        400,
        "completions",
    ),
    "content-type": ("/v1/chat/completions", {"content": b"{}"}, 415, "chat"),
    "body-too-large": ("/v1/completions", {"json": {"prompt": "x" * 2000}}, 413, "completions"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_a_refused_request_writes_one_end_line(
    small_bodies: RunningEdge, logs: Logs, case: str
) -> None:
    """A request the edge refuses, by a gate (415) or by its route (400, 413), writes one
    edge.stream line with the caller's id, its route, outcome `rejected` and the status sent."""
    path, content, status, route = REFUSALS[case]
    headers = {"X-Request-ID": f"refused-{case}"}
    if "content" in content:
        headers["Content-Type"] = "text/plain"
    async with httpx.AsyncClient(base_url=small_bodies.url, timeout=30) as http:
        response = await http.post(path, headers=headers, **content)
    assert response.status_code == status
    line = await _one_end_line(logs, f"refused-{case}")
    assert (line["route"], line["outcome"], line["status"]) == (route, "rejected", status)
    assert line["events"] == 0


async def test_a_request_failed_before_any_stream_writes_one_end_line(
    spec: ModelSpec, tokenizer: Tokenizer, logs: Logs
) -> None:
    """A request the edge answers with a 5xx before any stream begins (here a 500: the model's
    chat template does not compile) writes one edge.stream line, outcome `upstream_error`,
    with that status."""
    broken = dataclasses.replace(spec, chat_template="{% for m in messages %}{{ m.content }}")
    running = await start_server(ScriptedModel(broken, {}), tokenizer)
    edge = await start_edge(running.target)
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            response = await http.post(
                "/v1/chat/completions", json=body, headers={"X-Request-ID": "template-500"}
            )
    finally:
        await edge.edge.stop()
        await running.server.drain()
    assert response.status_code == 500
    line = await _one_end_line(logs, "template-500")
    assert (line["route"], line["outcome"], line["status"]) == ("chat", "upstream_error", 500)


async def test_a_stream_writes_one_end_line_with_its_status(edge: RunningEdge, logs: Logs) -> None:
    """A native stream writes one edge.stream line with its id, outcome, the 200 it answered
    and the number of events it sent."""
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
        aconnect_sse(
            http, "POST", "/v1/generate", json=NATIVE, headers={"X-Request-ID": "streamed"}
        ) as source,
    ):
        events = [event async for event in source.aiter_sse()]
    line = await _one_end_line(logs, "streamed")
    assert (line["route"], line["outcome"], line["status"]) == ("native", "completed", 200)
    assert line["events"] == len(events)


@pytest.mark.slow
async def test_a_stream_that_fails_over_logs_a_warning(served: RunningServer, logs: Logs) -> None:
    """Killing the server a native stream runs on logs one edge.stream_failover warning: the
    stream's id, the broken call's status, the token index it went on from and the target it
    went on on."""
    first = ServerProcess("--metrics-port", "0")
    try:
        first.wait_for("server.started")
        edge = await start_edge(f"{first.target},{served.target}")
        body = {**NATIVE, "max_tokens": 400}
        headers = {"X-Request-ID": "moved"}
        try:
            async with (
                httpx.AsyncClient(base_url=edge.url, timeout=60) as http,
                aconnect_sse(http, "POST", "/v1/generate", json=body, headers=headers) as source,
            ):
                events = []
                async for event in source.aiter_sse():
                    events.append(event)
                    if len(events) == 1:
                        first.proc.kill()
        finally:
            await edge.edge.stop()
    finally:
        first.close()
    assert events[-1].event == "done"
    [line] = _lines(logs, "edge.stream_failover", "moved")()
    assert line["log_level"] == "warning"
    assert (line["route"], line["code"], line["target"]) == ("native", "UNAVAILABLE", served.target)
    assert 1 <= line["from_index"] < 400


def test_a_malformed_http_request_is_logged_as_a_json_line() -> None:
    """uvicorn's warning about a malformed HTTP request (a NUL in a header) reaches the edge's
    log as a JSON line of the edge's shape (level, logger, timestamp), not as plain text among
    the JSON lines a log pipeline parses."""
    edge = EdgeProcess("127.0.0.1:1")
    try:
        host, port = edge.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
            assert conn.recv(1024).startswith(b"HTTP/1.1 400")
        line = edge.wait_for("Invalid HTTP request received.", timeout=10)
    finally:
        edge.stop()
        edge.close()
    assert (line["level"], line["logger"]) == ("warning", "uvicorn.error")
    assert "timestamp" in line
    assert not [r for r in edge.records if r["event"] == "raw"]


def test_a_standard_library_records_traceback_is_kept_in_its_json_line() -> None:
    """A library's exception logged through the standard library (uvicorn's "Exception in
    ASGI application", asyncio's "Task exception was never retrieved") keeps its traceback,
    as text in the JSON line's `exception`, not a repr of the traceback object."""
    script = (
        "import logging\n"
        "from tokenwire.common.logs import configure_logging\n"
        "configure_logging('json')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    logging.getLogger('uvicorn.error').exception('Exception in ASGI application')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    [line] = [json.loads(text) for text in done.stdout.splitlines()]
    assert line["event"] == "Exception in ASGI application"
    assert "Traceback (most recent call last)" in line["exception"]
    assert "ZeroDivisionError" in line["exception"]


async def test_a_replay_whose_client_leaves_logs_no_write_warnings(served: RunningServer) -> None:
    """A client that reads the start of a long replay and leaves (as `curl ... | head -c 200`
    does) costs the edge's log no asyncio warning per event it still had for that client
    (one per write, hundreds for one disconnect, before)."""
    edge = EdgeProcess(served.target)
    try:
        body = {"prompt": "def f():", "max_tokens": 480, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            reply = await http.post("/v1/generate", json=body, headers={"X-Request-ID": "rp"})
            assert reply.status_code == 200
        host, port = edge.url.removeprefix("http://").rsplit(":", 1)

        def read_the_start_and_leave() -> None:
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                conn.sendall(
                    f"GET /v1/generate/rp/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
                )
                conn.recv(200)

        await asyncio.to_thread(read_the_start_and_leave)
        await asyncio.sleep(1.0)  # the edge writes the rest of the replay meanwhile
    finally:
        edge.stop()
        edge.close()
    assert [r for r in edge.records if "raised exception" in str(r["event"])] == []
