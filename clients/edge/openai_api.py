"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

A request with `n` choices runs `n` upstream generations. Streaming follows OpenAI's chunk
format: content deltas (choices interleaved, each chunk naming its choice's `index`), then per
choice a chunk with an empty delta and the finish_reason, then (with
stream_options.include_usage) a chunk with `choices: []` and `usage`, then `data: [DONE]`.
A client disconnect cancels every upstream call at once, streamed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from typing import Any

import structlog
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenwire.client.client import Completion, Token, Usage, event_from_pb
from tokenwire.edge.body import Fields, read_json
from tokenwire.edge.context import EdgeContext, request_id_of
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.openai_request import (
    OpenAIRequest,
    chat_prompt,
    chat_turns,
    check_model,
    completion_prompt,
    read_request,
)
from tokenwire.edge.upstream import UpstreamStream
from tokenwire.v1 import generate_pb2 as pb

log = structlog.get_logger("tokenwire.edge")
FINISH = {"stop": "stop", "stop_sequence": "stop", "length": "length"}


class _Shape:
    """The JSON shapes of one route (completions or chat)."""

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())

    def envelope(self, choices: list[dict[str, Any]], *, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if chunk and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def delta(
        self, index: int, token: Token | None, finish: str | None, first: bool
    ) -> dict[str, Any]:
        text = token.text if token else ""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
            if token is not None and not first:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if token is not None and token.logprob is not None:
            choice["logprobs"] = _logprobs([token], chat=self.chat)
        return choice

    def whole(self, index: int, result: _Result) -> dict[str, Any]:
        text = "".join(t.text for t in result.tokens)
        logprobs = (
            _logprobs(result.tokens, chat=self.chat)
            if any(t.logprob is not None for t in result.tokens)
            else None
        )
        if self.chat:
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": text},
            }
        else:
            choice = {"index": index, "text": text}
        return choice | {"logprobs": logprobs, "finish_reason": result.finish}


def _logprobs(tokens: list[Token], *, chat: bool) -> dict[str, Any]:
    if chat:
        content = [
            {
                "token": t.text,
                "logprob": t.logprob,
                "bytes": list(t.text.encode()),
                "top_logprobs": [
                    {"token": a.text, "logprob": a.logprob, "bytes": list(a.text.encode())}
                    for a in t.top_logprobs
                ],
            }
            for t in tokens
        ]
        return {"content": content}
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    wanted = any(t.top_logprobs for t in tokens)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        # The legacy format: one {text: logprob} object per position.
        "top_logprobs": [{a.text: a.logprob for a in t.top_logprobs} for t in tokens]
        if wanted
        else None,
        "text_offset": offsets,
    }


@dataclasses.dataclass
class _Result:
    """What one choice's generation produced."""

    tokens: list[Token] = dataclasses.field(default_factory=list)
    usage: Usage | None = None
    finish: str = "stop"

    def see(self, event: Token | Usage | Completion) -> None:
        if isinstance(event, Token):
            self.tokens.append(event)
        elif isinstance(event, Usage):
            self.usage = event
        else:
            self.finish = FINISH.get(event.finish_reason, event.finish_reason)


def _usage(usages: list[Usage | None]) -> dict[str, int] | None:
    """Usage of all choices: the prompt once (they share it), completion tokens summed."""
    known = [u for u in usages if u is not None]
    if not known:
        return None
    prompt = known[0].prompt_tokens
    completion = sum(u.completion_tokens for u in known)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@dataclasses.dataclass
class _Call:
    """An accepted OpenAI request: its upstream generations, one per choice."""

    ctx: EdgeContext
    route: str
    request_id: str
    request: OpenAIRequest
    upstreams: list[UpstreamStream]
    shape: _Shape

    def cancel(self) -> None:
        for upstream in self.upstreams:
            upstream.cancel()


async def _begin(request: Request, *, chat: bool) -> _Call:
    ctx = EdgeContext.of(request)
    fields = Fields(await read_json(request, ctx.settings.max_body_bytes))
    request_id = request_id_of(request, "")
    turns = chat_turns(fields) if chat else None
    text = "" if chat else completion_prompt(fields)
    parsed = read_request(fields, request_id, chat=chat)
    info = await ctx.upstream.model_info()
    check_model(parsed, info, ctx.settings.model_aliases)
    prompt = chat_prompt(turns, info) if turns is not None else text
    try:
        upstreams = await _open_all(ctx, parsed, prompt)
    except EdgeError as error:
        raise error.renamed(parsed.names) from None
    # One choice keeps the id the server settled on; n choices share the caller's.
    base_id = upstreams[0].request_id if len(upstreams) == 1 else request_id
    route = "chat" if chat else "completions"
    return _Call(ctx, route, base_id, parsed, upstreams, _Shape(chat, base_id, info.model))


async def _open_all(ctx: EdgeContext, parsed: OpenAIRequest, prompt: str) -> list[UpstreamStream]:
    """Open every choice's generation; if any is refused, cancel the others and raise."""
    results = await asyncio.gather(
        *(ctx.upstream.open(o.to_pb(prompt), o.request_id) for o in parsed.choices),
        return_exceptions=True,
    )
    opened = [r for r in results if isinstance(r, UpstreamStream)]
    for result in results:
        if isinstance(result, BaseException):
            for upstream in opened:
                upstream.cancel()
            raise result
    return opened


