"""The one pipeline behind native SSE and OpenAI streams.

    HTTP request -> open_generations (Upstream: failover and continuation toward the servers)
                 -> events: Token | Usage | Completion, or an EdgeError (errors.edge_error)
                 -> an encoder: native (kept in the resume store for Last-Event-ID) or OpenAI
                 -> Frames -> relay (TTFT, active streams, the outcome, the events written)

An encoder turns the pipeline's events into SSE frames (`Frame`) or a JSON body; it knows the
format and nothing else. Only native streams are kept in the resume store: OpenAI clients have
no Last-Event-ID, so their events go from `merged` straight to their encoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request

from tokenwire.client.messages import GenerateOptions, StreamEvent
from tokenwire.edge.accounting import Account
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.metrics import Outcome, RouteName
from tokenwire.edge.upstream import Upstream, UpstreamStream

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_SEPARATOR = "\n"
"""The end of every line of an event stream, pings included: each event ends in a blank line,
"\\n\\n", as OpenAI's, vLLM's and llama.cpp's events do, which clients that split a stream on
"\\n\\n" need (EventSource and the browser page take any line end)."""

T = TypeVar("T")


class ClientLeft(Exception):
    """The HTTP client disconnected before its response began (answered 499, app.py)."""


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`; should the HTTP client disconnect first, `work` is cancelled
    (and awaited) and ClientLeft raised. The request's body has been read, so the next ASGI
    message is the client's disconnect (once disconnected, uvicorn answers every later
    receive with it too, so a response that begins after this still sees it)."""
    task = asyncio.ensure_future(work)
    # However this ends (the client gone, or this coroutine cancelled: the edge stopping), what
    # `work` ended with is retrieved, so asyncio logs no exception nobody read.
    task.add_done_callback(_retrieved)
    gone = asyncio.ensure_future(_disconnected(request))
    left = False
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            left = True
            task.cancel()
            await asyncio.wait({task})
    if left:
        raise ClientLeft
    return task.result()


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse_event(
    data: str, *, event: str | None = None, event_id: str | None = None
) -> ServerSentEvent:
    """One SSE event, its lines ended by SSE_SEPARATOR."""
    return ServerSentEvent(data, event=event, id=event_id, sep=SSE_SEPARATOR)


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    """One SSE event an encoder made, with what the relay needs to know about it."""

    event: ServerSentEvent
    token: bool = False
    """It carries a token (the first one, written, is the client's time to first token)."""
    outcome: Outcome | None = None
    """It ends the stream: completed, or upstream_error."""


async def open_generations(
    request: Request | None,
    upstream: Upstream,
    prompts: Sequence[str],
    choices: Sequence[GenerateOptions],
    *,
    route: RouteName,
    owner: str | None,
) -> list[UpstreamStream]:
    """Open one generation per choice, the choice's prompt beside it, for `owner`'s request on
    `route` (the label of its failovers); if any is refused, cancel the others and raise. A
    server may take a while to answer (it tokenizes a long prompt first): should the HTTP
    client of `request` leave meanwhile, every call is cancelled then and ClientLeft raised
    (None: the streams open whether or not their client is still there)."""
    opening = [
        asyncio.ensure_future(upstream.open(o.to_pb(p), o.request_id, route=route, owner=owner))
        for p, o in zip(prompts, choices, strict=True)
    ]
    gathered = asyncio.gather(*opening, return_exceptions=True)
    try:
        if request is None:
            results = await gathered
        else:
            results = await unless_client_leaves(request, gathered)
    except BaseException:
        # The calls still opening are cancelled; a stream that opened all the same (before the
        # cancel, or as it came) ends as its task does, even if this wait is cut short too.
        for task in opening:
            task.cancel()
            task.add_done_callback(_end_opened)
        await asyncio.wait(opening)
        raise
    opened = [r for r in results if isinstance(r, UpstreamStream)]
    for index, result in enumerate(results):
        if isinstance(result, BaseException):
            for stream in opened:
                stream.cancel()
            if isinstance(result, EdgeError):
                result.generation = index
            raise result
    return opened


def _end_opened(task: asyncio.Future[UpstreamStream]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().cancel()


HELD_PER_CHOICE = 4
"""Events per choice a merge holds for its reader (its queue holds HELD_PER_CHOICE * n). A call
that finds the queue full waits, so a reader that stops (an HTTP client that reads nothing)
stops taking events from its calls, and gRPC's flow control keeps the rest at the server,
whose per-request mailbox is bounded (max_tokens + 2 events) and whose decode loop never
waits for it."""


@dataclasses.dataclass(eq=False)
class Backlog:
    """How far one merge's upstream calls are ahead of its reader."""

    choices: int
    taken: int = 0
    """Events taken from the calls."""
    given: int = 0
    """Events given to the reader."""

    @property
    def held(self) -> int:
        """Events the merge holds: at most (HELD_PER_CHOICE + 1) * choices (the queue, and one
        in each waiting call's hand)."""
        return self.taken - self.given


BACKLOGS: weakref.WeakSet[Backlog] = weakref.WeakSet()
"""The backlog of every merge now running (what a test reads to see the bound kept)."""


async def merged(
    upstreams: Sequence[UpstreamStream],
) -> AsyncGenerator[tuple[int, StreamEvent], None]:
    """Every choice's events, as they arrive, tagged with the choice's index; the first
    choice's failure ends them all with its EdgeError. At most HELD_PER_CHOICE events per
    choice wait for the reader, and one more in each choice's hand."""
    queue: asyncio.Queue[tuple[int, StreamEvent | EdgeError | None]] = asyncio.Queue(
        maxsize=HELD_PER_CHOICE * len(upstreams)
    )
    backlog = Backlog(len(upstreams))
    BACKLOGS.add(backlog)

    async def pump(index: int, upstream: UpstreamStream) -> None:
        try:
            async for event in upstream.events():
                backlog.taken += 1
                await queue.put((index, event))
            await queue.put((index, None))
        except EdgeError as error:
            await queue.put((index, error))
        except asyncio.CancelledError:
            # The call was cancelled under us (the end of a drain's grace): say so in-band.
            # When it is this task that is cancelled, nobody reads the queue any more.
            task = asyncio.current_task()
            if task is not None and not task.cancelling():
                cancelled = EdgeError(499, "CANCELLED", "the generation was cancelled")
                await queue.put((index, cancelled))
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
                backlog.given += 1
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        BACKLOGS.discard(backlog)


async def relay(
    account: Account, frames: AsyncGenerator[Frame, None], *, timed: bool
) -> AsyncIterator[ServerSentEvent]:
    """The encoder's frames as SSE events, accounted: TTFT at the first token (when `timed`:
    the first delivery of a stream, never a resume or replay of it), the active-stream gauge,
    the events written and the outcome (client_disconnected when the client leaves first)."""
    account.stream_opened()
    try:
        async with contextlib.aclosing(frames):
            async for frame in frames:
                if frame.token and timed:
                    account.first_token()
                    timed = False
                account.events += 1
                yield frame.event
                if frame.outcome is not None:
                    account.end(frame.outcome)
    finally:
        account.stream_closed()


def sse_response(
    events: AsyncIterator[ServerSentEvent], request_id: str, ping_s: float
) -> EventSourceResponse:
    """The HTTP response of an event stream (native or OpenAI)."""
    headers = {**SSE_HEADERS, "X-Request-ID": request_id}
    return EventSourceResponse(events, headers=headers, ping=ping_s, sep=SSE_SEPARATOR)
