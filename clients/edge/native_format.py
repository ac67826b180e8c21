"""The native SSE format: pipeline events -> named events, and stored events -> frames.

Events: `token` {text, id, index, logprob?, token_text?, token_bytes?, top_logprobs?} (bytes
as lists of ints, as OpenAI's logprobs `bytes`), `usage` {...}, `done`
{finish_reason, stop_sequence}, `error` {code, status, message, field?}. Each is encoded once,
when the resume store keeps it; every reader (the first one and each resume) gets the stored
text, with `id: <request_id>:<seq>`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any

from tokenwire.client.messages import Completion, StreamEvent, Token, TopLogprob, Usage
from tokenwire.edge.accounting import failed, finished
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.logprob_json import finite_logprob, listed_alternatives
from tokenwire.edge.metrics import Outcome
from tokenwire.edge.pipeline import Frame, sse_event
from tokenwire.edge.resumable import BufferedEvent
from tokenwire.edge.store import StoredStream


def ending(event: BufferedEvent) -> Outcome | None:
    """The outcome a stored event ends its stream with (None: it ends nothing): by the `done`
    event's finish reason or the `error` event's code, as on the OpenAI routes."""
    if event.name == "done":
        return finished(json.loads(event.data)["finish_reason"])
    if event.name == "error":
        return failed(json.loads(event.data)["code"])
    return None


def native_event(event: StreamEvent | EdgeError) -> tuple[str, dict[str, Any]]:
    """One pipeline event (or the error that ends the stream) as an event name and its data."""
    if isinstance(event, EdgeError):
        return "error", event.native_body()["error"]
    if isinstance(event, Token):
        data: dict[str, Any] = {"text": event.text, "id": event.id, "index": event.index}
        if event.logprob is not None:
            data["logprob"] = finite_logprob(event.logprob)
        if event.token_text is not None:
            data["token_text"] = event.token_text
        if event.token_bytes is not None:
            data["token_bytes"] = list(event.token_bytes)
        if event.top_logprobs:
            data["top_logprobs"] = [
                _alternative(t) for t in listed_alternatives(event.top_logprobs)
            ]
        return "token", data
    if isinstance(event, Usage):
        return "usage", {
            "prompt_tokens": event.prompt_tokens,
            "completion_tokens": event.completion_tokens,
            "total_tokens": event.total_tokens,
            "queue_time_ms": event.queue_time_ms,
            "time_to_first_token_ms": event.time_to_first_token_ms,
            "decode_time_ms": event.decode_time_ms,
            "total_time_ms": event.total_time_ms,
            "request_id": event.request_id,
        }
    assert isinstance(event, Completion)
    return "done", {"finish_reason": event.finish_reason, "stop_sequence": event.stop_sequence}


def _alternative(alternative: TopLogprob) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": alternative.id,
        "logprob": alternative.logprob,
        "text": alternative.text,
    }
    if alternative.token_bytes is not None:
        data["token_bytes"] = list(alternative.token_bytes)
    return data


async def native_frames(stream: StoredStream, after: int) -> AsyncGenerator[Frame, None]:
    """The stored events after seq `after`, live, as SSE frames; `done` and `error` end it."""
    async with contextlib.aclosing(stream.follow(after)) as events:
        async for event in events:
            # seq 0: an event this edge made up (the store failed), which no resume can name.
            event_id = f"{stream.request_id}:{event.seq}" if event.seq else None
            yield Frame(
                sse_event(event.data, event=event.name, event_id=event_id),
                token=event.name == "token",
                outcome=ending(event),
            )
