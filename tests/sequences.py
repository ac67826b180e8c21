"""One request's Sequence, built as the engine builds it but without an engine, and what its
stream says: for tests of the text a stream carries, token by token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from tokenwire.server.domain import (
    CompletionEvent,
    Event,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    UsageEvent,
)
from tokenwire.server.engine.mailbox import Mailbox
from tokenwire.server.engine.sampling import Sampler
from tokenwire.server.engine.sequence import Sequence
from tokenwire.server.tokenizer import TextStream, Tokenizer


def sequence(
    loop: asyncio.AbstractEventLoop,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    *,
    max_tokens: int = 16,
    eos_ids: frozenset[int] = frozenset(),
    sampling: SamplingParams | None = None,
    request_id: str = "r",
    **fields: object,
) -> Sequence:
    """A request for prompt_ids, greedy unless `sampling` says otherwise (any other
    GenerationRequest field in `fields`)."""
    sampling = sampling or SamplingParams(temperature=0.0)
    request = GenerationRequest(
        request_id,
        "",
        max_tokens=max_tokens,
        sampling=sampling,
        prompt_ids=tuple(prompt_ids),
        **fields,  # type: ignore[arg-type]
    )
    return Sequence(
        request=request,
        prompt_ids=list(prompt_ids),
        budget=max_tokens,
        eos_ids=eos_ids,
        sampler=Sampler(sampling),
        text=TextStream.create(tokenizer, request.stop),
        mailbox=Mailbox(loop),
    )


def accept_all(seq: Sequence, ids: Iterable[int]) -> list[Event]:
    """Feed ids as the model's choices until the request ends; the events it queued."""
    for token_id in ids:
        if seq.finished:
            break
        seq.accept(token_id, None, time.monotonic())
    return seq.take_events()


def deltas(events: list[Event]) -> list[str]:
    return [e.text for e in events if isinstance(e, TokenEvent)]


def completion(events: list[Event]) -> CompletionEvent | None:
    return next((e for e in events if isinstance(e, CompletionEvent)), None)


def usage(events: list[Event]) -> UsageEvent | None:
    return next((e for e in events if isinstance(e, UsageEvent)), None)
