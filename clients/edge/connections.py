"""The edge's bounds on its HTTP connections, which the server's protocol (tokenwire.edge.server)
applies to each one: how many are served at once, what the open-files limit leaves room for,
and one log line per interval for what a flood of clients could otherwise log thousands of
times a second.

At start the edge raises its soft open-files limit to the hard one, and serves at most
`max_connections` connections, lowered where that many (plus PROBE_ROOM and FD_RESERVE) would
not fit under the limit: an accept that fails for want of a file descriptor is what asyncio
answers with a traceback per try, and what leaves every other client waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import structlog
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from tokenwire.edge.errors import EdgeError

log = structlog.get_logger("tokenwire.edge")

FD_RESERVE = 64
"""Open files the edge needs besides its HTTP connections: the listening socket, the event
loop's own, the gRPC channels, the OTLP exporter, static files being sent."""
STORE_RESERVE = 64
"""Open files kept, with a Redis resume store, for its writers' connections (generations and
their leases, which never wait behind readers)."""
PROBE_ROOM = 16
"""Connections accepted beyond `max_connections`, so that health probes (which open a
connection each) are still answered when the cap is reached; beyond them a connection is
closed at once, so the cap bounds the edge's file descriptors too."""
PROBES = frozenset({"/healthz", "/readyz"})
LOG_INTERVAL_S = 10.0
ACCEPT_FAILED = "socket.accept() out of system resource"
"""What asyncio's selector loop reports for an accept that fails with EMFILE, ENFILE, ENOBUFS
or ENOMEM: up to `backlog` times per wake-up, each time with a traceback."""

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class Tally:
    """A log line for an event that may come thousands of times a second: the first one at
    once, then at most one per LOG_INTERVAL_S, each with how many came since the last line."""

    def __init__(self, event: str) -> None:
        self.event = event
        self.since = 0
        self._next = 0.0

    def count(self, **fields: object) -> None:
        self.since += 1
        now = time.monotonic()
        if now >= self._next:
            log.warning(self.event, count=self.since, interval_s=LOG_INTERVAL_S, **fields)
            self.since = 0
            self._next = now + LOG_INTERVAL_S


@dataclasses.dataclass
class ConnectionLimits:
    """One edge's bounds on its connections, which its protocol reads for each one."""

    max_connections: int
    """Connections served at once (settled at start: see connection_cap)."""
    send_timeout_s: float
    """A connection whose client takes no data for this long, with data waiting, is cut."""
    over_capacity: Tally = dataclasses.field(
        default_factory=lambda: Tally("edge.connections_over_capacity")
    )
    stalled: Tally = dataclasses.field(default_factory=lambda: Tally("edge.clients_stalled"))


@dataclasses.dataclass(frozen=True, slots=True)
class OpenFiles:
    """RLIMIT_NOFILE: the soft limit before and after raising it, and the hard one."""

    soft_was: int
    soft: int
    hard: int


def raise_open_files_limit() -> OpenFiles:
    """Raise the soft open-files limit to the hard one (an unprivileged process may); where the
    hard limit is unlimited or cannot be reached, the soft one stays."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if resource.RLIM_INFINITY in (hard, soft) or soft >= hard:
        return OpenFiles(soft, soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return OpenFiles(soft, soft, hard)
    return OpenFiles(soft, hard, hard)


def connection_cap(configured: int, open_files: int, *, resume_store: bool = False) -> int:
    """`configured`, lowered so that that many connections, PROBE_ROOM and FD_RESERVE fit in
    `open_files`; at least 1. With a Redis resume store each connection counts twice (a stream
    read here holds a Redis connection while it waits for events) and STORE_RESERVE more are
    kept for the store's writers."""
    if open_files == resource.RLIM_INFINITY:
        return configured
    reserve = FD_RESERVE + PROBE_ROOM + (STORE_RESERVE if resume_store else 0)
    room = (open_files - reserve) // (2 if resume_store else 1)
    return max(1, min(configured, room))


async def over_capacity(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer to a request beyond the cap: 503 in the route's error shape, the connection
    then closed (the client retries on a new one, when others have gone)."""
    error = EdgeError(
        503, "UNAVAILABLE", "the edge has too many connections; retry", retry_after_s=1
    )
    headers = {**error.headers(), "Connection": "close", "X-Content-Type-Options": "nosniff"}
    body = error.body_for(str(scope.get("path", "")))
    await JSONResponse(body, status_code=503, headers=headers)(scope, receive, send)


def closing(send: Send, when: Callable[[], bool] | None = None) -> Send:
    """`send`, with `Connection: close` added to the response's head (with `when`, where it
    holds as the head is sent), unless the head says so already."""

    async def send_closing(message: Message) -> None:
        if message["type"] == "http.response.start" and (when is None or when()):
            headers = list(message.get("headers", ()))
            if (b"connection", b"close") not in ((k.lower(), v.lower()) for k, v in headers):
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return send_closing


class AcceptErrors:
    """The event loop's exception handler, but accepts that fail for want of a file descriptor
    are counted into one `edge.accept_failed` line per interval, not a traceback each."""

    def __init__(self, previous: ExceptionHandler | None) -> None:
        self.previous = previous
        self.tally = Tally("edge.accept_failed")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_FAILED:
            self.tally.count(reason=str(context.get("exception")))
        elif self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


LOST_WRITE = "socket.send() raised exception."
"""What asyncio's transport logs for each write after its connection broke, until the
protocol hears of the loss: a stream replayed to a client that left writes its buffered events
in one go, one warning each, hundreds for one caller's disconnect."""


class LostWrites(logging.Filter):
    """Drops asyncio's LOST_WRITE warnings: the stream's end is logged once as a disconnect
    (`edge.stream`, outcome client_disconnected) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != LOST_WRITE


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Install AcceptErrors on `loop` (once: several edges may share a loop, as tests do), and
    LostWrites on asyncio's logger (once)."""
    handler = loop.get_exception_handler()
    if not isinstance(handler, AcceptErrors):
        loop.set_exception_handler(AcceptErrors(handler))
    quieted = logging.getLogger("asyncio")
    if not any(isinstance(f, LostWrites) for f in quieted.filters):
        quieted.addFilter(LostWrites())
