"""Run the edge under uvicorn and drain it on SIGTERM/SIGINT; `tokenwire edge` calls run_edge.

uvicorn's own signal handling is not used: on a signal it begins its shutdown at once, and
sse-starlette (which watches for it) ends every open event stream early. The edge drains
first instead, and only then tells uvicorn to exit:

1. `/readyz` turns 503 (load balancers stop sending), after `drain_notice_s` new API requests
   get 503 too; resumes and cancels of running streams still pass;
2. in-flight requests and streams still generating run to their end, up to `drain_grace_s`;
3. whatever is still running then is cancelled: native streams end with `done` / cancelled,
   OpenAI streams with an error chunk;
4. a second signal cuts steps 1 and 2 short: what is still running is cancelled at once;
5. uvicorn closes the connections and the app shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import h11
import structlog
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from tokenwire.common.settings import host_family, host_port, is_loopback
from tokenwire.edge.app import create_app
from tokenwire.edge.connections import (
    PROBE_ROOM,
    PROBES,
    ConnectionLimits,
    OpenFiles,
    closing,
    connection_cap,
    over_capacity,
    quiet_accept_errors,
    raise_open_files_limit,
)
from tokenwire.edge.context import EdgeContext
from tokenwire.edge.settings import EdgeSettings
from tokenwire.edge.tracing import Tracing

log = structlog.get_logger("tokenwire.edge")
# After the grace, cancelled streams still need a moment to write their last event.
CUT_WAIT_S = 2


HEAD_TIMEOUT_S = 10.0
"""How long a connection may take to send a whole request head (request line and headers):
one that connects and sends nothing, or trickles its headers, is closed then."""
LINGER_S = 5.0
"""How long a connection whose response went out before its request's body had arrived whole
still reads (and drops) that body before it closes: closing with the body unread would reset
the connection, which a client still sending can take before it reads the response (a 413
lost as a connection reset)."""


class _EdgeH11(H11Protocol):
    """h11 with the edge's bounds on each connection (`limits`, one edge's):

    - a deadline for each request head: from the connection's start, and from the end of each
      response on a kept-alive connection, a whole request head must arrive within
      HEAD_TIMEOUT_S or the connection is closed (uvicorn's keep-alive timer stops at the first
      byte, so a head trickled in, or a connection that sends nothing, could hold it open);
    - no keep-alive past a body left unread: a response that starts before its request's body
      has arrived whole (a probe, a 401, a 413 or 408, any route that answers without reading
      it) says `Connection: close`; once it is sent the connection stops sending (a FIN
      after the response), reads and drops what the client still sends for LINGER_S at most,
      then closes (as nginx's lingering close: closing at once, with the body unread, resets
      the connection, and a client still sending may lose the response). Kept open, the rest
      of that body could be trickled for ever, no deadline applying to it; a connection is
      thus always under one: its request head's, its body's (the routes that read one), its
      linger's, or its response's (the send timeout);
    - a send timeout: a client that takes no data for `send_timeout_s` while the edge has some
      for it is cut, unsent data dropped. Its stream then ends as a disconnect does (an OpenAI
      stream's upstream calls are cancelled), and nothing waits to flush to it: uvicorn's own
      close, after a response or an error, waits for the client to read what is left, which a
      client that reads nothing never does;
    - the connection cap: on a connection that opens while `max_connections` others are open,
      a health probe is answered and any other request gets 503, and the connection closes;
      one that opens beyond PROBE_ROOM more is closed as soon as it is accepted. Connections
      within the cap are served as before, whatever arrives after them.
    """

    limits: ClassVar[ConnectionLimits]
    _head_timer: asyncio.TimerHandle | None = None
    _stall_timer: asyncio.TimerHandle | None = None
    _linger_timer: asyncio.TimerHandle | None = None
    _unsent_at_watch = 0
    _over_cap = False

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._app = self.app
        self.app = self._admit

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _LingerOnClose(transport, self._body_unread, self._linger)
        # Counted as it opens: a connection beyond the cap stays beyond it.
        self._over_cap = len(self.connections) > self.limits.max_connections
        if len(self.connections) > self.limits.max_connections + PROBE_ROOM:
            self.limits.over_capacity.count(connections=len(self.connections), refused="accept")
            self._cut()
            return
        self._await_head()

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, for a request on a connection that opened within the cap; on one beyond
        it, a probe is answered and any other request refused, and the connection closes."""
        if not self._over_cap:
            await self._app(scope, receive, closing(send, when=self._body_unread))
        elif scope.get("path") in PROBES:
            await self._app(scope, receive, closing(send))
        else:
            self.limits.over_capacity.count(connections=len(self.connections), refused="request")
            await over_capacity(scope, receive, send)

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:
            return  # the rest of a body whose response went out: dropped
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._stop_head_timer()

    def _body_unread(self) -> bool:
        """Whether the request's body has yet to arrive whole (its response is starting)."""
        return self.conn.their_state is h11.SEND_BODY

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            if self.conn.their_state is h11.IDLE:
                self._await_head()
            elif self.cycle.response_complete:
                # No next request is being served, and the client is not waiting for one:
                # what it still sends has no deadline (a response that says close closes
                # before this).
                self.transport.close()
        if self.transport.get_write_buffer_size():
            self._watch_writes()  # from the response's last write

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_stall_timer()
        if self.transport.get_write_buffer_size():
            self._watch_writes()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_stall_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The edge is stopping: a connection that lingers closes at once, and none lingers
        from now on (uvicorn waits for every connection to close before it exits)."""
        if isinstance(self.transport, _LingerOnClose):
            self.transport.stop_lingering()
        super().shutdown()

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close a connection whose request's body is still arriving: its response goes out
        with a FIN after it, what the client still sends is read and dropped, and the
        connection closes once the client closes its side, or LINGER_S from now."""
        self._stop_head_timer()
        self._linger_timer = self.loop.call_later(LINGER_S, transport.close)
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _watch_writes(self) -> None:
        """Check the client's progress send_timeout_s from now (again, while data waits)."""
        self._stop_stall_timer()
        self._unsent_at_watch = self.transport.get_write_buffer_size()
        self._stall_timer = self.loop.call_later(self.limits.send_timeout_s, self._check_writes)

    def _stop_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _check_writes(self) -> None:
        """Cut a client that took no data since the watch began: nothing of the buffer went
        out while writing stayed paused (above its high-water mark: a resume would have
        stopped the watch) or the connection was closing. A client that takes some, however
        slowly (a large whole response over a slow link), is watched again."""
        self._stall_timer = None
        unsent = self.transport.get_write_buffer_size()
        stalled = unsent and unsent >= self._unsent_at_watch
        if stalled and (self.flow.write_paused or self.transport.is_closing()):
            self.limits.stalled.count(
                unsent_bytes=unsent, send_timeout_s=self.limits.send_timeout_s
            )
            self._cut()
        elif unsent:
            self._watch_writes()

    def _cut(self) -> None:
        """Close now, dropping unsent data (a reset, so the kernel holds nothing for it)."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self.transport.abort()


_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on with a 0 s timeout: close() resets the connection at once."""


def _never() -> bool:
    return False


class _LingerOnClose(asyncio.Transport):
    """A connection's transport whose close(), while `unread()` (the request's body is still
    arriving), hands the transport to `linger` instead (see _EdgeH11): uvicorn closes a
    connection whose response said `Connection: close` as soon as the response is written.
    Once closing or lingering it reports is_closing(), so nothing more is written."""

    def __init__(
        self,
        transport: asyncio.Transport,
        unread: Callable[[], bool],
        linger: Callable[[asyncio.Transport], None],
    ) -> None:
        super().__init__()
        self._transport = transport
        self._unread = unread
        self._lingering = False
        self._linger = linger

    def close(self) -> None:
        if self._lingering or self._transport.is_closing():
            return
        if self._unread():
            self._lingering = True
            self._linger(self._transport)
        else:
            self._transport.close()

    def stop_lingering(self) -> None:
        """Close without lingering from now on (the edge is stopping); a lingering connection
        closes at once."""
        self._unread = _never
        if self._lingering:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._lingering or self._transport.is_closing()

    def abort(self) -> None:
        self._transport.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self._transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


def _protocol_with(limits: ConnectionLimits) -> type[_EdgeH11]:
    """The protocol class bound to one edge's limits (a process may run several edges)."""

    class EdgeH11(_EdgeH11):
        pass

    EdgeH11.limits = limits
    return EdgeH11


class _Uvicorn(uvicorn.Server):
    """uvicorn without signal handlers: the edge drains before asking it to exit."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class EdgeServer:
    """A uvicorn server for the edge app; start() returns once it listens."""

    def __init__(self, settings: EdgeSettings, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings, tracing=tracing)
        self.limits = ConnectionLimits(settings.max_connections, settings.send_timeout_s)
        config = uvicorn.Config(
            self.app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            # No logging set-up of uvicorn's own: its loggers reach the edge's (common/logs.py).
            log_config=None,
            lifespan="on",
            access_log=False,
            timeout_graceful_shutdown=CUT_WAIT_S,
            http=_protocol_with(self.limits),
        )
        self.server = _Uvicorn(config)
        self.port = settings.port
        self._task: asyncio.Task[None] | None = None
        self._hurried = asyncio.Event()

    @property
    def ctx(self) -> EdgeContext:
        ctx = self.app.state.ctx
        assert isinstance(ctx, EdgeContext)
        return ctx

    async def start(self) -> int:
        files = self._bound_connections()
        # proto=IPPROTO_TCP matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets that
        # say so, and an SSE event held back by Nagle waits for a delayed ACK (~40 ms).
        family = host_family(self.settings.host)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.settings.host, self.settings.port))
            # A port another process listens on may still bind (SO_REUSEADDR): listening here
            # makes it fail now, as OSError, rather than inside uvicorn.
            sock.listen(self.server.config.backlog)
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        # Logged once listening: a port that cannot be had is the one line a failed start says.
        log.info(
            "edge.open_files",
            soft_was=files.soft_was,
            soft=files.soft,
            hard=files.hard,
            max_connections=self.limits.max_connections,
        )
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                await self._task
            await asyncio.sleep(0.01)
        return self.port

    def _bound_connections(self) -> OpenFiles:
        """Raise the open-files limit, settle max_connections under it (a warning where the
        setting is lowered), and quiet failed accepts; the limits, for start to log."""
        files = raise_open_files_limit()
        store = bool(self.settings.resume_store)
        cap = connection_cap(self.settings.max_connections, files.soft, resume_store=store)
        self.limits.max_connections = cap
        if cap < self.settings.max_connections:
            log.warning(
                "edge.max_connections_lowered",
                configured=self.settings.max_connections,
                max_connections=cap,
                open_files=files.soft,
                resume_store=store,
            )
        quiet_accept_errors(asyncio.get_running_loop())
        return files

    async def drain(self, grace_s: float | None = None, notice_s: float | None = None) -> bool:
        """Drain as described above and stop; True when everything finished within the grace."""
        ctx = self.ctx
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        notice = self.settings.drain_notice_s if notice_s is None else notice_s
        ctx.drain.ready = False
        with contextlib.suppress(TimeoutError):  # the notice ends early at a second signal
            await asyncio.wait_for(self._hurried.wait(), notice)
        ctx.drain.draining = True
        clean = await _quiet(ctx, grace, grace=True)
        await self.stop()
        return clean

    def hurry(self) -> None:
        """A second signal: cut the drain notice and the grace short (streams still running
        end as cancelled)."""
        ctx = self.ctx
        ctx.drain.hurry = True
        self._hurried.set()
        log.info("edge.drain_cut_short", in_flight=ctx.drain.in_flight, live=ctx.streams.live)

    async def stop(self) -> None:
        """Stop now: cancel what still runs (streams end with their last event), then exit."""
        ctx = self.ctx
        ctx.drain.ready = False
        ctx.drain.draining = True
        ctx.streams.cancel_all()
        ctx.upstream.cancel_all()
        await _quiet(ctx, CUT_WAIT_S)
        self.server.should_exit = True
        if self._task is not None:
            await self._task


async def _quiet(ctx: EdgeContext, limit_s: float, *, grace: bool = False) -> bool:
    """Wait until no API request is in flight and no stream is generating; False on timeout
    (or, for the grace, when a second signal cuts it short)."""
    deadline = time.monotonic() + limit_s
    while ctx.drain.in_flight or ctx.streams.live:
        if time.monotonic() >= deadline or (grace and ctx.drain.hurry):
            return False
        await asyncio.sleep(0.05)
    return True


def warn_about_keys(settings: EdgeSettings) -> None:
    """Start-up warnings where the keys leave the edge open: no keys on an address beyond this
    machine (`edge.unauthenticated`), or, with several callers' keys, one of them sent
    upstream (`edge.upstream_key_is_a_callers`: its holder can reach the servers with the
    edge's authority, other callers' streams included)."""
    keys = settings.all_api_keys()
    if not keys and not is_loopback(settings.host):
        log.warning(
            "edge.unauthenticated",
            host=settings.host,
            reason="no API keys: anyone who reaches this address can generate; set "
            "TOKENWIRE_API_KEYS (or TOKENWIRE_API_KEYS_FILE)",
        )
    upstream = settings.upstream_api_key or (keys[0] if keys else "")
    if len(keys) > 1 and upstream in keys:
        log.warning(
            "edge.upstream_key_is_a_callers",
            reason="the key the edge sends to the servers is one of its callers' keys: its "
            "holder can call the servers with the edge's authority, where every caller's "
            "streams run; set TOKENWIRE_UPSTREAM_API_KEY to a key only the edge and the "
            "servers hold",
        )


async def run_edge(settings: EdgeSettings) -> int:
    """Serve until SIGTERM/SIGINT, then drain and log `edge.stopped`; the exit status. A port
    that cannot be listened on is one log line and status 2."""
    edge = EdgeServer(settings)
    # Signals are taken before the edge listens: one that comes right after `edge.listening`
    # (or while it starts) drains, rather than killing the process.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await edge.start()
    except OSError as exc:  # taken, or not allowed
        address = host_port(settings.host, settings.port)
        log.error("edge.cannot_listen", address=address, reason=str(exc))
        return 2
    url = f"http://{host_port(settings.host, port)}/"
    log.info("edge.listening", url=url, grpc_target=settings.grpc_target)
    warn_about_keys(settings)
    assert edge._task is not None
    serving = edge._task
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    started = time.monotonic()
    if serving.done():
        stopping.cancel()
        await serving
        log.info("edge.stopped", reason="server exited")
        return 0
    log.info("edge.draining", in_flight=edge.ctx.drain.in_flight, live=edge.ctx.streams.live)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, edge.hurry)
    clean = await edge.drain()
    log.info(
        "edge.stopped",
        reason="signal",
        drained=clean,
        drain_ms=round((time.monotonic() - started) * 1000, 1),
    )
    return 0
