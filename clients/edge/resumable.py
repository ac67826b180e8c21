"""Resumable SSE streams: events are kept in a bounded buffer so a client that lost its
connection can reconnect with Last-Event-ID and get exactly the events it missed.

While nobody is connected, generation goes on for `window_s`; if nobody comes back by then the
upstream RPC is cancelled. A finished stream stays readable for the same window. That clock runs
from the stream's opening (a response that never reads it, HEAD's, does not keep it) and stops
while a reader is attached; a reader about to attach (the first response, or a resume that
found the stream) holds it off for ATTACH_S. Every stream ends with `done` or `error`: one
dropped before it finished gets a GONE `error` for any reader still on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncGenerator, Callable
from typing import Any

from tokenwire.client.messages import Completion, StreamEvent
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.upstream import UpstreamStream

Encode = Callable[[StreamEvent | EdgeError], tuple[str, dict[str, Any]]]
"""The stored format's encoder: a pipeline event (or the error ending it) -> name and data."""
EXPIRED_MEMORY = 10_000
CANCEL_WAIT_S = 2.0
"""How long a cancelled stream waits for the server's own end before it is cut here."""
ATTACH_S = 2.0
"""How long a reader about to attach (a resume that found the stream, or the response of the
request that opened it) keeps the stream from expiring before its first read."""
_SEQ = re.compile(r"[0-9]{1,18}", re.ASCII)


@dataclasses.dataclass(frozen=True, slots=True)
class BufferedEvent:
    seq: int
    name: str
    data: str

    @property
    def size(self) -> int:
        return len(self.data) + len(self.name) + 24


def parse_event_id(value: str) -> tuple[str, int]:
    """'<request_id>:<seq>' -> (request_id, seq); EdgeError 400 when malformed."""
    request_id, _, seq = value.rpartition(":")
    # ASCII digits only: str.isdigit() accepts '²', which int() refuses.
    if not request_id or not _SEQ.fullmatch(seq):
        raise EdgeError.invalid("Last-Event-ID", "must look like <request_id>:<seq>")
    return request_id, int(seq)


def id_taken(window_s: float) -> EdgeError:
    """The 409 for a request id whose stream can still be resumed."""
    return EdgeError(
        409,
        "ALREADY_EXISTS",
        f"request_id: a stream with this id is still resumable (for up to "
        f"{window_s:g} s after it ends); use a new id",
        param="request_id",
    )


def unknown_stream(request_id: str) -> EdgeError:
    return EdgeError(404, "NOT_FOUND", f"no stream with request id {request_id}")


def expired_stream(request_id: str) -> EdgeError:
    return EdgeError(410, "GONE", f"stream {request_id} has expired")


def stream_expired() -> EdgeError:
    """The `error` event that ends a stream dropped before it finished."""
    return EdgeError(410, "GONE", "stream expired: nobody read it within the resume window")


def events_dropped(after_seq: int) -> EdgeError:
    """The 410 for a resume from a seq whose next events the buffer no longer holds."""
    return EdgeError(410, "GONE", f"events after {after_seq} are no longer buffered")


