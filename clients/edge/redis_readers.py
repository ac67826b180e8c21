"""This edge's readers of stored streams (tokenwire.edge.redis_store): each reader's view of its
stream (`RedisStream`), and the one blocking read of a stream that its readers here share.

A `Tail` waits for a stream's new events with XREAD BLOCK: one connection of the waits' pool
(tokenwire.edge.redis_pools) however many readers wait here; its other calls, and the
readers', are short ones on the reads' pool. It keeps the newest events it read (RECENT_BYTES
at most) and wakes its readers, who take them from it; a reader behind what it keeps catches up
with XRANGE, at its own pace, so a slow client holds a place and nothing more. While it runs,
the tail marks the stream read from this edge (one member of the `watch` set per edge,
refreshed every third of a lease) and, when nothing came for half a lease, checks that the
stream is still stored and its generation alive: a stream whose edge died is taken over here.
A reader about to attach holds the stream with a `watch` member of its own
(tokenwire.edge.redis_keys), which goes once the tail's mark holds the stream for it. It ends
for its readers with an `error` event (seq 0: no resume can name it) when the store
fails, the stream expires, or this edge's generation of it failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import RedisError

from tokenwire.edge import redis_keys as rk
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.redis_generation import quietly, store_error
from tokenwire.edge.redis_keys import Keys
from tokenwire.edge.redis_pools import Seat
from tokenwire.edge.resumable import BufferedEvent, events_dropped, expired_stream

if TYPE_CHECKING:
    from tokenwire.edge.redis_store import RedisStreams

READ_COUNT = 512
RECENT_BYTES = 16 * 1024
"""Events a tail keeps for its readers (the newest one always): what readers that keep up
take without a call of their own. Tails are as many as the streams read here at most."""


Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as RESP2 gives it: its id (`0-<seq>`) and its fields."""


def stored_event(entry: Entry) -> BufferedEvent:
    entry_id, fields = entry
    return BufferedEvent(int(entry_id.split(b"-")[1]), fields[b"n"].decode(), fields[b"d"].decode())


def made_up(store: RedisStreams, error: EdgeError) -> BufferedEvent:
    """An error event this edge tells its reader, not stored (seq 0: it has no id), in the
    compact JSON of the stored ones."""
    name, data = store.encode(error)
    return BufferedEvent(0, name, json.dumps(data, separators=(",", ":")))


def text_of(value: bytes | str | None) -> str | None:
    """A Redis reply's text (replies are bytes), or None."""
    return value.decode() if isinstance(value, bytes) else value


