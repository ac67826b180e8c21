"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

A request with `n` choices runs `n` upstream generations through the edge pipeline
(tokenwire.edge.pipeline); a stream is encoded by tokenwire.edge.openai_stream, a whole
response shaped by tokenwire.edge.openai_format. A client disconnect cancels every upstream
call at once, streamed or not.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenwire.edge.accounting import Account, failed
from tokenwire.edge.body import Fields, read_json
from tokenwire.edge.context import EdgeContext, request_id_of, unique_id
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.guards import principal_of
from tokenwire.edge.metrics import Outcome
from tokenwire.edge.openai_format import Collected, Shape, openai_error, usage
from tokenwire.edge.openai_prompts import check_generations
from tokenwire.edge.openai_request import (
    OpenAIRequest,
    chat_turns,
    check_max_tokens,
    check_model,
    model_not_found,
    read_request,
)
from tokenwire.edge.openai_stream import openai_frames
from tokenwire.edge.openai_template import chat_prompt
from tokenwire.edge.pipeline import (
    merged,
    open_generations,
    relay,
    sse_response,
    unless_client_leaves,
)
from tokenwire.edge.upstream import UpstreamStream


@dataclasses.dataclass
class _Call:
    """An accepted OpenAI request: its upstream generations, one per choice."""

    ctx: EdgeContext
    account: Account
    request_id: str
    request: OpenAIRequest
    upstreams: list[UpstreamStream]
    shape: Shape


async def _begin(request: Request, *, chat: bool) -> _Call:
    ctx = EdgeContext.of(request)
    account = Account.of(request)
    fields = Fields(await read_json(request, ctx.settings.max_body_bytes))
    request_id = account.request_id = request_id_of(request, "")
    try:
        turns = chat_turns(fields) if chat else None
        parsed = read_request(fields, request_id, chat=chat)
    except EdgeError:
        unknown = await _unknown_model(ctx, fields)
        if unknown is None:
            raise
        raise unknown from None
    info = await ctx.upstream.model_info()
    parsed = parsed.for_model(info)
    check_model(parsed.model, info, ctx.settings.model_aliases)
    check_max_tokens(parsed, info)
    check_generations(parsed.n, len(parsed.choices), info)
    prompts = parsed.prompts(chat_prompt(turns, info) if turns is not None else "")
    owner = principal_of(request.scope)
    try:
        try:
            upstreams = await open_generations(
                request, ctx.upstream, prompts, parsed.choices, route=account.route, owner=owner
            )
        except EdgeError as error:
            if error.param != "request_id":
                raise
            # Another request of the caller's runs under this id (a proxy that gives calls
            # made in parallel one X-Request-ID). These routes address no stream by its id,
            # so this one runs under the id made unique rather than being refused.
            request_id = account.request_id = unique_id(request_id)
            parsed = read_request(fields, request_id, chat=chat).for_model(info)
            upstreams = await open_generations(
                request, ctx.upstream, prompts, parsed.choices, route=account.route, owner=owner
            )
    except EdgeError as error:
        raise openai_error(error.renamed(parsed.names_for(error.generation))) from None
    # One generation keeps the id the server settled on; several share the caller's.
    base_id = account.request_id = upstreams[0].request_id if len(upstreams) == 1 else request_id
    account.details["choices"] = len(upstreams)
    shape = Shape(chat, base_id, info.model)
    return _Call(ctx, account, base_id, parsed, upstreams, shape)


async def _unknown_model(ctx: EdgeContext, fields: Fields) -> EdgeError | None:
    """The 404 of a request that names a model this edge does not serve, which comes before
    what else is wrong with it, as at OpenAI (whose rules for a field are the named model's);
    None where the model is served, named by no string, or not known yet: a refusal waits for
    no server (the served model is asked once, by the first request that gets that far)."""
    model = fields.raw("model")
    info = ctx.upstream.known_model_info
    if not isinstance(model, str) or not model or info is None:
        return None
    try:
        check_model(model, info, ctx.settings.model_aliases)
    except EdgeError as error:
        return error if error.openai_code == "model_not_found" else None
    return None


async def _respond(request: Request, *, chat: bool) -> Response:
    call = await _begin(request, chat=chat)
    if call.request.stream:
        frames = openai_frames(
            call.shape, call.upstreams, call.request.include_usage, call.request.n
        )
        events = relay(call.account, frames, timed=True)
        return sse_response(events, call.request_id, call.ctx.settings.ping_s)
    whole = await unless_client_leaves(request, _whole(call))
    return JSONResponse(whole, headers={"X-Request-ID": call.request_id})


async def _whole(call: _Call) -> dict[str, Any]:
    """Every choice collected into one response. An upstream failure, or a choice cut short
    (a deadline: 504, a cancel: 503), is the request's error, as a stream's error chunk says."""
    results = [Collected() for _ in call.upstreams]
    try:
        async with contextlib.aclosing(merged(call.upstreams)) as events:
            async for index, event in events:
                results[index].see(event)
    except EdgeError as error:
        error = openai_error(error)
        call.account.end(failed(error.code))
        raise error from None
    finally:
        for upstream in call.upstreams:
            upstream.cancel()
    call.account.end(Outcome.COMPLETED)
    choices = [call.shape.whole(i, result) for i, result in enumerate(results)]
    body = call.shape.envelope(choices, chunk=False)
    return body | {"usage": usage([r.usage for r in results], call.request.n)}


async def completions(request: Request) -> Response:
    return await _respond(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await _respond(request, chat=True)


async def _model_cards(request: Request) -> list[dict[str, Any]]:
    """The served model, then each configured alias of it."""
    ctx = EdgeContext.of(request)
    info = await ctx.upstream.model_info()
    return [
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


async def models(request: Request) -> Response:
    """GET /v1/models: the served model, then each configured alias of it."""
    return JSONResponse({"object": "list", "data": await _model_cards(request)})


async def model(request: Request) -> Response:
    """GET /v1/models/{model}: that card, or 404 model_not_found."""
    name = request.path_params["model"]
    cards = await _model_cards(request)
    for card in cards:
        if card["id"] == name:
            return JSONResponse(card)
    raise model_not_found(name, cards[0]["root"])
