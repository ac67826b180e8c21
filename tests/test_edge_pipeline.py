"""Native SSE and OpenAI requests go through one edge pipeline: the same outcome accounting,
labelled by each request's own route, and the same conversion of an upstream failure."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.types import Message

from tests.conftest import MODEL, RunningServer, eventually, start_edge, start_server
from tests.fakes import ScriptedModel
from tests.replicas import SlowOpening
from tokenwire.client.messages import GenerateOptions
from tokenwire.edge.metrics import RouteName
from tokenwire.edge.pipeline import open_generations
from tokenwire.edge.upstream import Upstream
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer

OUTCOMES = (
    "completed",
    "client_disconnected",
    "resumed",
    "upstream_error",
    "rejected",
    "cancelled",
    "deadline_exceeded",
)
REQUESTS = {
    "native": ("/v1/generate", {"prompt": "def f():"}),
    "completions": ("/v1/completions", {"model": MODEL, "prompt": "def f():", "stream": True}),
    "chat": (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ),
}
PLAIN = {"Content-Type": "text/plain"}


async def _outcomes(http: httpx.AsyncClient) -> dict[str, dict[str, float]]:
    """tokenwire_edge_streams_total by route, then outcome."""
    counts: dict[str, dict[str, float]] = {route: {} for route in REQUESTS}
    text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tokenwire_edge_streams_total":
                counts[sample.labels["route"]][sample.labels["outcome"]] = sample.value
    return counts


async def _data(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[str]:
    """Every event's data of a stream read to its end."""
    async with aconnect_sse(http, "POST", path, json=body) as source:
        return [event.data async for event in source.aiter_sse()]


