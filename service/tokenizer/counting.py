"""Token counting on request: a text's ids exactly as the engine encodes a prompt, the text of
ids, and the bound on long inputs queued on the engine's tokenizer thread, where they run so
that the event loop serves other calls meanwhile."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

from tokenwire.server.domain import (
    DetokenizeRequest,
    Overloaded,
    TokenizeRequest,
    Tokens,
    Unavailable,
)
from tokenwire.server.tokenizer.tokenizer import Tokenizer

T = TypeVar("T")


def tokenize(tokenizer: Tokenizer, request: TokenizeRequest, *, released: bool = False) -> Tokens:
    """request.text's ids as the engine encodes a prompt: Tokenizer.encode, or with `released`
    (on a worker thread) the same ids from `encode_batch_fast`, which releases the GIL while it
    runs, as the engine tokenizes long prompts. With pieces, each token's own text and bytes,
    as a generated token's token_text and token_bytes give them."""
    if released:
        [encoding] = tokenizer.inner.encode_batch_fast(
            [request.text], add_special_tokens=request.add_special_tokens
        )
        ids = tuple(encoding.ids)
    else:
        ids = tuple(tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens))
    if not request.with_pieces:
        return Tokens(ids)
    pieces = tuple(tokenizer.token_text(token_id) for token_id in ids)
    return Tokens(ids, pieces, tuple(tokenizer.token_bytes(token_id) for token_id in ids))


def detokenize(tokenizer: Tokenizer, request: DetokenizeRequest) -> str:
    """The tokenizer's decode of the ids (`decode_batch` releases the GIL while it runs)."""
    [text] = tokenizer.inner.decode_batch(
        [list(request.token_ids)], skip_special_tokens=request.skip_special_tokens
    )
    return str(text)


class LongInputs:
    """Long Tokenize and Detokenize inputs queued on the engine's tokenizer thread, behind and
    among its long prompts: one thread for every long input, so none takes more than its one
    core from the decode thread. A caller that leaves takes its queued input out.

    At most `limit` of these inputs wait or run at once: one more is Overloaded at once, so a
    flood of long texts is refused instead of queueing (and holding its memory) without bound."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = 0
        self._closed = False

    async def run(
        self,
        job: Callable[[], T],
        submit: Callable[[Callable[[], T]], concurrent.futures.Future[T]],
        *,
        limit: int,
        retry_after_s: float,
    ) -> T:
        """job's result from the thread `submit` queues it on. Overloaded where `limit` inputs
        are held already, Unavailable once shut down (here, or by the thread's owner)."""
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if self._held >= limit:
                raise Overloaded(
                    f"{self._held} long inputs already wait for the tokenizer; retry later",
                    retry_after_s,
                )
            pending = submit(job)
            self._held += 1
        # Released when the job ends or leaves the queue, not when its caller stops waiting:
        # a job the thread has begun still holds its place until it is done.
        pending.add_done_callback(self._release)
        try:
            return await asyncio.wrap_future(pending)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if pending.cancelled() and not (task is not None and task.cancelling()):
                raise Unavailable("the server is shutting down") from None  # shutdown dropped it
            raise

    def _release(self, done: object) -> None:
        with self._lock:
            self._held -= 1

    def shutdown(self) -> None:
        """Later inputs are Unavailable (the thread's owner drops those still queued)."""
        with self._lock:
            self._closed = True
