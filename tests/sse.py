"""Reading an edge's SSE streams in tests."""

from __future__ import annotations

from typing import Any

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse


async def events(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> tuple[httpx.Response, list[ServerSentEvent]]:
    """The response and every event of one stream (a new one or a resume)."""
    async with aconnect_sse(client, method, url, **kwargs) as source:
        return source.response, [e async for e in source.aiter_sse()]


async def first_event(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> ServerSentEvent:
    """The first event of a stream (a new one or a resume), leaving it then."""
    async with aconnect_sse(client, method, url, **kwargs) as source:
        async for event in source.aiter_sse():
            return event
    raise AssertionError("the stream sent no event")
