"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

Streaming follows OpenAI's chunk format: content deltas, then a chunk with an empty delta and
the finish_reason, then (with stream_options.include_usage) a chunk with `choices: []` and
`usage`, then `data: [DONE]`. A client disconnect cancels the upstream call at once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenwire.client.client import Completion, GenerateOptions, Token, Usage, event_from_pb
from tokenwire.edge.body import Fields, read_json
from tokenwire.edge.context import EdgeContext, request_id_of
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.upstream import UpstreamStream

# Used when the model ships no chat template: role-tagged turns, then the assistant's turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
log = structlog.get_logger("tokenwire.edge")
FINISH = {"stop": "stop", "stop_sequence": "stop", "length": "length"}
_jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def _options(fields: Fields, request_id: str, *, chat: bool) -> GenerateOptions:
    n = fields.integer("n", 1)
    if n != 1:
        raise EdgeError.invalid("n", "only n=1 is supported")
    max_tokens = fields.integer("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = fields.integer("max_tokens", 0)
    logprobs = fields.boolean("logprobs") if chat else (fields.integer("logprobs") or 0) > 0
    return GenerateOptions(
        max_tokens=max_tokens or 0,
        temperature=fields.number("temperature"),
        top_p=fields.number("top_p"),
        seed=fields.integer("seed"),
        stop=fields.strings("stop"),
        logprobs=logprobs,
        request_id=request_id,
        # A rendered chat template already holds the special tokens (BOS) the model expects.
        add_special_tokens=False if chat else None,
    )


def _completion_prompt(fields: Fields) -> str:
    prompt = fields.raw("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if not isinstance(prompt, str):
        raise EdgeError.invalid("prompt", "must be a string (or a list of one string)")
    return prompt


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if all(isinstance(p, str) for p in parts):
            return "".join(str(p) for p in parts)
    raise EdgeError.invalid(f"messages[{index}].content", "must be a string or text parts")


async def _chat_prompt(fields: Fields, ctx: EdgeContext) -> str:
    messages = fields.raw("messages")
    if not isinstance(messages, list) or not messages:
        raise EdgeError.invalid("messages", "must be a non-empty list")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise EdgeError.invalid(f"messages[{i}]", "must be an object with a string role")
        turns.append({"role": m["role"], "content": _content_text(m.get("content"), i)})
    info = await ctx.upstream.model_info()
    template = info.chat_template or DEFAULT_CHAT_TEMPLATE
    try:
        rendered = _jinja.from_string(template).render(
            messages=turns,
            add_generation_prompt=True,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
        )
    except TemplateError as exc:
        # Model templates refuse some conversations (roles not alternating, ...).
        raise EdgeError.invalid(
            "messages", f"the model's chat template refused them: {exc}"
        ) from None
    return str(rendered)


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

    def delta(self, token: Token | None, finish: str | None, first: bool) -> dict[str, Any]:
        text = token.text if token else ""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
            if token is not None and not first:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if token is not None and token.logprob is not None:
            choice["logprobs"] = _logprobs([token], chat=self.chat)
        return choice


def _logprobs(tokens: list[Token], *, chat: bool) -> dict[str, Any]:
    if chat:
        content = [
            {
                "token": t.text,
                "logprob": t.logprob,
                "bytes": list(t.text.encode()),
                "top_logprobs": [],
            }
            for t in tokens
        ]
        return {"content": content}
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens]}


