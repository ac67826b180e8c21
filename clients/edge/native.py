"""Native SSE API: /v1/generate (POST and EventSource GET), resume, cancel.

The stream goes through the edge pipeline (tokenwire.edge.pipeline) and is kept in the resume
store in the native format (tokenwire.edge.native_format); every reader, the first one and each
resume, relays it from there.
"""

from __future__ import annotations

import urllib.parse

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenwire.client.messages import GenerateOptions
from tokenwire.edge.accounting import Account
from tokenwire.edge.body import Fields, read_json
from tokenwire.edge.context import EdgeContext, Opening, request_id_of, valid_request_id
from tokenwire.edge.errors import EdgeError, as_request_errors
from tokenwire.edge.guards import principal_of
from tokenwire.edge.native_format import native_frames
from tokenwire.edge.pipeline import open_generations, relay, sse_response
from tokenwire.edge.resumable import events_dropped, parse_event_id
from tokenwire.edge.store import StoredStream

# GenerateRequest's fields under their own names (sampling's flattened), all honoured; any
# other field is a 400 naming it, never silently dropped. Not offered: continuation_ids and
# retry (the edge continues and retries broken streams itself, and clients resume with
# Last-Event-ID).
# `last_event_id` is the query's resume parameter (EventSource cannot set headers).
FIELDS = frozenset(
    {
        "prompt",
        "prompt_ids",
        "add_special_tokens",
        "max_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "min_tokens",
        "logprobs",
        "top_logprobs",
        "request_id",
    }
)
QUERY_FIELDS = FIELDS | {"last_event_id"}
UNADDRESSABLE = frozenset({".", "..", ""})
"""Path segments no URL can keep (clients and proxies resolve `.` and `..`, and merge the empty
segment of `//`): an id with one among its `/`-separated segments is refused for a native
stream, which the events and cancel routes address by its id (`x/.` would name stream `x`)."""


def addressable(request_id: str) -> bool:
    """Whether a URL path can name the id as it is (see UNADDRESSABLE)."""
    return not UNADDRESSABLE.intersection(request_id.split("/"))


def options_from(
    fields: Fields, request_id: str, known: frozenset[str] = FIELDS
) -> GenerateOptions:
    for name in fields.names():
        if name not in known and fields.raw(name) is not None:
            raise EdgeError.invalid(name, "unrecognized request argument", "unknown_parameter")
    with as_request_errors():
        return GenerateOptions(
            max_tokens=fields.integer("max_tokens", 0) or 0,
            temperature=fields.number("temperature"),
            top_k=fields.top_k(),
            top_p=fields.number("top_p"),
            min_p=fields.number("min_p"),
            repetition_penalty=fields.number("repetition_penalty"),
            presence_penalty=fields.number("presence_penalty"),
            frequency_penalty=fields.number("frequency_penalty"),
            logit_bias=fields.token_biases("logit_bias"),
            seed=fields.seed(),
            stop=fields.strings("stop"),
            stop_token_ids=fields.token_ids("stop_token_ids"),
            ignore_eos=fields.boolean("ignore_eos"),
            min_tokens=fields.integer("min_tokens", 0) or 0,
            logprobs=fields.boolean("logprobs"),
            top_logprobs=fields.integer("top_logprobs", 0) or 0,
            prompt_ids=fields.token_ids("prompt_ids"),
            add_special_tokens=(
                fields.boolean("add_special_tokens") if fields.has("add_special_tokens") else None
            ),
            request_id=request_id,
        )


def _sse(request: Request, stream: StoredStream, after: int, *, timed: bool) -> Response:
    """The stored stream after seq `after` as the response; `timed` (TTFT observed) only for
    the request that started it: a resume or replay, from seq 0 too, is not a first token."""
    ctx = EdgeContext.of(request)
    account = Account.of(request)
    account.request_id = stream.request_id
    account.details["resumed_after"] = after
    events = relay(account, native_frames(stream, after), timed=timed)
    return sse_response(events, stream.request_id, ctx.settings.ping_s)


async def _check_resume(stream: StoredStream, seq: int) -> bool:
    """Refuse, before the response starts, a resume that could not replay exactly the events
    after `seq`: 410 when the buffer dropped some of them, 400 when `seq` is past the newest
    event (no event with it was ever sent). The query's `last_event_id` is the same field.
    True when `seq` is the event that ended the stream: nothing follows it."""
    first, last, ended = await stream.bounds()
    if seq > last:
        raise EdgeError.invalid(
            "Last-Event-ID", f"seq {seq} is past the stream's last event ({last})"
        )
    if seq + 1 < first:
        raise events_dropped(seq)
    return ended and seq == last


