"""The places requests hold in the engine's capacity before they run: long prompts waiting for
the tokenizer, and requests a retry of their id replaced."""

from __future__ import annotations

import dataclasses
from collections.abc import Container, Iterable


@dataclasses.dataclass(eq=False)
class Tokenizing:
    """A request whose long prompt waits for the tokenizer thread: it holds a place in the
    capacity, and Cancel (or a newer retry of its id) can end it before it runs."""

    request_id: str
    goes_on: bool
    """A retry or continuation: it takes the place of its id's running request, if any."""
    cancelled: bool = False
    """Ended before it ran: once tokenized, it ends at once as cancelled, replacing nothing."""
    order: int = 0
    """When it arrived, among the engine's requests: of an id's retries, the newest wins."""


def tokenizing_places(waiting: Iterable[Tokenizing], running: Container[str]) -> int:
    """The places the requests waiting for the tokenizer hold: one each, but none for the
    first retry of an id that is running, which takes that request's place (a cancelled one
    will not: it holds a place of its own until it has ended)."""
    taken: set[str] = set()
    places = 0
    for entry in waiting:
        free = entry.goes_on and not entry.cancelled and entry.request_id not in taken
        if free and entry.request_id in running:
            taken.add(entry.request_id)
        else:
            places += 1
    return places


def claims(waiting: Iterable[Tokenizing], request_id: str, before: int | None = None) -> bool:
    """Whether a request of this id waits for the tokenizer, not cancelled (and arrived
    `before` that order, where given): its id is taken, as a running request's is."""
    return any(
        entry.request_id == request_id
        and not entry.cancelled
        and (before is None or entry.order < before)
        for entry in waiting
    )


def cancel_tokenizing(
    waiting: Iterable[Tokenizing], request_id: str, before: int | None = None
) -> bool:
    """Mark the id's requests waiting for the tokenizer cancelled (only those that arrived
    `before` that order, where given); whether there was one."""
    found = False
    for entry in waiting:
        older = before is None or entry.order < before
        if entry.request_id == request_id and older and not entry.cancelled:
            entry.cancelled = found = True
    return found
