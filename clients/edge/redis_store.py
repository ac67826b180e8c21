"""Native streams kept in Redis (`--resume-store redis://...`), so that any edge replica can
resume them and, when the edge generating one dies, continue it.

Who owns a stream: the edge that generates it holds its lease (tokenwire.edge.redis_keys),
refreshes it while it streams, and is its only writer. Readers, on that edge or any other, tail
the stored events; the readers of one stream on one edge share one XREAD BLOCK
(tokenwire.edge.redis_readers). A tail that finds the lease lapsed on a stream that has not ended
takes it (SET NX), and its edge continues the generation through the contract's continuation:
the stored request, the seed the server announced and the token ids already delivered; the new
events follow on the same stream from the next seq, so a client that reconnects with
`Last-Event-ID` gets exactly the events it lacks, whichever edge it reaches.

A stream nobody reads expires after the resume window (tokenwire.edge.redis_generation: from
its opening, and from its last reader's leaving on any edge), as in the in-memory store; a
reader about to attach, on any edge, holds that off for ATTACH_S (a member of the stream's
`watch` set, tokenwire.edge.redis_keys), given back as it attaches or as its resume is answered
without it. A cancel that reaches an edge while another is still opening the stream (its id
claimed, its server not yet answered) is answered at once, as on the edge opening it: the
claim names its principal, so the caller's own cancel is kept (the stream is cancelled as soon
as it opens) and another principal's is the 404 of an unknown id.

Connections: writes, short reads and blocking reads have pools of their own, and readers are
bounded (tokenwire.edge.redis_pools), so readers can neither stall a generation nor refuse a
new stream; a resume past the bound is a 503 before its response starts.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import uuid
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import structlog
from redis.exceptions import RedisError

from tokenwire.client.failover import ServedModel
from tokenwire.edge import redis_keys as rk
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.metrics import RouteName
from tokenwire.edge.redis_generation import Generation, Opener, quietly, store_error
from tokenwire.edge.redis_keys import Keys
from tokenwire.edge.redis_pools import MAX_CONNECTIONS, Pools, Seats, waiting_client
from tokenwire.edge.redis_readers import (
    Entry,
    RedisStream,
    Tail,
    made_up,
    stored_event,
    text_of,
)
from tokenwire.edge.resumable import (
    ATTACH_S,
    Encode,
    expired_stream,
    id_taken,
    unknown_stream,
)
from tokenwire.edge.settings import EdgeSettings
from tokenwire.edge.upstream import Delivered, Upstream, UpstreamStream
from tokenwire.v1 import generate_pb2 as pb

log = structlog.get_logger("tokenwire.edge")
T = TypeVar("T")
SCRIPTS = (
    "CLAIM",
    "RENEW_CLAIM",
    "RELEASE_CLAIM",
    "OPEN",
    "FIND",
    "APPEND",
    "TICK",
    "TAKE",
    "WATCH",
    "ASK_CANCEL",
    "CANCEL_OPENING",
    "RELEASE_LEASE",
    "ABANDON",
)
WRITE_WAIT_S = 1.0
"""How long a write waits for a free connection of its pool before the try fails (and is tried
again: see Generation._append)."""
READ_WAIT_S = 5.0
"""How long a read waits for a free connection of its pool before it fails (a 503)."""
BUSY_TRIES_S = (0.05, 0.1, 0.2, 0.4, 0.8)
"""Waits between the tries of a take-over's continuation that the server refuses because the
generation it continues still runs there (its edge stopped it a moment ago) and none of its
tokens were delivered (a continuation with some replaces that generation at once)."""
# A finished stream stays for the window, but never less than this: readers blocked on it must
# still find its last event. A stream dropped unread stays this long (its GONE `error`).
MIN_DONE_MS = 1000
CLAIM_LEASES = 3
MIN_CLAIM_MS = 3000
"""A claim holds CLAIM_LEASES leases (at least MIN_CLAIM_MS), renewed every lease: a renewal
the store, or a busy event loop, answers late loses nothing, and an edge that dies while its
server opens a stream leaves the id free that much later."""
ATTACH_MS = round(ATTACH_S * 1000)
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
        pools: Pools | None = None,
    ) -> None:
        self.window_s = settings.resume_window_s
        self.lease_s = settings.resume_lease_s
        self.lease_ms = max(1, round(settings.resume_lease_s * 1000))
        self.live_ttl_ms = round(settings.resume_window_s * 1000) + self.lease_ms
        self.done_ttl_ms = max(MIN_DONE_MS, round(settings.resume_window_s * 1000))
        self.expired_ttl_ms = MIN_DONE_MS
        self.stream_bytes = settings.resume_stream_bytes
        self.total_bytes = settings.resume_total_bytes
        self.encode = encode
        self.upstream = upstream
        self.edge = uuid.uuid4().hex
        """This edge's name in the leases it holds and the streams it reads."""
        self.pools = pools or Pools.within(MAX_CONNECTIONS)
        self.writes = waiting_client(settings.resume_store, self.pools.writes, WRITE_WAIT_S)
        self.reads = waiting_client(settings.resume_store, self.pools.reads, READ_WAIT_S)
        self.waits = waiting_client(settings.resume_store, self.pools.waits, READ_WAIT_S)
        self.scripts = {name: self.writes.register_script(getattr(rk, name)) for name in SCRIPTS}
        self.seats = Seats(self.pools.followers)
        self.tails: dict[str, Tail] = {}
        """The streams read on this edge, each with its readers here."""
        self._generations: dict[str, Generation] = {}
        self.held = 0
        """Bytes of the events kept for the streams this edge generates, kept as they change
        (`bytes` sums them); bounded by total_bytes as events arrive (Generation._keep)."""
        self._claimed: dict[str, tuple[str, asyncio.Task[None]]] = {}
        """The ids this edge claimed whose servers are opening their streams, each with its
        claim's name (its `claimer` in the store) and the task that renews it."""
        self._claiming: set[str] = set()
        """The ids this edge is claiming now (their CLAIM not answered yet)."""
        self._reservations = itertools.count()
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def followers(self) -> dict[str, int]:
        """Readers attached on this edge, by stream."""
        return {request_id: tail.readers for request_id, tail in self.tails.items()}

    async def redis(self, call: Awaitable[T]) -> T:
        """A Redis call whose failure is a 503 for the HTTP caller."""
        try:
            return await call
        except RedisError as error:
            raise store_error(error) from None

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """One of the scripts, on the writers' pool."""
        return await self.scripts[name](keys=keys, args=args)

    def reservation(self) -> str:
        """A new member of a stream's `watch` set for a reader about to attach."""
        return f"{rk.RESERVED}{self.edge}:{next(self._reservations)}"

    def holder(self) -> str:
        """A new generation's name in the lease it holds: this edge's, and its own."""
        return f"{self.edge}:{uuid.uuid4().hex[:12]}"

    async def claim(self, request_id: str, owner: str | None = None) -> None:
        """Claim the id for a stream this edge's server is about to open, for CLAIM_LEASES
        leases (at least MIN_CLAIM_MS) at a time, renewed every lease while it opens: an edge
        that dies meanwhile leaves it free that much later. Each claim has a name of its own
        (an edge whose claim lapsed opens nothing over another's), and an id this edge is
        opening is taken here whatever the store says, as in the in-memory store."""
        if request_id in self._claimed or request_id in self._claiming:
            raise id_taken(self.window_s)
        keys = Keys.of(request_id)
        claimer = self.holder()
        args = [self._claim_ms, _principal(owner), claimer]
        self._claiming.add(request_id)
        try:
            claimed = await self.redis(self.script("CLAIM", keys.claimed, args))
        finally:
            self._claiming.discard(request_id)
        if not claimed:
            raise id_taken(self.window_s)
        renewing = asyncio.create_task(self._hold_claim(keys.meta, claimer))
        self._claimed[request_id] = (claimer, renewing)

    @property
    def _claim_ms(self) -> int:
        return max(CLAIM_LEASES * self.lease_ms, MIN_CLAIM_MS)

    async def _hold_claim(self, meta: str, claimer: str) -> None:
        """Renew a claim every lease until it is opened or released (cancelled then) or no
        longer this one's; a renewal Redis fails is tried again at the next."""
        while True:
            await asyncio.sleep(self.lease_s)
            try:
                if not await self.script("RENEW_CLAIM", [meta], [claimer, self._claim_ms]):
                    return
            except RedisError as error:
                store_error(error)

    def _drop_claim(self, request_id: str) -> str | None:
        """Stop renewing the id's claim; the claim's name where this edge held one."""
        held = self._claimed.pop(request_id, None)
        if held is None:
            return None
        claimer, renewing = held
        renewing.cancel()
        return claimer

    async def release(self, request_id: str) -> None:
        claimer = self._drop_claim(request_id)
        if claimer is not None:
            meta = Keys.of(request_id).meta
            await self.redis(self.script("RELEASE_CLAIM", [meta], [claimer]))

    async def open(
        self, upstream: UpstreamStream, request_id: str, owner: str | None
    ) -> RedisStream:
        if self.held >= self.total_bytes:
            upstream.cancel()
            raise EdgeError(429, "RESOURCE_EXHAUSTED", "resume buffers are full", retry_after_s=1)
        keys = Keys.of(request_id)
        request = upstream.request or pb.GenerateRequest()
        holder = self.holder()
        # Held for the response about to read it (see FIND).
        reservation = self.reservation()
        meta: dict[str, str | bytes | int] = {
            "state": "open",
            "principal": _principal(owner),
            "request": request.SerializeToString(),
            "seed": "" if upstream.seed is None else str(upstream.seed),
            "budget": "" if upstream.budget is None else str(upstream.budget),
            "model": "" if upstream.model is None else upstream.model.header(),
            "first": 1,
            "holder": holder,
            "instance": holder,
        }
        args = [
            *(self.live_ttl_ms, holder, self.lease_ms, _principal(owner), rk.GONE_S),
            *(reservation, ATTACH_MS, self._claimed.get(request_id, ("",))[0]),
            *itertools.chain.from_iterable(meta.items()),
        ]
        try:
            opened = await self.redis(
                self.script("OPEN", [keys.meta, keys.lease, keys.gone, keys.watch], args)
            )
        except EdgeError:
            upstream.cancel()
            raise
        self._drop_claim(request_id)
        if opened == rk.LOST:
            upstream.cancel()
            raise id_taken(self.window_s)
        origin = (str(meta["budget"]), str(meta["model"]))
        generation = self._start(request_id, 1, _ready(upstream), holder, origin=origin)
        if opened == rk.CANCEL_ASKED:
            # The caller cancelled it on another edge while its server was opening it.
            upstream.cancel()
            generation.cancel()
        return RedisStream(self, request_id, holder, reservation=reservation)

    async def get(self, request_id: str, owner: str | None) -> RedisStream:
        """The caller's stream, with a seat for its reader, and held for it until it attaches
        (ATTACH_S at most): a 503 when this edge's readers fill the bound, answered before any
        call to the store."""
        seat = self.seats.admit()
        reservation = self.reservation()
        try:
            held, instance = await self._find(request_id, owner, reservation)
        except BaseException:
            seat.release()
            raise
        return RedisStream(self, request_id, instance, seat, reservation if held else None)

    async def _find(
        self, request_id: str, owner: str | None, reservation: str = ""
    ) -> tuple[bool, str | None]:
        """Whether `reservation` now holds the caller's stream (it is stored, open or done),
        and the stream's instance; 404 or 410 where it is not."""
        keys = Keys.of(request_id)
        found, instance = await self.redis(
            self.scripts["FIND"](
                keys=[keys.meta, keys.gone, keys.watch],
                args=[_principal(owner), reservation, ATTACH_MS],
                client=self.reads,
            )
        )
        if found in (rk.FOUND, rk.HELD):
            return found == rk.HELD, text_of(instance)
        if found == rk.EXPIRED:
            raise expired_stream(request_id)
        raise unknown_stream(request_id)

    async def cancel(self, request_id: str, owner: str | None) -> bool:
        """The caller's stream ended now (see ResumeStore.cancel); one still opening, on
        another edge, as soon as it opens (True at once: the cancel is kept with its claim)."""
        meta = Keys.of(request_id).meta
        opening: int = await self.redis(
            self.scripts["CANCEL_OPENING"](keys=[meta], args=[_principal(owner)], client=self.reads)
        )
        if opening == rk.FOREIGN:
            raise unknown_stream(request_id)
        if opening:
            return True
        await self._find(request_id, owner)
        generation = self._generations.get(request_id)
        if generation is not None:
            return await generation.cancel_at_server()
        # Another edge generates it: it sees the flag at its next event or lease refresh. If
        # that edge is gone, taking the stream over ends it (the flag is seen there too).
        if not await self.redis(self.script("ASK_CANCEL", [Keys.of(request_id).meta], [])):
            return False  # the stream had ended
        await self.redis(self.take_over(request_id))
        return True

    async def take_over(self, request_id: str) -> None:
        """Continue a stream whose edge's lease lapsed, if this edge wins its lease. Never one
        this edge still generates: a generation stays registered until its call to the server
        has ended, whatever ended it."""
        keys = Keys.of(request_id)
        if request_id in self._generations:
            return
        holder = self.holder()
        if not await self.script("TAKE", [keys.lease, keys.meta], [holder, self.lease_ms]):
            return
        pipe = self.writes.pipeline(transaction=False)
        pipe.hgetall(keys.meta)
        pipe.get(keys.ids)
        pipe.xrevrange(keys.events, count=1)
        meta, packed, last = await pipe.execute()
        last_seq, last_name = _seq_and_name(last[0]) if last else (0, "")
        if meta.get(b"state") != b"open" or last_name in rk.TERMINAL:
            await self.script("RELEASE_LEASE", [keys.lease], [holder])
            return
        request = pb.GenerateRequest.FromString(meta[b"request"])
        packed = packed or b""
        budget, model = meta.get(b"budget", b"").decode(), meta.get(b"model", b"").decode()
        delivered = Delivered(
            ids=struct.unpack(f"<{len(packed) // 4}I", packed),
            seed=int(meta[b"seed"]) if meta.get(b"seed") else None,
            budget=int(budget) if budget else None,
            # The continuation must run on the model whose tokens were stored (a stream begun
            # before the edges stored it continues unchecked).
            model=ServedModel.of_header(model),
            # Its edge died between its Usage and its Completion: a continuation that
            # generates on shows the stream had been cancelled, and ends it so.
            usage=last_name == "usage",
        )
        log.info(
            "edge.stream_taken_over",
            request_id=request_id,
            after_seq=last_seq,
            tokens=len(delivered.ids),
        )

        async def reopen() -> UpstreamStream:
            owner = _owner(meta.get(b"principal"))
            return await _continued(self.upstream, request, request_id, delivered, owner)

        # With nothing delivered, the server that accepts the continuation gives the stream
        # its budget and model: stored with its first token.
        fresh = not delivered.ids and not delivered.usage
        origin = (budget, model) if fresh else None
        generation = self._start(request_id, last_seq + 1, reopen, holder, origin=origin)
        if meta.get(b"cancel"):
            generation.cancel()

    def _start(
        self,
        request_id: str,
        next_seq: int,
        opener: Opener,
        holder: str,
        *,
        origin: tuple[str, str] | None,
    ) -> Generation:
        generation = Generation(self, request_id, next_seq, opener, holder, origin=origin)
        self._generations[request_id] = generation
        return generation

    def ended(self, generation: Generation) -> None:
        if self._generations.get(generation.request_id) is generation:
            del self._generations[generation.request_id]
            self.held -= generation.bytes

    def failed(self, request_id: str, error: EdgeError) -> None:
        """This edge's generation of the stream failed: its readers here end with `error`."""
        tail = self.tails.get(request_id)
        if tail is not None:
            tail.fail(made_up(self, error))

    def attach(self, request_id: str, after_seq: int, instance: str | None) -> Tail:
        """A reader of the stream joins this edge's tail of it (a new one if it has none, or
        one of another stream that had the id before)."""
        tail = self.tails.get(request_id)
        if tail is None or not tail.running or tail.instance != instance:
            tail = self.tails[request_id] = Tail(self, request_id, after_seq, instance)
        tail.readers += 1
        return tail

    def detach(self, tail: Tail) -> None:
        """A reader left; the last one stops the tail, and this edge no longer reads it."""
        tail.readers -= 1
        if tail.readers > 0:
            return
        tail.stop()
        if self.tails.get(tail.request_id) is tail:
            del self.tails[tail.request_id]
            # A reader that comes at once marks it again; a mark lost meanwhile is back within
            # a third of a lease, far within the window that abandoning a stream needs.
            self.spawn(quietly(self.reads.zrem(tail.keys.watch, self.edge)))

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
        for tail in self.tails.values():
            tail.stop()
        renewals = [renewing for _, renewing in self._claimed.values()]
        for renewing in renewals:
            renewing.cancel()  # an opening cut short: its claim lapses by itself
        tasks = [t for g in self._generations.values() for t in g.tasks] + list(self._background)
        tasks += [tail.task for tail in self.tails.values()] + renewals
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in (self.writes, self.reads, self.waits):
            await client.aclose()


async def _continued(
    upstream: Upstream,
    request: pb.GenerateRequest,
    request_id: str,
    delivered: Delivered,
    owner: str | None,
) -> UpstreamStream:
    """The continuation of a taken-over stream. The generation it continues may still run at
    the server (its edge stopped it a moment ago, and the server ends it at its next step):
    the continuation, a retry, replaces it there. A server that predates `retry` refuses one
    without delivered ids for the id, which is tried again, BUSY_TRIES_S apart."""
    for wait_s in BUSY_TRIES_S:
        try:
            return await upstream.open(request, request_id, delivered, route=NATIVE, owner=owner)
        except EdgeError as error:
            if error.param != "request_id":
                raise
            await asyncio.sleep(wait_s)
    return await upstream.open(request, request_id, delivered, route=NATIVE, owner=owner)


def _ready(upstream: UpstreamStream) -> Opener:
    async def opened() -> UpstreamStream:
        return upstream

    return opened


def _seq_and_name(entry: Entry) -> tuple[int, str]:
    event = stored_event(entry)
    return event.seq, event.name
