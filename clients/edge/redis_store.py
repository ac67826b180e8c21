"""Native streams kept in Redis (`--resume-store redis://...`), so that any edge replica can
resume them and, when the edge generating one dies, continue it.

Who owns a stream: the edge that generates it holds its lease (tokenwire.edge.redis_keys),
refreshes it while it streams, and is its only writer. Readers, on that edge or any other, tail
the stored events with XREAD BLOCK. A reader that finds the lease lapsed on a stream that has
not ended takes it (SET NX), and its edge continues the generation through the contract's
continuation: the stored request, the seed the server announced and the token ids already
delivered; the new events follow on the same stream from the next seq, so a client that
reconnects with `Last-Event-ID` gets exactly the events it lacks, whichever edge it reaches.
"""

from __future__ import annotations

import asyncio
import collections
import json
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from tokenwire.client.failover import ServedModel
from tokenwire.edge import redis_keys as rk
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.metrics import RouteName
from tokenwire.edge.redis_generation import Generation, Opener, quietly, store_error
from tokenwire.edge.redis_keys import Keys
from tokenwire.edge.resumable import (
    BufferedEvent,
    Encode,
    events_dropped,
    expired_stream,
    id_taken,
    unknown_stream,
)
from tokenwire.edge.settings import EdgeSettings
from tokenwire.edge.upstream import Delivered, Upstream, UpstreamStream
from tokenwire.v1 import generate_pb2 as pb

log = structlog.get_logger("tokenwire.edge")
T = TypeVar("T")
READ_COUNT = 512
MAX_CONNECTIONS = 4096
SCRIPTS = ("CLAIM", "RELEASE_CLAIM", "APPEND", "TICK", "WATCH", "ASK_CANCEL", "RELEASE_LEASE")
# A finished stream stays for the window, but never less than this: readers blocked on it must
# still find its last event.
MIN_DONE_MS = 1000
NATIVE = RouteName.NATIVE
"""The route of every stored stream (only native streams are kept), and of its failovers."""


def _principal(owner: str | None) -> bytes:
    return b"-" if owner is None else b"k:" + owner.encode()


def _owner(principal: bytes | None) -> str | None:
    """The owner a stored principal names (_principal's inverse)."""
    return principal[2:].decode() if principal and principal.startswith(b"k:") else None


