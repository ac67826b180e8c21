"""Edge error mapping and access control: 429 with Retry-After, 503 when down, 401 without key."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from tests.conftest import MODEL, RunningServer, start_edge, start_server
from tests.fakes import ScriptedModel
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer


async def test_overload_maps_to_429_with_retry_after(spec: ModelSpec, tokenizer: Tokenizer) -> None:
    """When the server answers RESOURCE_EXHAUSTED the edge answers 429 with Retry-After."""
    slow = ScriptedModel(spec, {}, step_delay_s=0.02)
    server = await start_server(slow, tokenizer, max_batch_size=1, max_queue=0)
    edge = await start_edge(server.target)
    body = {"prompt": "a", "max_tokens": 200, "ignore_eos": True}
    try:
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
            http.stream("POST", "/v1/generate", json=body) as first,
        ):
            assert first.status_code == 200
            refused = await http.post("/v1/generate", json=body)
            chat = await http.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
            )
    finally:
        await edge.edge.stop()
        await server.server.drain()
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert chat.status_code == 429
    assert chat.json()["error"]["type"] == "rate_limit_error"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_upstream_down_is_503_and_not_ready() -> None:
    """With no server behind it, /readyz is 503 and a generation is 503; /healthz stays 200."""
    edge = await start_edge(f"127.0.0.1:{_free_port()}", upstream_timeout_s=5.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            ready = await http.get("/readyz")
            alive = await http.get("/healthz")
            generate = await http.post("/v1/generate", json={"prompt": "x"})
    finally:
        await edge.edge.stop()
    assert (ready.status_code, alive.status_code, generate.status_code) == (503, 200, 503)


async def test_an_unreachable_server_is_503_without_its_address() -> None:
    """The 503 for a server the edge cannot reach says so without the channel's own words
    (internal addresses, ports, TLS details), which stay in the edge's log."""
    port = _free_port()
    edge = await start_edge(f"127.0.0.1:{port}", upstream_timeout_s=5.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            native = await http.post("/v1/generate", json={"prompt": "x"})
            openai = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
    finally:
        await edge.edge.stop()
    assert (native.status_code, openai.status_code) == (503, 503)
    assert native.json()["error"]["message"] == "the server cannot be reached"
    assert str(port) not in native.text + openai.text


@pytest.mark.parametrize("dead_first", [False, True], ids=["live", "dead,live"])
async def test_ready_while_any_target_is_serving(served: RunningServer, dead_first: bool) -> None:
    """/readyz is 200 once an upstream health check says SERVING: the only target's, or with
    --grpc-target dead,live the live one's (a stream would open on it)."""
    dead = f"127.0.0.1:{_free_port()}," if dead_first else ""
    edge = await start_edge(dead + served.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            ready = await http.get("/readyz")
    finally:
        await edge.edge.stop()
    assert ready.status_code == 200


async def test_a_dead_first_target_passes_new_streams_to_the_next(served: RunningServer) -> None:
    """A native stream through an edge whose first target is dead opens on the second and
    ends with `done`."""
    edge = await start_edge(f"127.0.0.1:{_free_port()},{served.target}")
    body = {"prompt": "x", "max_tokens": 2}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            response = await http.post("/v1/generate", json=body)
    finally:
        await edge.edge.stop()
    assert response.status_code == 200
    assert "event: done" in response.text


async def test_openai_routes_answer_with_a_dead_first_target(served: RunningServer) -> None:
    """The OpenAI completions route, which asks the served model first, answers 200 from the
    second target when the first is dead."""
    edge = await start_edge(f"127.0.0.1:{_free_port()},{served.target}")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            response = await http.post("/v1/completions", json=body)
    finally:
        await edge.edge.stop()
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] == "length"


async def test_api_key_is_required_except_for_health_and_page(served: RunningServer) -> None:
    """With keys configured: 401 without or with a wrong key, 200 with one; /healthz and / open."""
    edge = await start_edge(served.target, api_keys=("k-one", "k-two"))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            missing = await http.post("/v1/completions", json=body)
            wrong = await http.post(
                "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}
            )
            right = await http.post(
                "/v1/completions", json=body, headers={"Authorization": "Bearer k-two"}
            )
            open_paths = await asyncio.gather(http.get("/healthz"), http.get("/"))
    finally:
        await edge.edge.stop()
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert missing.json()["error"]["type"] == "authentication_error"
    assert [r.status_code for r in open_paths] == [200, 200]