class Tail:
    """This edge's blocking read of one stream, for its readers here."""

    def __init__(
        self, store: RedisStreams, request_id: str, after_seq: int, instance: str | None
    ) -> None:
        self.store = store
        self.request_id = request_id
        self.instance = instance
        """The stream's instance (meta `instance`): the tail ends where the id's keys are
        another stream's."""
        self.keys = Keys.of(request_id)
        self.readers = 0
        self.last = after_seq
        """The newest seq stored, as far as the tail has read."""
        self.end: BufferedEvent | None = None
        """Why it ended for its readers (made up), unless the stream's last event ended it."""
        self._recent: collections.deque[BufferedEvent] = collections.deque()
        self._recent_bytes = 0
        self._news = asyncio.Event()
        self._marked = False
        """The stream's `watch` set holds this edge's mark."""
        self._reservations: list[str] = []
        """Those of readers attached here, until the mark holds the stream for them."""
        self._task = asyncio.create_task(self._run(), name=f"tail-{request_id}")

    @property
    def running(self) -> bool:
        return not self._task.done()

    @property
    def task(self) -> asyncio.Task[None]:
        return self._task

    def after(self, cursor: int) -> list[BufferedEvent] | None:
        """The events after seq `cursor` that the tail keeps: [] when it has read none, None
        when the reader is behind what it keeps (the reader reads those from the store)."""
        if cursor >= self.last:
            return []
        if not self._recent or cursor + 1 < self._recent[0].seq:
            return None
        return list(itertools.islice(self._recent, cursor + 1 - self._recent[0].seq, None))

    async def news(self, cursor: int) -> None:
        """Wait until the tail has read events after seq `cursor`, or ended."""
        while self.last <= cursor and self.end is None and self.running:
            await self._news.wait()

    def settle(self, reservation: str) -> None:
        """A reader held for (see RedisStreams.get) has attached: what held the stream for it
        goes as soon as this edge's mark holds it."""
        self._reservations.append(reservation)
        if self._marked:
            self._settled()

    def _settled(self) -> None:
        members, self._reservations = self._reservations, []
        if members:
            self.store.spawn(quietly(self.store.reads.zrem(self.keys.watch, *members)))

    def fail(self, event: BufferedEvent) -> None:
        """End it for its readers with `event` (this edge's generation of the stream failed)."""
        self._ended(event)
        self.stop()

    def stop(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        store = self.store
        try:
            top = cast(list[Entry], await store.reads.xrevrange(self.keys.events, count=1))
            if top:
                newest = stored_event(top[0])
                self.last = max(self.last, newest.seq)
                # Readers waiting for news learn that the store holds events they lack.
                self._wake()
                if newest.name in rk.TERMINAL:
                    return  # a finished stream: its readers find every event in the store
            await self._follow()
        except RedisError as error:
            self._ended(made_up(store, store_error(error)))
        finally:
            self._settled()  # the stream ended, or nobody reads it here any more
            self._wake()

    async def _follow(self) -> None:
        store, keys = self.store, self.keys
        block_ms = max(10, store.lease_ms // 2)
        watched_at = float("-inf")
        while True:
            if time.monotonic() - watched_at >= store.lease_s / 3:
                watched_at = time.monotonic()
                # A mark, not a read: a store that refuses writes for a while (out of memory)
                # still serves the readers, and one out of reach fails the read below.
                with contextlib.suppress(RedisError):
                    watch = store.scripts["WATCH"]
                    await watch([keys.watch], [store.edge, 2 * store.lease_ms], client=store.reads)
                    self._marked = True
                    self._settled()
            reply = cast(
                list[Any],
                await store.waits.xread(
                    {keys.events: f"0-{self.last}"}, count=READ_COUNT, block=block_ms
                ),
            )
            if reply:
                if self._keep([stored_event(entry) for entry in reply[0][1]]):
                    return  # the stream ended: its readers find its last event
            elif not await self._still_there():
                self._ended(made_up(store, expired_stream(self.request_id)))
                return

    def _keep(self, events: list[BufferedEvent]) -> bool:
        """Keep what was read for the readers and wake them; True when it ended the stream."""
        for event in events:
            if event.seq != self.last + 1:
                # Trimmed before the tail read them: what it keeps must run without a gap (a
                # reader behind it finds the gap in the store, and is told).
                self._recent.clear()
                self._recent_bytes = 0
            self._recent.append(event)
            self._recent_bytes += event.size
            self.last = event.seq
        while len(self._recent) > 1 and self._recent_bytes > RECENT_BYTES:
            self._recent_bytes -= self._recent.popleft().size
        self._wake()
        return any(event.name in rk.TERMINAL for event in events)

    async def _still_there(self) -> bool:
        """Nothing new for a while: is the stream still stored, and is its edge alive? A stream
        whose edge died is taken over here."""
        pipe = self.store.reads.pipeline(transaction=False)
        pipe.hmget(self.keys.meta, ["state", "instance"])
        pipe.exists(self.keys.lease)
        (state, instance), leased = await pipe.execute()
        if state is None or (state == b"expired" and not leased):
            return False  # gone, or dropped by an edge that died before it wrote why
        if text_of(instance) != self.instance:
            return False  # its keys lapsed, and another stream has the id now
        if state == b"open" and not leased:
            await self.store.take_over(self.request_id)
        return True

    def _ended(self, event: BufferedEvent) -> None:
        if self.end is None:
            self.end = event
        self._wake()

    def _wake(self) -> None:
        self._news.set()
        self._news = asyncio.Event()


class RedisStream:
    """A reader's view of one stored stream: the events after a seq, then live ones.

    A stream a resume got holds the reader's seat from then (see RedisStreams.get); it is
    given back when its reader leaves, or when the stream is dropped unread (a resume answered
    204, 400 or 410, or whose client left before its response began). Its `reservation` holds
    the stream's expiry off until the reader attaches, or is given back with the seat (it
    lapses by itself after ATTACH_S where neither comes)."""

    def __init__(
        self,
        store: RedisStreams,
        request_id: str,
        instance: str | None,
        seat: Seat | None = None,
        reservation: str | None = None,
    ) -> None:
        self.store = store
        self.request_id = request_id
        self.instance = instance
        """The stream's instance when it was found: a reader behind whose stream's keys
        lapsed (another stream may have the id since) is told its events are gone."""
        self.keys = Keys.of(request_id)
        self._seat = seat
        self._reservation = reservation
        if seat is not None:
            weakref.finalize(self, seat.release)

    @property
    def followers(self) -> int:
        tail = self.store.tails.get(self.request_id)
        return 0 if tail is None else tail.readers

    async def bounds(self) -> tuple[int, int, bool]:
        pipe = self.store.reads.pipeline(transaction=False)
        pipe.hget(self.keys.meta, "first")
        pipe.xrevrange(self.keys.events, count=1)
        first, last = await self.store.redis(pipe.execute())
        newest = stored_event(last[0]) if last else BufferedEvent(0, "", "")
        return int(first or 1), newest.seq, newest.name in rk.TERMINAL

    def leave_unread(self) -> None:
        """The resume that got this stream will not read it: its seat and its reservation are
        given back now."""
        seat, self._seat = self._seat, None
        if seat is not None:
            seat.release()
        reservation, self._reservation = self._reservation, None
        if reservation is not None:
            self.store.spawn(quietly(self.store.reads.zrem(self.keys.watch, reservation)))

    async def follow(self, after_seq: int) -> AsyncGenerator[BufferedEvent, None]:
        store = self.store
        # The first reader of a stream this edge opened takes a seat whatever the bound.
        seat, self._seat = self._seat or store.seats.take(), None
        reservation, self._reservation = self._reservation, None
        tail = store.attach(self.request_id, after_seq, self.instance)
        if reservation is not None:
            tail.settle(reservation)
        try:
            async for event in self._events(tail, after_seq):
                yield event
        finally:
            seat.release()
            store.detach(tail)

    async def _events(self, tail: Tail, cursor: int) -> AsyncIterator[BufferedEvent]:
        """The events after `cursor`: from the tail where it keeps them, else from the store;
        a gap (events trimmed before this reader got them) is said, never skipped."""
        try:
            while True:
                batch = tail.after(cursor)
                if batch is None or (not batch and (tail.end or not tail.running)):
                    batch = await self._stored_after(cursor)
                    if batch is None:  # its keys lapsed: what it has not read is gone
                        yield made_up(self.store, events_dropped(cursor))
                        return
                if not batch:
                    if tail.end is not None:
                        yield tail.end
                        return
                    if not tail.running:
                        return  # the stream's last event ended it, and this reader has it
                    await tail.news(cursor)
                    continue
                for event in batch:
                    if event.seq != cursor + 1:
                        yield made_up(self.store, events_dropped(cursor))
                        return
                    cursor = event.seq
                    yield event
                    if event.name in rk.TERMINAL:
                        return
        except RedisError as error:
            yield made_up(self.store, store_error(error))

    async def _stored_after(self, cursor: int) -> list[BufferedEvent] | None:
        """The stored events after seq `cursor`; None where the stream is no longer stored
        (its keys lapsed while this reader was behind), or another stream has its id now."""
        # One transaction: the meta and the events read at one moment, so events that lapsed
        # between the two reads are never taken for a stream with none left.
        pipe = self.store.reads.pipeline(transaction=True)
        pipe.hmget(self.keys.meta, ["state", "instance"])
        pipe.xrange(self.keys.events, f"0-{cursor + 1}", count=READ_COUNT)
        (state, instance), entries = await pipe.execute()
        if state is None or text_of(instance) != self.instance:
            return None
        return [stored_event(entry) for entry in cast(list[Entry], entries)]