async def _settles(check: Callable[[], Awaitable[bool]], within_s: float = 5.0) -> bool:
    """True once the async condition holds (a stream is counted when its task ends)."""
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _leave_after_first_event(
    http: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    async with aconnect_sse(http, "POST", path, json=body) as source:
        async for _ in source.aiter_sse():
            break


async def test_each_request_counts_one_outcome_under_its_own_route(paced: RunningServer) -> None:
    """On every route, a stream read to its end counts `completed`, a stream its client leaves
    counts `client_disconnected`, a refused request counts `rejected`: one count per request,
    under the route that served it and no other."""
    edge = await start_edge(paced.target, resume_window_s=0.5)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            for path, body in REQUESTS.values():
                await _data(http, path, {**body, "max_tokens": 3})
                await _leave_after_first_event(http, path, {**body, "max_tokens": 200})
                refused = await http.post(path, json={**body, "max_tokens": -1})
                assert refused.status_code == 400
            expected = {"completed": 1.0, "client_disconnected": 1.0, "rejected": 1.0}
            settled = {route: {**dict.fromkeys(OUTCOMES, 0.0), **expected} for route in REQUESTS}

            async def counted() -> bool:
                return await _outcomes(http) == settled

            assert await _settles(counted), await _outcomes(http)
    finally:
        await edge.edge.stop()


async def _failing_server(
    spec: ModelSpec, tokenizer: Tokenizer
) -> tuple[RunningServer, ScriptedModel]:
    """A server whose model emits one non-EOS token per step; tests arm its failures."""
    token = tokenizer.encode(" x")[0]
    model = ScriptedModel(spec, dict.fromkeys(range(spec.context_length), token), 0.005)
    return await start_server(model, tokenizer), model


async def test_an_upstream_failure_reads_the_same_on_every_route(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """A generation the server ends with INTERNAL after its first tokens is the same error in
    every format: a native `error` event {code INTERNAL, status 500}, an OpenAI error chunk and
    an OpenAI 500 response {type server_error, code internal}, each counted once as
    `upstream_error` under its own route."""
    running, model = await _failing_server(spec, tokenizer)
    edge = await start_edge(running.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            errors = {}
            for route, (path, body) in REQUESTS.items():
                model.fail_on_calls = {model.calls + 3}
                data = await _data(http, path, {**body, "max_tokens": 50, "ignore_eos": True})
                errors[route] = json.loads(data[-1])
            model.fail_on_calls = {model.calls + 3}
            whole = await http.post(
                "/v1/completions",
                json={**REQUESTS["completions"][1], "stream": False, "max_tokens": 50},
            )
            counts = await _outcomes(http)
    finally:
        await edge.edge.stop()
        await running.server.drain()
    native = errors.pop("native")
    assert (native["code"], native["status"]) == ("INTERNAL", 500)
    assert whole.status_code == 500
    for body in [*errors.values(), whole.json()]:
        assert (body["error"]["type"], body["error"]["code"]) == ("server_error", "internal")
        assert "injected failure" in body["error"]["message"]
    assert "injected failure" in native["message"]
    assert {route: counts[route]["upstream_error"] for route in REQUESTS} == {
        "native": 1.0,
        "completions": 2.0,
        "chat": 1.0,
    }
    assert sum(sum(by_outcome.values()) for by_outcome in counts.values()) == 4.0


def _only_rejected(counts: dict[str, dict[str, float]]) -> bool:
    """One `rejected` per route, and nothing else counted."""
    return counts == {
        route: {**dict.fromkeys(OUTCOMES, 0.0), "rejected": 1.0} for route in REQUESTS
    }


async def test_a_request_refused_for_its_content_type_counts_rejected(
    served: RunningServer,
) -> None:
    """A POST that is not JSON is refused (415) before it reaches its route, and still counts
    `rejected` once under that route."""
    edge = await start_edge(served.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            statuses = [
                (await http.post(path, content=json.dumps(body), headers=PLAIN)).status_code
                for path, body in REQUESTS.values()
            ]
            counts = await _outcomes(http)
    finally:
        await edge.edge.stop()
    assert statuses == [415] * len(REQUESTS)
    assert _only_rejected(counts), counts


async def test_a_request_refused_while_draining_counts_rejected(paced: RunningServer) -> None:
    """While the edge drains (held open by a running 400-token stream, cancelled once the
    requests are answered), a new request on each route is refused (503) and counts
    `rejected` once under that route."""
    edge = await start_edge(paced.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            long = {"prompt": "x", "max_tokens": 400, "ignore_eos": True}
            headers = {"X-Request-ID": "holds-the-drain"}
            async with aconnect_sse(
                http, "POST", "/v1/generate", json=long, headers=headers
            ) as source:
                stream = source.aiter_sse()
                await anext(stream)
                drain = asyncio.create_task(edge.edge.drain(grace_s=20))
                assert await eventually(lambda: edge.edge.ctx.drain.draining, 2)
                statuses = [
                    (await http.post(path, json=body)).status_code
                    for path, body in REQUESTS.values()
                ]
                counts = await _outcomes(http)
                await http.post("/v1/generate/holds-the-drain/cancel", json={})
                [event async for event in stream]
            await asyncio.wait_for(drain, 10)
    finally:
        await edge.edge.stop()
    assert statuses == [503] * len(REQUESTS)
    assert {route: counts[route]["rejected"] for route in REQUESTS} == dict.fromkeys(REQUESTS, 1.0)


async def test_a_cancel_or_a_resume_of_an_unknown_stream_counts_nothing(
    served: RunningServer,
) -> None:
    """Requests that serve no stream count no outcome: a cancel (even one refused for its
    content type) and a resume of an unknown id (404)."""
    edge = await start_edge(served.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            refused = await http.post("/v1/generate/nope/cancel", content=b"{}", headers=PLAIN)
            unknown = await http.post("/v1/generate/nope/cancel", json={})
            resume = await http.get("/v1/generate/nope/events")
            counts = await _outcomes(http)
    finally:
        await edge.edge.stop()
    assert (refused.status_code, unknown.status_code, resume.status_code) == (415, 404, 404)
    assert sum(sum(by_outcome.values()) for by_outcome in counts.values()) == 0


async def test_a_stream_cut_by_the_upstream_deadline_counts_deadline_exceeded_on_every_route(
    paced: RunningServer,
) -> None:
    """A generation the upstream deadline cuts short counts `deadline_exceeded`, as the
    server counts it, on every route: whether it ends in a `done`/finish chunk carrying that
    reason or in an error carrying DEADLINE_EXCEEDED."""
    edge = await start_edge(paced.target, upstream_timeout_s=0.3)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            for path, body in REQUESTS.values():
                data = await _data(http, path, {**body, "max_tokens": 450, "ignore_eos": True})
                assert "deadline" in (data[-2] + data[-1]).lower()

            async def counted() -> bool:
                counts = await _outcomes(http)
                return all(counts[route]["deadline_exceeded"] == 1 for route in REQUESTS)

            assert await _settles(counted), await _outcomes(http)
            counts = await _outcomes(http)
    finally:
        await edge.edge.stop()
    assert sum(sum(by_outcome.values()) for by_outcome in counts.values()) == len(REQUESTS)


async def test_a_stream_cancelled_by_the_edge_counts_cancelled_on_every_route(
    paced: RunningServer,
) -> None:
    """Streams still running when a drain's grace ends are cancelled (native: `done` with
    reason cancelled; OpenAI: a CANCELLED error chunk) and count `cancelled`, as the server
    counts a cancel, on every route."""
    edge = await start_edge(paced.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            started = [asyncio.Event() for _ in REQUESTS]

            async def read(path: str, body: dict[str, Any], first: asyncio.Event) -> None:
                body = {**body, "max_tokens": 450, "ignore_eos": True}
                async with aconnect_sse(http, "POST", path, json=body) as source:
                    async for _ in source.aiter_sse():
                        first.set()

            readers = [
                asyncio.create_task(read(path, body, first))
                for (path, body), first in zip(REQUESTS.values(), started, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)
            await edge.edge.drain(grace_s=0.2)
            await asyncio.wait_for(asyncio.gather(*readers), 10)
    finally:
        await edge.edge.stop()
    # The drained edge no longer answers /metrics: its registry is read directly.
    registry = edge.edge.ctx.metrics.registry
    cancelled = {
        route: registry.get_sample_value(
            "tokenwire_edge_streams_total", {"route": route, "outcome": "cancelled"}
        )
        for route in REQUESTS
    }
    assert cancelled == dict.fromkeys(REQUESTS, 1.0)


async def test_opening_cancelled_from_outside_leaves_no_unread_exception(
    paced: RunningServer,
) -> None:
    """A request whose task is cancelled while its two streams open (as uvicorn cuts the
    requests still running when the edge stops) cancels both openings and leaves asyncio no
    exception nobody read to log."""
    replica = SlowOpening(paced.target, 3.0)
    await replica.start()
    upstream = Upstream(replica.target)

    async def stays() -> Message:  # the HTTP client stays connected
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    loop = asyncio.get_running_loop()
    logged: list[str] = []
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: logged.append(str(context["message"])))
    try:
        choices = [GenerateOptions(request_id=f"cut-{i}") for i in range(2)]
        opening = asyncio.create_task(
            open_generations(
                Request({"type": "http"}, stays),
                upstream,
                ["def f():"] * 2,
                choices,
                route=RouteName.COMPLETIONS,
                owner=None,
            )
        )
        assert await eventually(lambda: replica.started == 2)
        opening.cancel()
        await asyncio.wait({opening})
        assert await eventually(lambda: replica.left_early == 2, within_s=1)
        del opening
        gc.collect()
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(handler)
        await upstream.close()
        await replica.stop()
    assert logged == []
