"""One request's generation state inside the engine."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time

from tokenwire.server.domain import (
    CompletionEvent,
    Event,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    TokenEvent,
    TopLogprob,
    UsageEvent,
)
from tokenwire.server.engine.kv_cache import BatchKvCache
from tokenwire.server.engine.mailbox import EngineStopped, Mailbox
from tokenwire.server.engine.observer import RequestRecord
from tokenwire.server.engine.sampling import Sampler
from tokenwire.server.engine.slot_cache import SlotPrefill
from tokenwire.server.tokenizer import TextStream

_NEVER = 1 << 62
"""A generated length no request reaches."""


@dataclasses.dataclass(eq=False, slots=True)
class Sequence:
    """Prompt, generated ids, text pipeline and timings of one request."""

    request: GenerationRequest
    prompt_ids: list[int]
    """The prompt as tokenized: what Usage.prompt_tokens counts."""
    budget: int
    eos_ids: frozenset[int]
    sampler: Sampler
    text: TextStream
    mailbox: Mailbox
    arrived_at: float = dataclasses.field(default_factory=time.monotonic)
    generated: list[int] = dataclasses.field(default_factory=list)
    prefilled: int = 0
    cache: BatchKvCache | SlotPrefill | None = None
    """The cache of a prompt being prefilled in chunks, between its chunks."""
    scheduled_at: float | None = None
    closed_at: float | None = None
    """When its usage was taken (its end, as its caller's Usage times it)."""
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    outbox: list[Event] = dataclasses.field(default_factory=list)
    error: EngineStopped | None = None
    """Set when the engine failed this request; delivered after the queued events."""
    solo: bool = False
    """Prefill this request alone (a group prefill that included it failed)."""
    context_ids: list[int] = dataclasses.field(default_factory=list)
    """The prompt, then the tokens a continued generation already has."""
    prefill_end: int = dataclasses.field(init=False)
    """How many of context_ids the prefill feeds: all of them, or only the prompt where the
    continuation's ids go in one per forward, in decode steps beside the running rows
    (Placement.feeds_in_decode); `prefilled` then goes on counting them there."""
    reservation: int = dataclasses.field(init=False)
    """KV-cache entries this request may need: its prompt plus its token budget."""
    stop_ids: frozenset[int] = dataclasses.field(init=False)
    """Ids that end the generation: EOS (unless ignored) and the request's stop token ids."""
    argmax_from: int = dataclasses.field(init=False)
    """From this many generated tokens on, the next token is the step's plain argmax (greedy,
    nothing changes the logits, nothing suppressed); a huge number if never."""
    scores_until: int = dataclasses.field(init=False)
    """Below this many generated tokens the row needs the step's whole distribution (it
    samples, adjusts or suppresses, or reports logprobs); 0 if never."""
    resumed: int = dataclasses.field(init=False)
    """How many of `generated` a continued stream brought (its continuation_ids, up to the
    first that ends it): they were fed as context, not generated here."""
    ended_by_caller: FinishReason | None = None
    """Set by `claim_end` (another thread) when the caller ends the request before the engine
    has: the outcome every report gives, the stream's own completion included."""
    _ending: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    """Orders `claim_end` against the decode thread's end of the request."""

    def __post_init__(self) -> None:
        request = self.request
        self.context_ids = self.prompt_ids + list(request.continuation)
        self.prefill_end = len(self.context_ids)
        self.reservation = len(self.prompt_ids) + self.budget
        eos = frozenset() if request.ignore_eos else self.eos_ids
        self.stop_ids = eos | frozenset(request.stop_token_ids)
        # Stop ids are suppressed only before min_tokens (and only if there are any).
        unsuppressed = request.min_tokens if self.stop_ids else 0
        self.argmax_from = unsuppressed if request.sampling.plain_greedy else _NEVER
        reports = request.logprobs or request.top_logprobs
        self.scores_until = _NEVER if reports else self.argmax_from
        self.text.start_after(self.prompt_ids)
        self.resume(request.continuation)
        self.resumed = len(self.generated)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        """Ended for any reason: completed, cancelled, expired, or failed."""
        return self.finish_reason is not None or self.error is not None

    @property
    def feeding(self) -> bool:
        """Whether the next decode step feeds a continuation id rather than a chosen token."""
        return self.prefilled < len(self.context_ids)

    @property
    def next_position(self) -> int:
        """Position id of the last generated token, the one the next decode step feeds."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def expired(self, now: float) -> bool:
        deadline = self.request.deadline
        return deadline is not None and now >= deadline

    def resume(self, delivered: tuple[int, ...]) -> None:
        """Take the tokens an interrupted stream already delivered: the text pipeline and the
        stop conditions see them as if they had just been generated, but no event is queued
        for them, so the stream goes on with the uninterrupted stream's indices and deltas. A
        stream that had already ended (EOS, stop string, budget) ends again at once.

        InvalidRequest for ids no uninterrupted stream delivers: an id after the one that
        ended it, or an EOS or stop id before min_tokens (where it cannot be chosen)."""
        for i, token_id in enumerate(delivered):
            if token_id in self.suppressed:
                raise InvalidRequest(
                    f"continuation_ids[{i}]",
                    token_id,
                    f"an EOS or stop token id cannot come before min_tokens "
                    f"({self.request.min_tokens})",
                )
            self.generated.append(token_id)
            if self._stops_at(token_id)[0] is not None:
                if i + 1 < len(delivered):
                    raise InvalidRequest(
                        f"continuation_ids[{i + 1}]",
                        delivered[i + 1],
                        "the stream ended at the id before it (EOS, a stop token id or a stop "
                        "string): no id follows the one that ended it",
                    )
                self._close(time.monotonic())
                return

    @property
    def suppressed(self) -> frozenset[int]:
        """Ids that must not be chosen next: EOS and stop token ids before min_tokens."""
        if len(self.generated) >= self.request.min_tokens:
            return frozenset()
        return self.stop_ids

    @property
    def plain(self) -> bool:
        """Whether the next token is the step's plain argmax (see argmax_from)."""
        return len(self.generated) >= self.argmax_from

    @property
    def needs_scores(self) -> bool:
        """Whether the next token needs the step's whole distribution (see scores_until)."""
        return len(self.generated) < self.scores_until

    def _stops_at(self, token_id: int) -> tuple[FinishReason | None, str]:
        """Push the newest token through the text pipeline: set the finish reason if a stop
        condition holds; return it and the text the token releases. The reason is set last:
        should the text pipeline fail, the request is not finished yet and fails (with a
        terminal error) instead of ending without its completion."""
        # Stop strings, as EOS and stop ids, cannot end a stream before min_tokens: they count
        # from the token after the min_tokens-th (a string may begin earlier and end there).
        armed = len(self.generated) > self.request.min_tokens
        if token_id in self.stop_ids:
            delta, stop = self.text.finish(armed=armed)
            self._finish(FinishReason.STOP, stop)
            return self.finish_reason, delta
        delta, stop = self.text.push(token_id, armed=armed)
        if stop is None and len(self.generated) >= self.budget:
            # The text held back for a character still to complete comes out now, and may
            # complete a stop string: the stream then ends at it, its text cut there.
            tail, stop = self.text.finish(armed=armed)
            delta += tail
            self._finish(FinishReason.LENGTH, stop)
        elif stop is not None:
            self._finish(FinishReason.STOP_SEQUENCE, stop)
        return self.finish_reason, delta

    def _finish(self, reason: FinishReason, stop: str | None) -> None:
        """End with `reason`, or at the stop string the text completed."""
        if stop is None:
            self.finish_reason = reason
        else:
            self.finish_reason, self.stop_sequence = FinishReason.STOP_SEQUENCE, stop

    def accept(
        self,
        token_id: int,
        logprob: float | None,
        now: float,
        top: tuple[TopLogprob, ...] = (),
    ) -> None:
        """Record a sampled token, queue its event, and finish when a stop condition holds."""
        self.generated.append(token_id)
        try:
            own, own_bytes = None, None
            if logprob is not None:  # a token's own text and bytes only serve logprobs
                own, own_bytes = self.text.token_text(token_id), self.text.token_bytes(token_id)
            _, delta = self._stops_at(token_id)
        except BaseException:
            # The token's event is never queued: no Usage, metric or log counts it.
            self.generated.pop()
            raise
        self.token_times.append(now)
        index = len(self.generated) - 1
        self.outbox.append(TokenEvent(delta, token_id, index, logprob, top, own, own_bytes))
        if self.finish_reason is not None:
            self._close(now)

    def claim_end(self, reason: FinishReason) -> bool:
        """From the caller's thread: end with `reason` unless the engine has ended the request
        already (False). The decode thread then closes it with this reason, even if its own
        stop condition holds first, so the stream, its log and its metrics agree."""
        with self._ending:
            if self.finished:
                return False
            self.ended_by_caller = reason
            return True

    def end(self, reason: FinishReason, now: float) -> None:
        """Finish early (cancel, deadline). Held-back text belongs to no token and is dropped."""
        if not self.finished:
            self.finish_reason = reason
            self._close(now)

    def fail(self, what: str, exc: BaseException) -> None:
        """End with an error: the consumer gets the events so far, then this error (unless
        its caller had ended it: then it ends as the caller said)."""
        if self.finished:
            return
        with self._ending:
            if self.ended_by_caller is None:
                self.error = EngineStopped(f"{what}: {type(exc).__name__}: {exc}")
                self.cache = None
                return
        self.end(self.ended_by_caller, time.monotonic())

    def _close(self, now: float) -> None:
        self.closed_at = now
        with self._ending:
            if self.ended_by_caller is not None:
                self.finish_reason, self.stop_sequence = self.ended_by_caller, ""
        self.outbox.append(self._usage(now))
        assert self.finish_reason is not None
        self.outbox.append(CompletionEvent(self.finish_reason, self.stop_sequence))
        self.cache = None

    def _usage(self, now: float) -> UsageEvent:
        first = self.token_times[0] if self.token_times else None
        return UsageEvent(
            request_id=self.request_id,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.generated),
            queue_time_s=(self.scheduled_at or now) - self.arrived_at,
            time_to_first_token_s=(first - self.arrived_at) if first is not None else 0.0,
            decode_time_s=(now - first) if first is not None else 0.0,
            total_time_s=now - self.arrived_at,
            inter_token_latencies_s=tuple(b - a for a, b in itertools.pairwise(self.token_times)),
        )

    def take_events(self) -> list[Event]:
        events, self.outbox = self.outbox, []
        return events

    def record(self, now: float) -> RequestRecord:
        """What the observer sees: the work done here (the context positions prefilled, where
        a continued stream's delivered tokens count, not as tokens generated; none for a
        request that ended before its prefill) and the outcome its caller saw; finish_reason
        None means the request failed."""
        return RequestRecord(
            request_id=self.request_id,
            prompt_tokens=self.prefilled,
            completion_tokens=len(self.generated) - self.resumed,
            arrived_at=self.arrived_at,
            scheduled_at=self.scheduled_at,
            first_token_at=self.token_times[0] if self.token_times else None,
            # Its end as its Usage times it, not its release a step later: the duration
            # metric and the request's own timings (its log line) agree.
            finished_at=self.closed_at if self.closed_at is not None else now,
            token_times=tuple(self.token_times),
            finish_reason=self.finish_reason,
        )