class RedisStreams:
    """The edge's streams in Redis; the same answers as the in-memory store (404, 409, 410)."""

    def __init__(
        self,
        settings: EdgeSettings,
        upstream: Upstream,
        encode: Encode,
    ) -> None:
        self.window_s = settings.resume_window_s
        self.lease_s = settings.resume_lease_s
        self.lease_ms = max(1, round(settings.resume_lease_s * 1000))
        self.live_ttl_ms = round(settings.resume_window_s * 1000) + self.lease_ms
        self.done_ttl_ms = max(MIN_DONE_MS, round(settings.resume_window_s * 1000))
        self.stream_bytes = settings.resume_stream_bytes
        self.total_bytes = settings.resume_total_bytes
        self.encode = encode
        self.upstream = upstream
        self.edge = uuid.uuid4().hex
        """This edge's name in the leases it holds."""
        # Every reader tails its stream with a blocking XREAD, which holds a connection while
        # it waits: the pool is sized for many readers (Redis allows 10,000 clients by
        # default). RESP2 pins the shapes of the replies read here.
        self.client = aioredis.Redis.from_url(
            settings.resume_store, max_connections=MAX_CONNECTIONS, protocol=2
        )
        self.scripts = {name: self.client.register_script(getattr(rk, name)) for name in SCRIPTS}
        self.followers: collections.Counter[str] = collections.Counter()
        self._generations: dict[str, Generation] = {}
        self.held = 0
        """Bytes of the events kept for the streams this edge generates, kept as they change
        (`bytes` sums them); bounded by total_bytes as events arrive (Generation._keep)."""
        self._claimed: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    async def redis(self, call: Awaitable[T]) -> T:
        """A Redis call whose failure is a 503 for the HTTP caller."""
        try:
            return await call
        except RedisError as error:
            raise store_error(error) from None

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self.scripts[name](keys=keys, args=args)

    async def claim(self, request_id: str) -> None:
        keys = Keys.of(request_id)
        if not await self.redis(self.script("CLAIM", [keys.meta], [rk.CLAIM_MS])):
            raise id_taken(self.window_s)
        self._claimed.add(request_id)

    async def release(self, request_id: str) -> None:
        if request_id in self._claimed:
            self._claimed.discard(request_id)
            await self.redis(self.script("RELEASE_CLAIM", [Keys.of(request_id).meta], []))

    async def open(
        self, upstream: UpstreamStream, request_id: str, owner: str | None
    ) -> RedisStream:
        if self.held >= self.total_bytes:
            upstream.cancel()
            raise EdgeError(429, "RESOURCE_EXHAUSTED", "resume buffers are full", retry_after_s=1)
        keys = Keys.of(request_id)
        request = upstream.request or pb.GenerateRequest()
        meta = {
            "state": "open",
            "principal": _principal(owner),
            "request": request.SerializeToString(),
            "seed": "" if upstream.seed is None else str(upstream.seed),
            "model": "" if upstream.model is None else upstream.model.header(),
            "first": 1,
        }
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(keys.meta, mapping=meta)  # type: ignore[arg-type]
        pipe.pexpire(keys.meta, self.live_ttl_ms)
        pipe.set(keys.lease, self.edge, px=self.lease_ms)
        pipe.set(keys.gone, _principal(owner), ex=rk.GONE_S)
        try:
            await self.redis(pipe.execute())
        except EdgeError:
            upstream.cancel()
            raise
        self._claimed.discard(request_id)
        self._start(request_id, 1, _ready(upstream), skip_usage=False)
        return RedisStream(self, request_id)

    async def get(self, request_id: str, owner: str | None) -> RedisStream:
        keys = Keys.of(request_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(keys.meta, ["state", "principal"])
        pipe.get(keys.gone)
        (state, principal), gone = await self.redis(pipe.execute())
        caller = _principal(owner)
        if state in (b"open", b"done") and principal == caller:
            return RedisStream(self, request_id)
        if gone == caller:
            raise expired_stream(request_id)
        raise unknown_stream(request_id)

    async def cancel(self, request_id: str, owner: str | None) -> None:
        await self.get(request_id, owner)
        generation = self._generations.get(request_id)
        if generation is not None:
            await generation.cancel_at_server()
            return
        # Another edge generates it: it sees the flag at its next event or lease refresh. If
        # that edge is gone, taking the stream over ends it (the flag is seen there too).
        if await self.redis(self.script("ASK_CANCEL", [Keys.of(request_id).meta], [])):
            await self.redis(self.take_over(request_id))

    async def take_over(self, request_id: str) -> None:
        """Continue a stream whose edge's lease lapsed, if this edge wins its lease."""
        keys = Keys.of(request_id)
        if request_id in self._generations:
            return
        if not await self.client.set(keys.lease, self.edge, nx=True, px=self.lease_ms):
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(keys.meta)
        pipe.get(keys.ids)
        pipe.xrevrange(keys.events, count=1)
        meta, packed, last = await pipe.execute()
        last_seq, last_name = _seq_and_name(last[0]) if last else (0, "")
        if meta.get(b"state") != b"open" or last_name in rk.TERMINAL:
            await self.script("RELEASE_LEASE", [keys.lease], [self.edge])
            return
        request = pb.GenerateRequest.FromString(meta[b"request"])
        packed = packed or b""
        delivered = Delivered(
            ids=struct.unpack(f"<{len(packed) // 4}I", packed),
            seed=int(meta[b"seed"]) if meta.get(b"seed") else None,
            # The continuation must run on the model whose tokens were stored (a stream begun
            # before the edges stored it continues unchecked).
            model=ServedModel.of_header(meta.get(b"model", b"").decode()),
        )
        log.info(
            "edge.stream_taken_over",
            request_id=request_id,
            after_seq=last_seq,
            tokens=len(delivered.ids),
        )

        async def reopen() -> UpstreamStream:
            return await self.upstream.open(
                request, request_id, delivered, route=NATIVE, owner=_owner(meta.get(b"principal"))
            )

        generation = self._start(request_id, last_seq + 1, reopen, skip_usage=last_name == "usage")
        if meta.get(b"cancel"):
            generation.cancel()

    def _start(
        self, request_id: str, next_seq: int, opener: Opener, *, skip_usage: bool
    ) -> Generation:
        generation = Generation(self, request_id, next_seq, opener, skip_usage=skip_usage)
        self._generations[request_id] = generation
        return generation

    def ended(self, generation: Generation) -> None:
        if self._generations.get(generation.request_id) is generation:
            del self._generations[generation.request_id]
            self.held -= generation.bytes

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run Redis housekeeping in the background (a reader that leaves cannot wait for it)."""
        if self._closed:
            work.close()  # the keys it would touch lapse by themselves
            return
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def live(self) -> int:
        return len(self._generations)

    @property
    def bytes(self) -> int:
        return sum(g.bytes for g in self._generations.values())

    def cancel_all(self) -> None:
        for generation in list(self._generations.values()):
            generation.cancel()

    async def close(self) -> None:
        self._closed = True
        for generation in list(self._generations.values()):
            generation.stop()
        tasks = [t for g in self._generations.values() for t in g.tasks] + list(self._background)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.aclose()


def _ready(upstream: UpstreamStream) -> Opener:
    async def opened() -> UpstreamStream:
        return upstream

    return opened


def _seq_and_name(entry: tuple[bytes, dict[bytes, bytes]]) -> tuple[int, str]:
    entry_id, fields = entry
    return int(entry_id.split(b"-")[1]), fields[b"n"].decode()


def _event(entry: tuple[bytes, dict[bytes, bytes]]) -> BufferedEvent:
    seq, name = _seq_and_name(entry)
    return BufferedEvent(seq, name, entry[1][b"d"].decode())


def _made_up(store: RedisStreams, error: EdgeError) -> BufferedEvent:
    """An error event this edge tells its reader, not stored (seq 0: it has no id)."""
    name, data = store.encode(error)
    return BufferedEvent(0, name, json.dumps(data))


class RedisStream:
    """A reader's view of one stored stream: the events after a seq, then live ones."""

    def __init__(self, store: RedisStreams, request_id: str) -> None:
        self.store = store
        self.request_id = request_id
        self.keys = Keys.of(request_id)

    @property
    def followers(self) -> int:
        return self.store.followers[self.request_id]

    async def bounds(self) -> tuple[int, int, bool]:
        pipe = self.store.client.pipeline(transaction=False)
        pipe.hget(self.keys.meta, "first")
        pipe.xrevrange(self.keys.events, count=1)
        first, last = await self.store.redis(pipe.execute())
        seq, name = _seq_and_name(last[0]) if last else (0, "")
        return int(first or 1), seq, name in rk.TERMINAL

    async def follow(self, after_seq: int) -> AsyncGenerator[BufferedEvent, None]:
        store = self.store
        member = f"{store.edge}:{uuid.uuid4().hex}"
        store.followers[self.request_id] += 1
        try:
            async for event in self._events(after_seq, member):
                yield event
        finally:
            store.followers[self.request_id] -= 1
            if store.followers[self.request_id] <= 0:
                del store.followers[self.request_id]
            store.spawn(quietly(store.client.zrem(self.keys.watch, member)))

    async def _events(self, after_seq: int, member: str) -> AsyncIterator[BufferedEvent]:
        store, keys = self.store, self.keys
        cursor = after_seq
        block_ms = max(10, store.lease_ms // 2)
        watched_at = float("-inf")
        try:
            first = await store.client.hget(keys.meta, "first")
            if after_seq + 1 < int(first or 1):
                yield _made_up(store, events_dropped(after_seq))
                return
            while True:
                if time.monotonic() - watched_at >= store.lease_s / 3:
                    await store.script("WATCH", [keys.watch], [member, 2 * store.lease_ms])
                    watched_at = time.monotonic()
                reply = cast(
                    list[Any],
                    await store.client.xread(
                        {keys.events: f"0-{cursor}"}, count=READ_COUNT, block=block_ms
                    ),
                )
                entries = reply[0][1] if reply else []
                for entry in entries:
                    event = _event(entry)
                    if event.seq != cursor + 1:
                        # Trimmed before this reader got them: say so, never skip silently.
                        yield _made_up(store, events_dropped(cursor))
                        return
                    cursor = event.seq
                    yield event
                    if event.name in rk.TERMINAL:
                        return
                if not entries and not await self._still_there():
                    yield _made_up(store, expired_stream(self.request_id))
                    return
        except RedisError as error:
            yield _made_up(store, store_error(error))

    async def _still_there(self) -> bool:
        """Nothing new for a while: is the stream still stored, and is its edge alive? A stream
        whose edge died is taken over here."""
        pipe = self.store.client.pipeline(transaction=False)
        pipe.hget(self.keys.meta, "state")
        pipe.exists(self.keys.lease)
        state, leased = await pipe.execute()
        if state is None:
            return False
        if state == b"open" and not leased:
            await self.store.take_over(self.request_id)
        return True