class ResumableStream:
    """One generation's events, buffered, with any number of followers over time."""

    def __init__(
        self,
        registry: ResumableStreams,
        upstream: UpstreamStream,
        request_id: str,
        owner: str | None,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.request_id = request_id
        self.owner = owner
        self.events: collections.deque[BufferedEvent] = collections.deque()
        self.first_seq = 1
        self.next_seq = 1
        self.bytes = 0
        self.done = False
        self.followers = 0
        self.resumed = False
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None
        self.pending = 0
        """Readers about to attach (see `reserve`)."""
        self._reserved_until = 0.0

    def reserve(self) -> None:
        """A reader is about to attach: until it does, the expiry waits for it, ATTACH_S at the
        most (a response whose body never starts, its client gone first, keeps nothing)."""
        self.pending += 1
        now = asyncio.get_running_loop().time()
        self._reserved_until = max(self._reserved_until, now + ATTACH_S)

    def leave_unread(self) -> None:
        """A reader reserved for has attached, or will not (its resume was answered 204 or
        refused): it no longer holds the expiry off."""
        if self.pending > 0:
            self.pending -= 1
            if self.pending == 0:
                self._reserved_until = 0.0

    @property
    def reserved(self) -> bool:
        """Whether a reader about to attach holds the expiry off now."""
        return self.pending > 0 and self._reserved_until > asyncio.get_running_loop().time()

    def start(self) -> None:
        self._pump = asyncio.create_task(self._run(), name=f"pump-{self.request_id}")

    async def _run(self) -> None:
        encode = self.registry.encode
        try:
            async for event in self.upstream.events():
                self.append(*encode(event))
        except EdgeError as error:
            self.append(*encode(error))
        finally:
            self._finish()

    def append(self, name: str, data: dict[str, Any]) -> None:
        event = BufferedEvent(self.next_seq, name, json.dumps(data, separators=(",", ":")))
        self.next_seq += 1
        self.events.append(event)
        self.bytes += event.size
        self.registry.held += event.size
        while self.bytes > self.registry.stream_bytes and len(self.events) > 1:
            self.drop_oldest()
        if self.registry.held > self.registry.total_bytes:
            self.registry.make_room()
        self._changed.set()

    def drop_oldest(self) -> None:
        """Forget the oldest buffered event (a reader that still needed it gets a 410)."""
        dropped = self.events.popleft()
        self.first_seq = dropped.seq + 1
        self.bytes -= dropped.size
        self.registry.held -= dropped.size

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self._changed.set()
            self._ended.set()
            self.registry.finished(self)

    async def bounds(self) -> tuple[int, int, bool]:
        """(oldest seq still buffered, newest seq appended, 0 before the first; ended)."""
        return self.first_seq, self.next_seq - 1, self.done

    async def follow(self, after_seq: int) -> AsyncGenerator[BufferedEvent, None]:
        """Yield events with seq > after_seq, live, until the stream is done. Events dropped
        before this reader got them (it fell a whole buffer behind) end it with a 410 `error`
        event: a reader never skips one silently."""
        self.followers += 1
        self.leave_unread()  # the reader it was reserved for is here
        self._stop_timer()
        cursor = after_seq + 1
        try:
            while True:
                index = cursor - self.first_seq
                if index < 0:
                    name, data = self.registry.encode(events_dropped(cursor - 1))
                    # seq 0: no resume can name it, so a later one starts from the last real id.
                    yield BufferedEvent(0, name, json.dumps(data, separators=(",", ":")))
                    return
                if index < len(self.events):
                    event = self.events[index]
                    cursor += 1
                    yield event
                    continue
                if self.done:
                    return
                self._changed.clear()
                await self._changed.wait()
        finally:
            self.followers -= 1
            if self.followers == 0:
                self.registry.orphaned(self)

    async def cancel_at_server(self) -> bool:
        """The cancel route: the server ends the generation, so the readers get its `usage`
        and a `done` (cancelled), as a gRPC caller does. Where the server cannot (it no longer
        runs the stream, or cannot be reached) or has not within CANCEL_WAIT_S, the stream is
        cut here, with `done` alone. False for a stream that had already ended."""
        if self.done:
            return False
        if await self.upstream.cancel_at_server():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), CANCEL_WAIT_S)
        self.cancel()
        return True

    def cancel(self, reason: str = "cancelled") -> None:
        """End generation now; followers get a final `done` event with the reason."""
        if self.done:
            return
        self.upstream.cancel()
        if self._pump is not None:
            self._pump.cancel()
        self.append(*self.registry.encode(Completion(reason)))
        self._finish()

    def expire_later(self, delay: float) -> None:
        self._stop_timer()
        self._timer = asyncio.create_task(self._expire_after(delay))

    async def _expire_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.reserved:  # a reader about to attach: try again once its reservation ends
            wait = self._reserved_until - asyncio.get_running_loop().time()
            self._timer = asyncio.create_task(self._expire_after(wait))
            return
        if self.followers == 0:
            self.registry.drop(self)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abandon(self, why: Callable[[], EdgeError] = stream_expired) -> None:
        """Nobody came back: stop the upstream, and end the stream with `why`'s `error` event
        for a reader that found it in the meantime (never a stream cut without an end)."""
        self._stop_timer()
        if not self.done:
            self.upstream.cancel()
            if self._pump is not None:
                self._pump.cancel()
            self.append(*self.registry.encode(why()))
            self._finish()
            self._stop_timer()  # _finish's expiry: the registry drops the stream itself


