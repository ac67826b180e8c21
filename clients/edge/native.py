"""Native SSE API: /v1/generate (POST and EventSource GET), resume, cancel.

Events: `token` {text, id, index, logprob?}, `usage` {...}, `done` {finish_reason,
stop_sequence}, `error` {code, status, message}. Every event has `id: <request_id>:<seq>`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenwire.client.client import Completion, GenerateOptions, Token, Usage, event_from_pb
from tokenwire.edge.body import Fields, read_json
from tokenwire.edge.context import EdgeContext, request_id_of
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.guards import principal_of
from tokenwire.edge.resumable import parse_event_id
from tokenwire.edge.store import StoredStream
from tokenwire.v1 import generate_pb2 as pb

log = structlog.get_logger("tokenwire.edge")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def options_from(fields: Fields, request_id: str) -> GenerateOptions:
    return GenerateOptions(
        max_tokens=fields.integer("max_tokens", 0) or 0,
        temperature=fields.number("temperature"),
        top_k=fields.integer("top_k", 0) or 0,
        top_p=fields.number("top_p"),
        repetition_penalty=fields.number("repetition_penalty"),
        seed=fields.integer("seed"),
        stop=fields.strings("stop"),
        ignore_eos=fields.boolean("ignore_eos"),
        logprobs=fields.boolean("logprobs"),
        request_id=request_id,
    )


def native_event(message: pb.GenerateResponse) -> tuple[str, dict[str, Any]]:
    event = event_from_pb(message)
    if isinstance(event, Token):
        data: dict[str, Any] = {"text": event.text, "id": event.id, "index": event.index}
        if event.logprob is not None:
            data["logprob"] = event.logprob
        return "token", data
    if isinstance(event, Usage):
        return "usage", {
            "prompt_tokens": event.prompt_tokens,
            "completion_tokens": event.completion_tokens,
            "total_tokens": event.total_tokens,
            "queue_time_ms": event.queue_time_ms,
            "time_to_first_token_ms": event.time_to_first_token_ms,
            "decode_time_ms": event.decode_time_ms,
            "total_time_ms": event.total_time_ms,
            "request_id": event.request_id,
        }
    assert isinstance(event, Completion)
    return "done", {"finish_reason": event.finish_reason, "stop_sequence": event.stop_sequence}


def _sse(stream: StoredStream, after: int, ctx: EdgeContext, route: str) -> Response:
    started = time.perf_counter()

    async def events() -> AsyncIterator[ServerSentEvent]:
        first, sent, outcome = True, 0, "client_disconnected"
        ctx.metrics.active.inc()
        try:
            async for event in stream.follow(after):
                if first and event.name == "token" and after == 0:
                    ctx.observe_ttft(route, time.perf_counter() - started)
                first = False
                sent += 1
                # seq 0: an event this edge made up (the store failed), which no resume can name.
                event_id = f"{stream.request_id}:{event.seq}" if event.seq else None
                yield ServerSentEvent(event.data, event=event.name, id=event_id)
                if event.name in {"done", "error"}:
                    outcome = "completed" if event.name == "done" else "upstream_error"
                    ctx.outcome(route, outcome)
        finally:
            ctx.metrics.active.dec()
            log.info(
                "edge.stream",
                request_id=stream.request_id,
                route=route,
                resumed_after=after,
                events=sent,
                outcome=outcome,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )

    headers = {**SSE_HEADERS, "X-Request-ID": stream.request_id}
    return EventSourceResponse(events(), headers=headers, ping=ctx.settings.ping_s)


async def _resume(request: Request, ctx: EdgeContext, last_event_id: str) -> Response:
    request_id, seq = parse_event_id(last_event_id)
    stream = await ctx.streams.get(request_id, principal_of(request.scope))
    if stream.followers == 0:
        ctx.outcome("native", "resumed")
    return _sse(stream, seq, ctx, "native")


async def _start(request: Request, ctx: EdgeContext, fields: Fields) -> Response:
    prompt = fields.string("prompt")
    request_id = request_id_of(request, fields.string("request_id"))
    message = options_from(fields, request_id).to_pb(prompt)
    await ctx.streams.claim(request_id)
    try:
        upstream = await ctx.upstream.open(message, request_id)
        stream = await ctx.streams.open(upstream, request_id, principal_of(request.scope))
    finally:
        await ctx.streams.release(request_id)
    return _sse(stream, 0, ctx, "native")


def _last_event_id(request: Request) -> str | None:
    return request.headers.get("last-event-id") or request.query_params.get("last_event_id")


async def generate_post(request: Request) -> Response:
    ctx = EdgeContext.of(request)
    last = _last_event_id(request)
    if last:
        return await _resume(request, ctx, last)
    body = await read_json(request, ctx.settings.max_body_bytes)
    return await _start(request, ctx, Fields(body))


async def generate(request: Request) -> Response:
    """One route for both methods, so a wrong method's 405 names both in `Allow`."""
    if request.method == "POST":
        return await generate_post(request)
    return await generate_get(request)


async def generate_get(request: Request) -> Response:
    """EventSource entry point; its automatic reconnect sends Last-Event-ID to the same URL."""
    ctx = EdgeContext.of(request)
    last = _last_event_id(request)
    if last:
        return await _resume(request, ctx, last)
    return await _start(request, ctx, Fields(dict(request.query_params), from_query=True))


async def resume(request: Request) -> Response:
    """GET /v1/generate/{request_id}/events with Last-Event-ID (or ?last_event_id=)."""
    ctx = EdgeContext.of(request)
    request_id = request.path_params["request_id"]
    last = _last_event_id(request) or f"{request_id}:0"
    if parse_event_id(last)[0] != request_id:
        raise EdgeError.invalid("Last-Event-ID", "must name the same request id as the path")
    return await _resume(request, ctx, last)


async def cancel(request: Request) -> Response:
    """POST /v1/generate/{request_id}/cancel: only the stream's own caller can cancel it."""
    ctx = EdgeContext.of(request)
    request_id = request.path_params["request_id"]
    await ctx.streams.cancel(request_id, principal_of(request.scope))
    return JSONResponse({"request_id": request_id, "cancelled": True})
