"""Read a blocking gRPC stream with every wait bounded.

grpc's sync stream can leave its reader waiting after the call has ended: a call that a
draining server refuses as it goes away can end with UNAVAILABLE while the operations that
read its header and messages never complete, so `initial_metadata()` and `next()` wait forever,
past the call's deadline (grpc.aio does not do this). So a daemon thread reads the call, and the
caller waits on a queue that the call's end reaches too: once the call has ended with an error,
the reader gets a short grace for messages already on their way, then the call's own error is
raised. No wait lasts past the deadline (plus that grace).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar, cast

import grpc

from tokenwire.client.errors import DeadlineExceeded

GRACE_S = 0.5
"""How long an ended call's reader may still deliver before the call's error is raised."""

_FINISHED = object()
"""The reader's last item after every message of a call that ended with OK."""
_ENDED = object()
"""The call's done-callback: its status is known."""

T = TypeVar("T")


Header = Callable[[Sequence[tuple[str, str | bytes]]], None]


@dataclasses.dataclass(frozen=True, slots=True)
class _Header:
    metadata: Sequence[tuple[str, str | bytes]]


def messages(
    call: grpc._CallIterator[T], deadline: float, on_header: Header | None = None
) -> Iterator[T]:
    """The call's messages; the call (a grpc.RpcError) raised when it failed, DeadlineExceeded
    when neither a message nor its end came by `deadline` (time.monotonic()). With
    `on_header`, the call's initial metadata goes to it first, before any message or error
    (a stream that breaks before its first message was still accepted: a retry says so)."""
    inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
    reader = threading.Thread(
        target=_read,
        args=(call, inbox, on_header is not None),
        name="tokenwire-stream",
        daemon=True,
    )
    reader.start()
    _notice_end(call, inbox)
    failed = False
    while True:
        wait = GRACE_S if failed else max(0.0, deadline - time.monotonic()) + GRACE_S
        try:
            item = inbox.get(timeout=wait)
        except queue.Empty:
            if failed:
                raise cast(grpc.RpcError, call) from None  # a failed call is its own error
            call.cancel()
            raise DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the stream neither went on nor ended"
            ) from None
        if item is _FINISHED:
            return
        if isinstance(item, _Header):
            assert on_header is not None
            on_header(item.metadata)
        elif item is _ENDED:
            failed = call.code() is not grpc.StatusCode.OK
        elif isinstance(item, grpc.RpcError):
            raise item
        else:
            yield cast(T, item)


def _notice_end(call: grpc._CallIterator[T], inbox: queue.SimpleQueue[object]) -> None:
    try:
        registered = call.add_callback(lambda: inbox.put(_ENDED))
    except NotImplementedError:  # grpc_testing's calls: only their deadline bounds them
        return
    if not registered:
        inbox.put(_ENDED)  # it had ended already


def _read(call: grpc._CallIterator[T], inbox: queue.SimpleQueue[object], header: bool) -> None:
    try:
        if header:
            # A call refused before its header may never complete this read (see above): the
            # caller's wait ends with the call's end, as it does for a message.
            inbox.put(_Header(tuple(call.initial_metadata() or ())))
        for message in call:
            inbox.put(message)
    except grpc.RpcError as error:
        inbox.put(error)
    else:
        inbox.put(_FINISHED)