async def _respond(request: Request, *, chat: bool) -> Response:
    call = await _begin(request, chat=chat)
    headers = {"X-Request-ID": call.request_id}
    if call.request.stream:
        body = _stream(call)
        return EventSourceResponse(
            body, headers={"Cache-Control": "no-cache", **headers}, ping=call.ctx.settings.ping_s
        )
    whole = await _until_disconnect(request, _whole(call))
    if whole is None:
        call.ctx.outcome(call.route, "client_disconnected")
        return Response(status_code=499)
    return JSONResponse(whole, headers=headers)


async def _until_disconnect(
    request: Request, work: Coroutine[Any, Any, dict[str, Any]]
) -> dict[str, Any] | None:
    """The result of `work`, or None (work cancelled) when the HTTP client leaves first.

    The body has been read, so the next ASGI message is the client's disconnect."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(upstream: UpstreamStream) -> _Result:
    result = _Result()
    async for message in upstream.messages():
        event = event_from_pb(message)
        result.see(event)
    return result


async def _whole(call: _Call) -> dict[str, Any]:
    try:
        results = await asyncio.gather(*(_collect(u) for u in call.upstreams))
    finally:
        call.cancel()
    choices = [call.shape.whole(i, result) for i, result in enumerate(results)]
    call.ctx.outcome(call.route, "completed")
    usage = _usage([r.usage for r in results])
    return call.shape.envelope(choices, chunk=False) | {"usage": usage}


async def _merged(
    upstreams: list[UpstreamStream],
) -> AsyncGenerator[tuple[int, pb.GenerateResponse], None]:
    """Every choice's messages, as they arrive, tagged with the choice's index."""
    queue: asyncio.Queue[tuple[int, pb.GenerateResponse | EdgeError | None]] = asyncio.Queue()

    async def pump(index: int, upstream: UpstreamStream) -> None:
        try:
            async for message in upstream.messages():
                queue.put_nowait((index, message))
            queue.put_nowait((index, None))
        except EdgeError as error:
            queue.put_nowait((index, error))
        except asyncio.CancelledError:
            # The call was cancelled under us (the end of a drain's grace): say so in-band.
            # When it is this task that is cancelled, nobody reads the queue any more.
            queue.put_nowait((index, EdgeError(499, "CANCELLED", "the generation was cancelled")))
            raise

    pumps = [asyncio.ensure_future(pump(i, u)) for i, u in enumerate(upstreams)]
    try:
        running = len(upstreams)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, EdgeError):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()


class _Chunks:
    """Turns each choice's events into stream chunks, remembering what usage needs."""

    def __init__(self, shape: _Shape, choices: int, include_usage: bool) -> None:
        self.shape = shape
        self.include_usage = include_usage
        self.first = [True] * choices
        self.usages: list[Usage | None] = [None] * choices

    def of(self, index: int, event: Token | Usage | Completion) -> ServerSentEvent | None:
        if isinstance(event, Usage):
            self.usages[index] = event
            return None
        if isinstance(event, Token):
            choice = self.shape.delta(index, event, None, self.first[index])
            self.first[index] = False
        else:
            finish = FINISH.get(event.finish_reason, event.finish_reason)
            choice = self.shape.delta(index, None, finish, self.first[index])
        return _chunk(self.shape, [choice], self.include_usage)

    def usage(self) -> ServerSentEvent:
        body = self.shape.envelope([], chunk=True) | {"usage": _usage(self.usages)}
        return ServerSentEvent(_json(body))


async def _stream(call: _Call) -> AsyncIterator[ServerSentEvent]:
    ctx, route = call.ctx, call.route
    chunks = _Chunks(call.shape, len(call.upstreams), call.request.include_usage)
    started = time.perf_counter()
    finished = timed = False
    ctx.metrics.active.inc()
    try:
        async with contextlib.aclosing(_merged(call.upstreams)) as merged:
            async for index, message in merged:
                event = event_from_pb(message)
                if isinstance(event, Token) and not timed:
                    ctx.observe_ttft(route, time.perf_counter() - started)
                    timed = True
                if (chunk := chunks.of(index, event)) is not None:
                    yield chunk
        if chunks.include_usage:
            yield chunks.usage()
        yield ServerSentEvent("[DONE]")
        finished = True
        ctx.outcome(route, "completed")
    except EdgeError as error:
        finished = True
        ctx.outcome(route, "upstream_error")
        yield ServerSentEvent(_json(error.openai_body()))
    finally:
        ctx.metrics.active.dec()
        call.cancel()
        if not finished:
            ctx.outcome(route, "client_disconnected")
        log.info(
            "edge.stream",
            request_id=call.request_id,
            route=route,
            choices=len(call.upstreams),
            outcome="completed" if finished else "client_disconnected",
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )


def _chunk(shape: _Shape, choices: list[dict[str, Any]], include_usage: bool) -> ServerSentEvent:
    body = shape.envelope(choices, chunk=True)
    if include_usage:
        body["usage"] = None
    return ServerSentEvent(_json(body))


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


async def completions(request: Request) -> Response:
    return await _respond(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await _respond(request, chat=True)


async def models(request: Request) -> Response:
    """The served model, then each configured alias of it."""
    ctx = EdgeContext.of(request)
    info = await ctx.upstream.model_info()
    cards = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "tokenwire",
            "root": info.model,
            "max_model_len": info.context_length,
        }
        for name in dict.fromkeys((info.model, *ctx.settings.model_aliases))
    ]
    return JSONResponse({"object": "list", "data": cards})
