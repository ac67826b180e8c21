"""How an edge shares its Redis connections out, and the bound on its readers that keeps the
shares apart (tokenwire.edge.redis_store).

An edge opens at most `connections` (MAX_CONNECTIONS) to the resume store, in three pools whose
calls wait for a free connection, in turn, rather than fail (`WaitingPool`):

- writes (SHORT_CONNECTIONS at most): the streams the edge opens and generates, every event's
  append, the leases' refreshes, claims and take-overs. Readers never use it, so no number of
  readers can stall a generation or let its lease lapse;
- reads (SHORT_CONNECTIONS at most): readers' short calls: a resume's lookups, catch-up reads,
  the checks of a stream that went quiet. Small on purpose: a flood of resumes queues for a
  few connections (each call takes well under a millisecond) instead of opening thousands at
  once, which Redis cannot accept fast enough;
- waits, the rest: the one blocking read (XREAD BLOCK) that the readers of a stream on this edge
  share (tokenwire.edge.redis_readers), which holds a connection while it waits.

Readers are admitted up to `followers`, a quarter of the waits' pool below its size (a reader
may be the only one of its stream): that quarter keeps room for the first reader of each
stream this edge opens, which is never refused (the server's capacity bounds those). A resume
beyond the bound is refused before its response starts: 503 with Retry-After, counted as
`rejected` like any refusal, and logged as `edge.readers_at_capacity` (one line per interval,
as the connection cap's refusals are: tokenwire.edge.connections.Tally).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from tokenwire.edge.connections import Tally
from tokenwire.edge.errors import EdgeError

MAX_CONNECTIONS = 4096
"""Redis connections one edge opens at most, its pools together (Redis' default `maxclients`,
10,000, is shared by every edge)."""
SHORT_CONNECTIONS = 64
"""The writes' pool and the reads' pool each: a short call takes well under a millisecond, so
64 carry tens of thousands of them a second, more than one Redis serves."""
RETRY_AFTER_S = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class Pools:
    """The sizes of an edge's pools, and how many readers it admits."""

    writes: int
    reads: int
    waits: int
    followers: int
    """Readers attached at once on this edge (the first readers of its own streams count, but
    are never refused)."""

    @classmethod
    def within(cls, connections: int = MAX_CONNECTIONS) -> Pools:
        """The shares of `connections` (at least 8): a quarter, and SHORT_CONNECTIONS at most,
        for the writes and for the reads each; the rest for the waits, of which a quarter is
        room."""
        if connections < 8:
            raise ValueError(f"connections must be at least 8, got {connections}")
        short = min(SHORT_CONNECTIONS, connections // 4)
        waits = connections - 2 * short
        return cls(short, short, waits, waits - waits // 4)


class WaitingPool(aioredis.ConnectionPool):
    """A pool whose callers wait for a free connection, first come first served, up to
    `wait_s`, then fail (ConnectionError, a RedisError). redis-py's plain pool fails at once
    at its limit; its BlockingConnectionPool wakes waiters through one lock that every caller
    and every release takes, so a few thousand waiters make each release wait behind them all."""

    def __init__(self, *, wait_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wait_s = wait_s
        self._free = asyncio.Semaphore(self.max_connections)

    async def get_connection(
        self, command_name: str | None = None, *keys: Any, **options: Any
    ) -> AbstractConnection:
        try:
            async with asyncio.timeout(self.wait_s):
                await self._free.acquire()
        except TimeoutError:
            raise RedisConnectionError("No connection available.") from None
        # Never past the limit here: each connection in use holds one of the semaphore's.
        # redis-py leaves this method unannotated; it returns the pool's connection class.
        connection: AbstractConnection = self.get_available_connection()  # type: ignore[no-untyped-call]
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        try:
            await super().release(connection)
        finally:
            self._free.release()


def waiting_client(url: str, connections: int, wait_s: float) -> aioredis.Redis:
    """A client of its own WaitingPool; RESP2, which pins the shapes of the replies read."""
    pool = WaitingPool.from_url(url, max_connections=connections, wait_s=wait_s, protocol=2)
    return aioredis.Redis.from_pool(pool)


class Seat:
    """One reader's place among the edge's readers, given back once."""

    __slots__ = ("_seats",)

    def __init__(self, seats: Seats) -> None:
        self._seats: Seats | None = seats

    def release(self) -> None:
        if self._seats is not None:
            self._seats.taken -= 1
            self._seats = None


class Seats:
    """The edge's readers of stored streams, bounded by `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self.refusals = Tally("edge.readers_at_capacity")

    def admit(self) -> Seat:
        """A seat for a resume; EdgeError 503 when the readers fill the bound."""
        if self.taken >= self.limit:
            self.refusals.count(readers=self.taken, limit=self.limit)
            raise EdgeError(
                503,
                "UNAVAILABLE",
                f"this edge serves as many stream readers as it can ({self.limit}); "
                "resume later or on another edge",
                retry_after_s=RETRY_AFTER_S,
            )
        return self.take()

    def take(self) -> Seat:
        """A seat whatever the bound: the first reader of a stream this edge opens."""
        self.taken += 1
        return Seat(self)
