"""vLLM's token routes, `POST /tokenize` and `POST /detokenize` (and the same under /v1/), over
the server's Tokenize and Detokenize.

A chat's `messages` are rendered with the model's chat template exactly as /v1/chat/completions
renders them, and tokenized as that route's prompt is (no special tokens added: the template
holds them), so /tokenize counts what that route's `usage.prompt_tokens` counts. Errors are
OpenAI error bodies naming the field as the request did. Neither route serves a stream, so
neither counts in the edge's metrics nor writes an `edge.stream` line.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenwire.client.messages import ModelInfo
from tokenwire.edge.body import Fields, read_json
from tokenwire.edge.context import EdgeContext
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.openai_request import chat_turns, check_model
from tokenwire.edge.openai_template import chat_prompt
from tokenwire.v1 import generate_pb2 as pb

TOKENIZE_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "messages",
        "add_special_tokens",
        "add_generation_prompt",
        "return_token_strs",
    }
)
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})

Reply = TypeVar("Reply")


async def tokenize(request: Request) -> Response:
    """`{"count", "max_model_len", "tokens"}` for a `prompt` or a chat's `messages`, with
    `token_strs` (each token's own text) where `return_token_strs` asks for them."""
    ctx, fields, info = await _read(request, TOKENIZE_FIELDS)
    text, add_special_tokens, field = _text(fields, info)
    with_pieces = fields.boolean("return_token_strs")
    asked = pb.TokenizeRequest(
        text=text, add_special_tokens=add_special_tokens, with_pieces=with_pieces
    )
    reply = await _named(ctx.upstream.tokenize(asked), {"text": field})
    body: dict[str, Any] = {
        "count": len(reply.token_ids),
        "max_model_len": reply.context_length,
        "tokens": list(reply.token_ids),
    }
    if with_pieces:
        body["token_strs"] = list(reply.pieces)
    return JSONResponse(body)


async def detokenize(request: Request) -> Response:
    """`{"prompt"}`: the text of `tokens`, special tokens' text included, as vLLM answers."""
    ctx, fields, _ = await _read(request, DETOKENIZE_FIELDS)
    if fields.raw("tokens") is None:
        raise EdgeError.invalid("tokens", "must be a list of token ids")
    asked = pb.DetokenizeRequest(token_ids=fields.token_ids("tokens"))
    reply = await _named(ctx.upstream.detokenize(asked), {"token_ids": "tokens"})
    return JSONResponse({"prompt": reply.text})


async def _read(request: Request, known: frozenset[str]) -> tuple[EdgeContext, Fields, ModelInfo]:
    """The body's fields, each one the route reads (a field it does not is a 400 naming it,
    null aside), and the served model, which `model` must name where it is given."""
    ctx = EdgeContext.of(request)
    fields = Fields(await read_json(request, ctx.settings.max_body_bytes))
    for name in fields.names():
        if name not in known and fields.raw(name) is not None:
            raise EdgeError.invalid(
                name, "unrecognized request argument for this route", "unknown_parameter"
            )
    info = await ctx.upstream.model_info()
    check_model(fields.string("model"), info, ctx.settings.model_aliases)
    return ctx, fields, info


def _text(fields: Fields, info: ModelInfo) -> tuple[str, bool, str]:
    """The text to tokenize, whether special tokens are added to it, and the field it came
    from: a `prompt` as sent (special tokens added unless add_special_tokens is false), or the
    `messages` as the chat route renders them (none added unless add_special_tokens is true,
    or the model has no chat template: see OpenAIRequest.for_model)."""
    if fields.has("messages"):
        if fields.has("prompt"):
            raise EdgeError.invalid("prompt", "give prompt or messages, not both")
        turns = chat_turns(fields)
        generation = fields.boolean("add_generation_prompt", True)
        text = chat_prompt(turns, info, add_generation_prompt=generation)
        default = not info.chat_template
        return text, fields.boolean("add_special_tokens", default), "messages"
    if fields.has("add_generation_prompt"):
        raise EdgeError.invalid("add_generation_prompt", "is read only with messages")
    if not fields.has("prompt"):
        raise EdgeError.invalid("prompt", "give a prompt (a string) or messages")
    return fields.string("prompt"), fields.boolean("add_special_tokens", True), "prompt"


async def _named(call: Awaitable[Reply], names: dict[str, str]) -> Reply:
    """The upstream call's reply; its refusal names the field as the request did."""
    try:
        return await call
    except EdgeError as error:
        raise error.renamed(names) from None
