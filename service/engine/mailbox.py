"""Per-request event delivery from the decode thread to an asyncio consumer.

The decode loop never waits on a consumer: publish() only schedules a put on the consumer's
event loop. A mailbox holds at most max_tokens + 2 events, so a slow reader costs bounded memory
and never slows the batch.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Sequence

from tokenwire.server.domain import CompletionEvent, EngineStopped, Event

# EngineStopped is a domain error now; re-exported for the engine modules that import it here.
__all__ = ["Delivery", "EngineStopped", "Mailbox", "publish_all"]


Delivery = Sequence[Event] | BaseException


class Mailbox:
    """Carries one request's events; iterate it on the loop that created it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()

    def deliver(self, item: Delivery) -> None:
        """Called on the mailbox's loop (see publish_all)."""
        self._queue.put_nowait(item)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            for event in item:
                yield event
                if isinstance(event, CompletionEvent):
                    return


def publish_all(
    deliveries: list[tuple[Mailbox, Delivery]], handed: threading.Event | None = None
) -> None:
    """Hand a step's events to their consumers with one wake-up per event loop. `handed` is
    set once a loop's consumers have run with them (each has passed its events on, e.g. to
    its gRPC call) or at once if no loop is left to take them."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Mailbox, Delivery]]] = {}
    for mailbox, item in deliveries:
        by_loop.setdefault(mailbox.loop, []).append((mailbox, item))
    scheduled = False
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver_batch, loop, batch, handed)
            scheduled = True
        except RuntimeError:
            # The consumer's loop is closed: nobody is left to read these events.
            continue
    if handed is not None and not scheduled:
        handed.set()


def _deliver_batch(
    loop: asyncio.AbstractEventLoop,
    batch: list[tuple[Mailbox, Delivery]],
    handed: threading.Event | None,
) -> None:
    for mailbox, item in batch:
        mailbox.deliver(item)
    if handed is not None:
        # Queued behind the consumers each delivery has just woken: runs once they have.
        loop.call_soon(handed.set)


class Publisher:
    """Hands deliveries to their event loops from a thread of its own.

    Waking an event loop (`call_soon_threadsafe`) writes to its self-pipe; the woken loop then
    takes the GIL to write the tokens, and a thread that still needs the GIL right after the
    write waits for it. The decode thread only queues the step's deliveries here and goes
    straight into ONNX Runtime, which releases the GIL: the wake-up and the consumers' work
    overlap with the model step instead of delaying it. Deliveries keep their order.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[
            tuple[list[tuple[Mailbox, Delivery]], threading.Event | None] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tokenwire-publish", daemon=True)
        self._thread.start()

    def submit(
        self, deliveries: list[tuple[Mailbox, Delivery]], handed: threading.Event | None = None
    ) -> None:
        """Queue a step's deliveries; `handed`, if given, is set once their consumers have run
        with them (see publish_all)."""
        self._queue.put((deliveries, handed))

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            publish_all(*item)