class ResumableStreams:
    """All buffered streams of this edge, bounded per stream and in total.

    A stream belongs to the principal (API key fingerprint, or None without keys) that started
    it: for anyone else it does not exist. Its id stays taken while it can still be resumed.
    """

    def __init__(
        self,
        window_s: float,
        stream_bytes: int,
        total_bytes: int,
        encode: Encode,
    ) -> None:
        self.window_s = window_s
        self.encode = encode
        self.stream_bytes = stream_bytes
        self.total_bytes = total_bytes
        self._streams: dict[str, ResumableStream] = {}
        self.held = 0
        """Bytes buffered by registered streams, kept as they change (`bytes` sums them)."""
        self._claimed: set[str] = set()
        self._expired: collections.OrderedDict[str, str | None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def live(self) -> int:
        """Streams still generating (with or without a client attached)."""
        return sum(1 for stream in self._streams.values() if not stream.done)

    @property
    def bytes(self) -> int:
        """Bytes buffered by registered streams (summed, never tracked, so it cannot drift)."""
        return sum(stream.bytes for stream in self._streams.values())

    async def claim(self, request_id: str, owner: str | None = None) -> None:
        """Reserve an id before the upstream call; 409 while a stream with it is resumable.
        `owner` is kept with the opening instead (native.py), which cancels see first."""
        if request_id in self._streams or request_id in self._claimed:
            raise id_taken(self.window_s)
        self._claimed.add(request_id)

    async def release(self, request_id: str) -> None:
        self._claimed.discard(request_id)

    async def open(
        self, upstream: UpstreamStream, request_id: str, owner: str | None
    ) -> ResumableStream:
        """Register the stream of a claimed id and start pumping its events."""
        if not self._room():
            self._evict_finished(self.held + self.stream_bytes - self.total_bytes)
        if self.held >= self.total_bytes:
            upstream.cancel()
            raise EdgeError(429, "RESOURCE_EXHAUSTED", "resume buffers are full", retry_after_s=1)
        stream = ResumableStream(self, upstream, request_id, owner)
        self._streams[request_id] = stream
        self._expired.pop(request_id, None)
        stream.start()
        # Held for the response about to read it; expiring from now on, and not from its
        # first reader's leaving, where a response never reads it (HEAD) or its client left
        # before its body began.
        stream.reserve()
        stream.expire_later(self.window_s)
        return stream

    async def get(self, request_id: str, owner: str | None) -> ResumableStream:
        """The caller's stream, held for the reader about to attach (see `reserve`)."""
        stream = self.find(request_id, owner)
        stream.reserve()
        return stream

    async def cancel(self, request_id: str, owner: str | None) -> bool:
        return await self.find(request_id, owner).cancel_at_server()

    def find(self, request_id: str, owner: str | None) -> ResumableStream:
        """The caller's stream; another principal's is answered exactly like an unknown id."""
        stream = self._streams.get(request_id)
        if stream is not None and stream.owner == owner:
            return stream
        if request_id in self._expired and self._expired[request_id] == owner:
            raise expired_stream(request_id)
        raise unknown_stream(request_id)

    def orphaned(self, stream: ResumableStream) -> None:
        """The last follower left: keep it for the window, or end it now when the window is 0."""
        if stream.done:
            stream.expire_later(self.window_s)
            return
        if self.window_s == 0 and not stream.reserved:
            self.drop(stream)
        else:
            stream.expire_later(self.window_s)

    def finished(self, stream: ResumableStream) -> None:
        if stream.followers == 0:
            stream.expire_later(self.window_s)

    def drop(self, stream: ResumableStream) -> None:
        stream.abandon()
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
            self.held -= stream.bytes
            self._expired[stream.request_id] = stream.owner
            while len(self._expired) > EXPIRED_MEMORY:
                self._expired.popitem(last=False)

    def _evict_finished(self, excess: int) -> None:
        """Drop finished streams nobody reads, oldest first, until `excess` bytes are free."""
        for stream in [s for s in self._streams.values() if s.done and s.followers == 0]:
            if excess <= 0:
                return
            excess -= stream.bytes
            self.drop(stream)

    def make_room(self) -> None:
        """The streams' events passed the total: drop finished streams nobody reads, then the
        oldest events of the stream holding most. Streams open together may each hold less
        than their own bound, but never more than the total between them."""
        self._evict_finished(self.held - self.total_bytes)
        while self.held > self.total_bytes:
            largest = max(self._streams.values(), key=lambda stream: stream.bytes)
            if len(largest.events) <= 1:
                return
            largest.drop_oldest()

    def _room(self) -> bool:
        return self.held + self.stream_bytes <= self.total_bytes

    def cancel_all(self) -> None:
        """End every stream still generating; followers get `done` with reason cancelled."""
        for stream in list(self._streams.values()):
            stream.cancel()

    async def close(self) -> None:
        for stream in list(self._streams.values()):
            stream.abandon(_closing)
            self.drop(stream)


def _closing() -> EdgeError:
    return EdgeError(503, "UNAVAILABLE", "the edge is shutting down")
