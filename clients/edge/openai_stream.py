"""The OpenAI stream encoder: the pipeline's events of `n` choices as OpenAI's chunks.

Content deltas (choices interleaved, each chunk naming its choice's `index`), then per choice a
chunk with an empty delta and the finish_reason, then (with stream_options.include_usage) a
chunk with `choices: []` and `usage`, then `data: [DONE]`. An upstream failure, or a choice cut
short (a deadline, a cancel: OpenAI has no finish_reason for those), ends the stream with one
chunk holding OpenAI's error object instead (tokenwire.edge.openai_format.openai_error).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from sse_starlette import ServerSentEvent

from tokenwire.client.messages import StreamEvent, Token, Usage
from tokenwire.edge.accounting import failed
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.metrics import Outcome
from tokenwire.edge.openai_format import (
    Shape,
    TextOffsets,
    finish_reason,
    openai_error,
    usage,
)
from tokenwire.edge.pipeline import Frame, merged, sse_event
from tokenwire.edge.upstream import UpstreamStream


class Chunks:
    """Turns each choice's events into stream chunks, remembering what usage needs."""

    def __init__(self, shape: Shape, choices: int, include_usage: bool, n: int = 1) -> None:
        self.shape = shape
        self.n = n
        self.include_usage = include_usage
        self.first = [True] * choices
        # A choice's token whose text no chunk carried yet: the choice's next chunk carries it
        # (its text, or its end), which is when the client sees that token (TTFT).
        self.owed = [False] * choices
        self.usages: list[Usage | None] = [None] * choices
        # Each choice's next text_offset, counted as a whole response counts it.
        self.offsets = [TextOffsets() for _ in range(choices)]

    def of(self, index: int, event: StreamEvent) -> list[Frame]:
        """The frames an event makes: none for usage; a chat choice's role chunk before its
        first; then the token's or the finish's. A token that adds no text (an end-of-sequence
        token, or text held back until a stop string is ruled out or a character completes)
        makes no chunk unless it carries logprobs: OpenAI and vLLM send no empty deltas."""
        if isinstance(event, Usage):
            self.usages[index] = event
            return []
        frames = []
        if self.first[index] and self.shape.chat:
            frames.append(Frame(self._chunk(self.shape.role(index))))
        self.first[index] = False
        if isinstance(event, Token):
            offset = self.offsets[index].of(event)
            if event.text or event.logprob is not None:
                delta = self.shape.delta(index, event, None, offset)
                frames.append(Frame(self._chunk(delta), token=True))
                self.owed[index] = False
            else:
                self.owed[index] = True
        else:
            delta = self.shape.delta(index, None, finish_reason(event))
            frames.append(Frame(self._chunk(delta), token=self.owed[index]))
        return frames

    def _chunk(self, choice: dict[str, Any]) -> ServerSentEvent:
        body = self.shape.envelope([choice], chunk=True)
        if self.include_usage:
            body["usage"] = None
        return sse_event(_json(body))

    def usage(self) -> ServerSentEvent:
        body = self.shape.envelope([], chunk=True) | {"usage": usage(self.usages, self.n)}
        return sse_event(_json(body))


async def openai_frames(
    shape: Shape, upstreams: Sequence[UpstreamStream], include_usage: bool, n: int = 1
) -> AsyncGenerator[Frame, None]:
    """The chunks of every choice (`n` per prompt), then usage and [DONE] (outcome completed);
    or the error chunk (outcome the error's: cancelled, deadline_exceeded or upstream_error).
    However it ends, every choice's upstream call ends with it."""
    chunks = Chunks(shape, len(upstreams), include_usage, n)
    try:
        async with contextlib.aclosing(merged(upstreams)) as events:
            async for index, event in events:
                for frame in chunks.of(index, event):
                    yield frame
        if include_usage:
            yield Frame(chunks.usage())
        yield Frame(sse_event("[DONE]"), outcome=Outcome.COMPLETED)
    except EdgeError as error:
        error = openai_error(error)
        yield Frame(sse_event(_json(error.openai_body())), outcome=failed(error.code))
    finally:
        for upstream in upstreams:
            upstream.cancel()


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))