async def _resume(
    request: Request, ctx: EdgeContext, last_event_id: str, *, replay: bool = False
) -> Response:
    """A resume after the event `last_event_id` names, or with `replay` the whole stream."""
    account = Account.of(request)
    request_id, seq = parse_event_id(last_event_id)
    if not valid_request_id(request_id):
        # No stream has such an id: say why, without echoing what may be kilobytes of it.
        raise EdgeError.invalid(
            "Last-Event-ID", "its request id must follow the request_id rule (docs/api.md)"
        )
    account.request_id = request_id
    stream = await ctx.streams.get(request_id, principal_of(request.scope))
    try:
        ended = await _check_resume(stream, seq)
    except BaseException:
        stream.leave_unread()
        raise
    if ended:
        # The reader has every event: 204 is what stops an EventSource's reconnecting.
        stream.leave_unread()
        return Response(status_code=204)
    if stream.followers == 0 and not replay:
        account.resumed()
    return _sse(request, stream, seq, timed=False)


async def _start(
    request: Request, ctx: EdgeContext, fields: Fields, known: frozenset[str] = FIELDS
) -> Response:
    account = Account.of(request)
    prompt = fields.string("prompt")
    request_id = account.request_id = request_id_of(request, fields.string("request_id"))
    if not addressable(request_id):
        raise EdgeError.invalid(
            "request_id",
            "may not hold '.', '..' or an empty segment between '/' (URL paths resolve them)",
        )
    options = options_from(fields, request_id, known)
    owner = principal_of(request.scope)
    await ctx.streams.claim(request_id, owner)
    # A cancel that comes while the server is still opening the stream is kept here.
    opening = ctx.opening[request_id] = Opening(owner)
    # A client that leaves while the stream opens cancels it, unless streams are kept for a
    # resume after a disconnect (the client may come back for it by its id).
    watched = request if ctx.settings.resume_window_s == 0 else None
    try:
        try:
            [upstream] = await open_generations(
                watched, ctx.upstream, [prompt], [options], route=account.route, owner=owner
            )
        except EdgeError as error:
            raise error.renamed(fields.as_sent()) from None  # one stop string is `stop`
        stream = await ctx.streams.open(upstream, request_id, owner)
    finally:
        del ctx.opening[request_id]
        await ctx.streams.release(request_id)
    if opening.cancelled:
        await ctx.streams.cancel(request_id, owner)
    return _sse(request, stream, 0, timed=True)


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
    """One route for both methods, so a wrong method's 405 names both in `Allow` (HEAD is one:
    it would start a generation nothing reads)."""
    if request.method == "POST":
        return await generate_post(request)
    return await generate_get(request)


async def generate_get(request: Request) -> Response:
    """EventSource entry point; its automatic reconnect sends Last-Event-ID to the same URL."""
    ctx = EdgeContext.of(request)
    last = _last_event_id(request)
    if last:
        return await _resume(request, ctx, last)
    # A repeated parameter stays a list: `stop` takes one (?stop=a&stop=b), any other field
    # refuses it, where keeping one of the values would drop the others silently.
    values = _query(request.scope["query_string"])
    query = {name: found[0] if len(found) == 1 else found for name, found in values.items()}
    return await _start(request, ctx, Fields(query, from_query=True), QUERY_FIELDS)


def _query(raw: bytes) -> dict[str, list[str]]:
    """The query's parameters, each with its values in order; a 400 naming the parameter
    whose percent-decoded bytes are not UTF-8 (a body's bytes must be, and a query is the
    same request), where decoding them would put U+FFFD in its place silently."""
    values: dict[str, list[str]] = {}
    for pair in raw.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        decoded = []
        for part in (name, value):
            try:
                decoded.append(urllib.parse.unquote_to_bytes(part.replace(b"+", b" ")).decode())
            except UnicodeDecodeError:
                field = urllib.parse.unquote(name.decode("latin-1"), errors="replace")
                raise EdgeError.invalid(field, "must be UTF-8 (percent-encoded)") from None
        values.setdefault(decoded[0], []).append(decoded[1])
    return values


async def resume(request: Request) -> Response:
    """GET /v1/generate/{request_id}/events with Last-Event-ID (or ?last_event_id=); without
    one, a replay of the whole stream."""
    ctx = EdgeContext.of(request)
    request_id = request.path_params["request_id"]
    last = _last_event_id(request)
    if not last:
        return await _resume(request, ctx, f"{request_id}:0", replay=True)
    if parse_event_id(last)[0] != request_id:
        raise EdgeError.invalid("Last-Event-ID", "must name the same request id as the path")
    return await _resume(request, ctx, last)


async def cancel(request: Request) -> Response:
    """POST /v1/generate/{request_id}/cancel: only the stream's own caller can cancel it;
    `cancelled` says whether it was still running (a stream that had ended stays as it was)."""
    ctx = EdgeContext.of(request)
    request_id = request.path_params["request_id"]
    owner = principal_of(request.scope)
    opening = ctx.opening.get(request_id)
    if opening is not None and opening.owner == owner:
        # Still opening: the stream is cancelled as soon as it opens (its readers get `usage`
        # and `done` / cancelled, and the server stops it).
        opening.cancelled = True
        return JSONResponse({"request_id": request_id, "cancelled": True})
    cancelled = await ctx.streams.cancel(request_id, owner)
    return JSONResponse({"request_id": request_id, "cancelled": cancelled})