def _usage(usage: Usage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


async def _begin(
    request: Request, *, chat: bool
) -> tuple[EdgeContext, Fields, UpstreamStream, _Shape, bool]:
    ctx = EdgeContext.of(request)
    fields = Fields(await read_json(request, ctx.settings.max_body_bytes))
    fields.string("model")
    request_id = request_id_of(request, "")
    prompt = await _chat_prompt(fields, ctx) if chat else _completion_prompt(fields)
    options = _options(fields, request_id, chat=chat)
    stream_options = fields.raw("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise EdgeError.invalid("stream_options", "must be an object")
    include_usage = bool(stream_options.get("include_usage", False))
    streaming = fields.boolean("stream")
    model = (await ctx.upstream.model_info()).model
    upstream = await ctx.upstream.open(options.to_pb(prompt), request_id)
    return (
        ctx,
        fields,
        upstream,
        _Shape(chat, upstream.request_id, model),
        streaming and include_usage,
    )


async def _respond(request: Request, *, chat: bool) -> Response:
    route = "chat" if chat else "completions"
    ctx, fields, upstream, shape, include_usage = await _begin(request, chat=chat)
    headers = {"X-Request-ID": upstream.request_id}
    if fields.boolean("stream"):
        body = _stream(ctx, route, upstream, shape, include_usage)
        return EventSourceResponse(
            body, headers={"Cache-Control": "no-cache", **headers}, ping=ctx.settings.ping_s
        )
    return JSONResponse(await _whole(ctx, route, upstream, shape), headers=headers)


async def _whole(
    ctx: EdgeContext, route: str, upstream: UpstreamStream, shape: _Shape
) -> dict[str, Any]:
    tokens: list[Token] = []
    usage: Usage | None = None
    finish = "stop"
    try:
        async for message in upstream.messages():
            event = event_from_pb(message)
            if isinstance(event, Token):
                tokens.append(event)
            elif isinstance(event, Usage):
                usage = event
            elif isinstance(event, Completion):
                finish = FINISH.get(event.finish_reason, event.finish_reason)
    finally:
        upstream.cancel()
    text = "".join(t.text for t in tokens)
    logprobs = (
        _logprobs(tokens, chat=shape.chat) if any(t.logprob is not None for t in tokens) else None
    )
    if shape.chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    choice |= {"logprobs": logprobs, "finish_reason": finish}
    ctx.outcome(route, "completed")
    return shape.envelope([choice], chunk=False) | {"usage": _usage(usage)}


async def _stream(
    ctx: EdgeContext, route: str, upstream: UpstreamStream, shape: _Shape, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    started = time.perf_counter()
    first = True
    usage: Usage | None = None
    finished = False
    ctx.metrics.active.inc()
    try:
        async for message in upstream.messages():
            event = event_from_pb(message)
            if isinstance(event, Token):
                if first:
                    ctx.observe_ttft(route, time.perf_counter() - started)
                yield _chunk(shape, [shape.delta(event, None, first)], include_usage)
                first = False
            elif isinstance(event, Usage):
                usage = event
            elif isinstance(event, Completion):
                finish = FINISH.get(event.finish_reason, event.finish_reason)
                yield _chunk(shape, [shape.delta(None, finish, first)], include_usage)
        if include_usage:
            yield ServerSentEvent(_json(shape.envelope([], chunk=True) | {"usage": _usage(usage)}))
        yield ServerSentEvent("[DONE]")
        finished = True
        ctx.outcome(route, "completed")
    except EdgeError as error:
        finished = True
        ctx.outcome(route, "upstream_error")
        yield ServerSentEvent(_json(error.openai_body()))
    finally:
        ctx.metrics.active.dec()
        if not finished:
            upstream.cancel()
            ctx.outcome(route, "client_disconnected")
        log.info(
            "edge.stream",
            request_id=upstream.request_id,
            route=route,
            outcome="completed" if finished else "client_disconnected",
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )


def _chunk(shape: _Shape, choices: list[dict[str, Any]], include_usage: bool) -> ServerSentEvent:
    body = shape.envelope(choices, chunk=True)
    if include_usage:
        body["usage"] = None
    return ServerSentEvent(_json(body))


def _json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, separators=(",", ":"))


async def completions(request: Request) -> Response:
    return await _respond(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await _respond(request, chat=True)


async def models(request: Request) -> Response:
    info = await EdgeContext.of(request).upstream.model_info()
    card = {
        "id": info.model,
        "object": "model",
        "created": 0,
        "owned_by": "tokenwire",
        "max_model_len": info.context_length,
    }
    return JSONResponse({"object": "list", "data": [card]})
