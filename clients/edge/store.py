"""Where the edge keeps native streams for `Last-Event-ID` resumes: one small protocol, two
stores behind it.

- `ResumableStreams` (tokenwire.edge.resumable), the default: this edge's memory. A resume must
  reach the edge that started the stream; it dies with that edge.
- `RedisStreams` (tokenwire.edge.redis_store), with `--resume-store redis://host:port/db`: every
  edge replica reads and writes the same streams, so a resume may land on any of them, and when
  a stream's edge dies another one continues the generation from what the store holds.

Both answer an id that is unknown, or that belongs to another principal, with the same 404, an
expired one with 410 (to its own principal), and a still-resumable one reused with 409; a
resume's seq is checked against `StoredStream.bounds` before its response starts (native.py):
410 when the events after it are no longer kept, 400 when it is past the newest event, 204
(no content: EventSource stops reconnecting) when it names the event that ended the stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from tokenwire.edge.resumable import BufferedEvent, Encode, ResumableStreams
from tokenwire.edge.settings import EdgeSettings
from tokenwire.edge.upstream import Upstream, UpstreamStream


class StoredStream(Protocol):
    """One stream as a reader sees it."""

    @property
    def request_id(self) -> str: ...

    @property
    def followers(self) -> int:
        """Readers attached on this edge now."""
        ...

    async def bounds(self) -> tuple[int, int, bool]:
        """(the oldest seq still kept, the newest seq stored, 0 before the first event;
        whether that one ended the stream): what a resume may name, checked before its
        response starts."""
        ...

    def follow(self, after_seq: int) -> AsyncGenerator[BufferedEvent, None]:
        """Events with seq > after_seq, live, until the stream's `done` or `error`; an `error`
        (410, seq 0) when events this reader lacks are no longer kept."""
        ...

    def leave_unread(self) -> None:
        """The resume that got this stream will not read it (it was answered 204, or refused):
        what the store held for its reader is given back."""
        ...


class ResumeStore(Protocol):
    """Every native stream an edge can serve a resume for."""

    async def claim(self, request_id: str, owner: str | None = None) -> None:
        """Reserve an id for the caller `owner` before the upstream call; EdgeError 409 while
        it is resumable."""
        ...

    async def release(self, request_id: str) -> None:
        """Give a claimed id back (a no-op once `open` used it)."""
        ...

    async def open(
        self, upstream: UpstreamStream, request_id: str, owner: str | None
    ) -> StoredStream:
        """Keep the events of an accepted upstream stream, under its claimed id."""
        ...

    async def get(self, request_id: str, owner: str | None) -> StoredStream:
        """The caller's stream; 404 for an unknown or foreign id, 410 for an expired one. The
        Redis store answers 503 instead when this edge serves as many readers as it may
        (tokenwire.edge.redis_pools): a resume is refused before its response starts."""
        ...

    async def cancel(self, request_id: str, owner: str | None) -> bool:
        """End the caller's stream now: its readers get `done` with reason cancelled. False
        where it had already ended (the stream is kept for resumes as it was)."""
        ...

    @property
    def live(self) -> int:
        """Streams this edge is generating."""
        ...

    @property
    def bytes(self) -> int:
        """Event bytes this edge holds for its streams."""
        ...

    def cancel_all(self) -> None:
        """Cancel every stream this edge is generating (the end of a drain)."""
        ...

    async def close(self) -> None: ...


def resume_store(
    settings: EdgeSettings,
    upstream: Upstream,
    encode: Encode,
) -> ResumeStore:
    """The store the settings name (memory by default, Redis with a redis:// URL), keeping
    events in the format `encode` gives them."""
    if not settings.resume_store:
        return ResumableStreams(
            settings.resume_window_s,
            settings.resume_stream_bytes,
            settings.resume_total_bytes,
            encode,
        )
    # Imported here: an edge without a resume store never loads the Redis client.
    from tokenwire.edge.redis_store import RedisStreams

    return RedisStreams(settings, upstream, encode)
