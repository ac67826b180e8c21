"""The engine's admission interface: submit a request, get its event stream, cancel by id.

Transports call Engine from their event loop; the model runs on the scheduler's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import numpy as np
import structlog

from tokenwire.server.domain import (
    Event,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    RequestLimits,
    TokenwireError,
    Unavailable,
)
from tokenwire.server.engine.admission import (
    Tokenizing,
    cancel_tokenizing,
    claims,
    tokenizing_places,
)
from tokenwire.server.engine.mailbox import Mailbox
from tokenwire.server.engine.model import CausalLM, from_onnxruntime
from tokenwire.server.engine.observer import EngineObserver, GuardedObserver, NullObserver
from tokenwire.server.engine.request_checks import (
    added_ids_beyond,
    check_continuation,
    check_encoded,
    check_ids,
)
from tokenwire.server.engine.sampling import Sampler
from tokenwire.server.engine.scheduler import Cancel, Refresh, Scheduler, Submit
from tokenwire.server.engine.sequence import Sequence
from tokenwire.server.engine.spec import ModelLoadError, first_line
from tokenwire.server.tokenizer import TextStream, Tokenizer

log = structlog.get_logger("tokenwire.engine")
T = TypeVar("T")

LONG_PROMPT_CHARS = 4096
"""Prompts longer than this are tokenized on a worker thread by submit_async (a 256 KiB
prompt takes 0.1-0.2 s to tokenize on a CPU core, one of 4096 characters a few ms)."""


@dataclasses.dataclass(frozen=True, slots=True)
class EngineConfig:
    max_batch_size: int = 16
    max_queue: int = 64
    prefill_chunk_tokens: int = 256
    max_kv_tokens: int = 16384
    """Prompt + max_tokens reserved by all running requests together (KV-cache entries)."""
    max_context_tokens: int = 0
    """Prompt + max_tokens of one request at most; 0: the model's context."""
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    max_prompt_bytes: int = 262_144
    max_stop_strings: int = 8
    max_stop_length: int = 64
    retry_after_s: float = 1.0


def request_limits(config: EngineConfig, model_context: int) -> RequestLimits:
    """The per-request bounds: each RequestLimits field is the config field of its name; the
    context is the model's, or max_context_tokens or the KV budget where smaller."""
    names = {f.name for f in dataclasses.fields(RequestLimits)} - {
        "context_length",
        "context_set_by",
    }
    context, set_by = model_context, ""
    for setting in ("max_context_tokens", "max_kv_tokens"):
        value = getattr(config, setting)
        if value and value < context:
            context, set_by = value, setting
    return RequestLimits(
        context_length=context, context_set_by=set_by, **{n: getattr(config, n) for n in names}
    )


class GenerationHandle:
    """A submitted request: iterate its events; `cancel` ends it early. Leaving the iteration
    does not: the request decodes on, holding its row, until it ends or is cancelled (the
    caller knows why it left, and cancels with that reason)."""

    def __init__(self, engine: Engine, sequence: Sequence) -> None:
        self._engine = engine
        self._sequence = sequence
        self.request_id = sequence.request_id
        self.prompt_tokens = len(sequence.prompt_ids)
        self.arrived_at = sequence.arrived_at
        """time.monotonic() at submission: what the Usage event's timings count from."""
        self.seed = sequence.sampler.seed
        """The sampling seed in use (chosen by the server when the request set none)."""
        self.max_tokens = sequence.budget
        """The tokens the request may generate: its max_tokens, or the server's default (within
        the context) where it set none."""

    def events(self) -> AsyncIterator[Event]:
        return self._sequence.mailbox.events()

    def cancel(self, reason: FinishReason = FinishReason.CANCELLED) -> FinishReason | None:
        """End the request; returns the outcome every report gives it: `reason`, or the
        engine's own finish reason if it had already finished (None: it failed)."""
        if self._engine.end(self._sequence, reason):
            return reason
        return self._sequence.ended_by_caller or self._sequence.finish_reason


class Engine:
    """Admission, limits and lifecycle around the continuous-batching scheduler."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        # A request holds at most the model's context (or less, as configured), and no more
        # than the whole KV budget.
        self.limits = request_limits(self.config, model.spec.context_length)
        self._observer = GuardedObserver(observer or NullObserver())
        self._active: dict[str, Sequence] = {}
        """The requests by id, until they end or are cancelled."""
        self._leaving: set[Sequence] = set()
        """Cancelled requests whose id is free again but whose slot the decode thread has yet to
        release: they keep a drain waiting (not a place in the capacity: see _check_capacity)."""
        self._lock = threading.Lock()
        self._accepting = False
        self._tokenizing: concurrent.futures.ThreadPoolExecutor | None = None
        self._encodings: dict[tuple[str, bool], _Encoding] = {}
        """Long prompts being tokenized, by (prompt, add_special_tokens): one tokenizing each."""
        self._tokenizing_requests: list[Tokenizing] = []
        self._arrivals = itertools.count()
        """Long prompts queued for or in the tokenizer thread: each holds a place in the
        capacity, so a flood of them is refused at once instead of queueing without bound."""
        self._vocab = min(model.spec.vocab_size, tokenizer.vocab_size)
        self._beyond_vocab = added_ids_beyond(tokenizer, model.spec.vocab_size)
        """Ids of the tokenizer's added tokens that the model has no row for, with their text."""
        self._scheduler = Scheduler(
            model,
            max_batch_size=self.config.max_batch_size,
            prefill_chunk_tokens=self.config.prefill_chunk_tokens,
            max_kv_tokens=self.config.max_kv_tokens,
            context_tokens=self.limits.context_length,
            vocab_limit=self._vocab,
            observer=self._observer,
            on_finished=self._release,
            token_text=tokenizer.token_text,
            tokenizing=lambda: len(self._tokenizing_requests),
        )

    # -- lifecycle ------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run one prefill and a few decode steps so the first request pays no set-up cost:
        ids the model has rows for (a tokenizer may add tokens beyond them), positions within
        the context. A graph that fails them is refused (ModelLoadError), as one that fails
        the load's probes is."""
        try:
            self._warm_up()
        except Exception as exc:
            if not from_onnxruntime(exc):
                raise
            raise ModelLoadError(
                f"{self.model.spec.graph_file} fails the warm-up forwards (a short prompt and "
                f"a few tokens): {first_line(exc)}"
            ) from exc

    def _warm_up(self) -> None:
        steps = min(4, self.limits.context_length - 1)
        ids = self.tokenizer.encode("def warm_up():\n    return")
        ids = [i for i in ids if i < self._vocab][: self.limits.context_length - steps] or [0]
        mask = [[1] * len(ids)]
        logits, cache = self.model.forward(
            np.asarray([ids], dtype=np.int64),
            np.asarray(mask, dtype=np.int64),
            np.arange(len(ids), dtype=np.int64)[None, :],
            self.model.new_cache(1).tensors,
        )
        for step in range(steps):
            token = int(logits.host()[0, : self._vocab].argmax())
            width = len(ids) + step + 1
            logits, cache = self.model.forward(
                np.asarray([[token]], dtype=np.int64),
                np.ones((1, width), dtype=np.int64),
                np.asarray([[width - 1]], dtype=np.int64),
                cache,
            )

    def start(self) -> None:
        self._scheduler.start()
        self._accepting = True

    def stop_accepting(self) -> None:
        """Take no more requests (a drain). Long inputs still queued for the tokenizer thread
        leave its queue, refused Unavailable at once, as a request arriving now is: none was
        admitted, and tokenizing one only to refuse it would hold the drain up; the one being
        tokenized is refused once tokenized."""
        with self._lock:
            self._accepting = False
            tokenizing, self._tokenizing = self._tokenizing, None
        if tokenizing is not None:
            tokenizing.shutdown(wait=False, cancel_futures=True)

    async def wait_idle(self, limit_s: float) -> bool:
        """Wait until no request is active, and none waits for the tokenizer; False if
        limit_s passed first."""
        deadline = time.monotonic() + limit_s
        # Requests are released on the decode thread; a short poll keeps that thread free of
        # event-loop bookkeeping and only runs while draining.
        while not self._idle() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return self._idle()

    def _idle(self) -> bool:
        return self.active_count == 0 and not self._tokenizing_requests

    def shutdown(self) -> None:
        """Cancel whatever is left and stop the decode thread."""
        with self._lock:  # a request admitted before this has its Submit posted already
            self._accepting = False
            tokenizing = self._tokenizing
        self._scheduler.shutdown()
        if tokenizing is not None:
            tokenizing.shutdown(wait=False, cancel_futures=True)

    # -- state ----------------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def active_count(self) -> int:
        return len(self._active) + len(self._leaving)

    @property
    def id_limit(self) -> int:
        """Token ids below this are the ids the engine takes and chooses: those both the model
        (a row of logits) and the tokenizer (an id it decodes) have."""
        return self._vocab

    @property
    def kv_in_place(self) -> bool:
        """The model writes its KV cache in place in preallocated slots."""
        return self._scheduler.in_place

    @property
    def max_rows(self) -> int:
        """Requests decoded together at most: max_batch_size, or fewer where a preallocated
        cache holds fewer rows (each a whole context) within max_kv_tokens."""
        return self._scheduler.max_rows

    @property
    def running_count(self) -> int:
        return self._scheduler.running

    @property
    def waiting_count(self) -> int:
        return max(0, self.active_count - self._scheduler.running)

    # -- requests -------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Validate, tokenize and queue a request. Must be called from a running event loop.

        Raises InvalidRequest, Overloaded or Unavailable; never blocks on the decode thread.
        """
        try:
            return self._submit(request, time.monotonic())
        except TokenwireError as exc:
            self._observer.request_rejected(type(exc).__name__)
            raise

    async def submit_async(self, request: GenerationRequest) -> GenerationHandle:
        """As submit, but a prompt over LONG_PROMPT_CHARS is tokenized on a worker thread, so
        the event loop goes on serving other streams meanwhile (shorter ones are tokenized at
        once: a thread hop would cost them more than it saves). The request's timings count
        from this call, its tokenizing included."""
        arrived_at = time.monotonic()
        try:
            prompt_ids = None
            if len(request.prompt) > LONG_PROMPT_CHARS:
                # Refuse what the cheap checks refuse before paying for the tokenizer.
                self._check_open(request)
                waiting = self._hold_place(request)
                try:
                    prompt_ids = await self._encode_long(request)
                finally:
                    # Given back just before _submit takes a place of its own, with no await
                    # between: nothing else can take it meanwhile.
                    with self._lock:
                        self._tokenizing_requests.remove(waiting)
                    self._scheduler.post(Refresh())
                return self._submit(request, arrived_at, prompt_ids, waiting)
            return self._submit(request, arrived_at, prompt_ids)
        except TokenwireError as exc:
            self._observer.request_rejected(type(exc).__name__)
            raise

    async def _encode_long(self, request: GenerationRequest) -> list[int]:
        """The long prompt's ids from the tokenizer thread. Requests that bring the same prompt
        while it is being tokenized (an OpenAI request's n choices, a client's retries) wait
        for that one tokenizing instead of queueing one each, whichever event loop they come
        from. Once no caller waits for it any more (they left, or their deadlines passed), a
        tokenizing not yet begun leaves the thread's queue: abandoned long prompts never queue
        work beyond the places their callers held. Unavailable if the engine shuts down first."""
        key = (request.prompt, request.add_special_tokens)
        with self._lock:
            self._check_accepting()  # no tokenizer thread made after shutdown()
            encoding = self._encodings.get(key)
            made = encoding is None
            if encoding is None:
                try:
                    pending = self._tokenizer_thread().submit(self._encode_released, request)
                except RuntimeError:  # shut down since this request was checked
                    raise Unavailable("the server is shutting down") from None
                encoding = self._encodings[key] = _Encoding(pending)
            encoding.waiters += 1
        pending = encoding.future
        if made:  # outside the lock: a future already done runs its callback at once
            pending.add_done_callback(lambda done: self._forget_encoding(key, done))
        try:
            # Shielded: one caller leaving does not cancel the others' tokenizing.
            shared: asyncio.Future[list[int]] = asyncio.wrap_future(pending)
            return list(await asyncio.shield(shared))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if pending.cancelled() and not (task is not None and task.cancelling()):
                # shutdown() dropped the queued tokenizing, not the caller.
                raise Unavailable("the server is shutting down") from None
            raise
        finally:
            with self._lock:
                encoding.waiters -= 1
                abandoned = not encoding.waiters and not pending.done()
                if abandoned and self._encodings.get(key) is encoding:
                    del self._encodings[key]  # a caller that comes now tokenizes anew
            if abandoned:  # outside the lock: a cancel runs _forget_encoding at once
                pending.cancel()  # nobody waits: one not yet begun leaves the queue

    def _forget_encoding(
        self, key: tuple[str, bool], done: concurrent.futures.Future[list[int]]
    ) -> None:
        with self._lock:
            encoding = self._encodings.get(key)
            if encoding is not None and encoding.future is done:
                del self._encodings[key]

    def _tokenizer_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        """The tokenizer thread, made on first use (called under the lock). One thread: long
        prompts queue behind each other rather than take every core from the decode thread."""
        if self._tokenizing is None:
            self._tokenizing = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="tokenwire-tokenize"
            )
        return self._tokenizing

    def on_tokenizer_thread(self, job: Callable[[], T]) -> concurrent.futures.Future[T]:
        """job queued on the thread that tokenizes long prompts (a long Tokenize input queues
        with them, so no two take a core each from the decode thread). Unavailable once the
        engine has stopped taking requests."""
        with self._lock:
            self._check_accepting()
            try:
                return self._tokenizer_thread().submit(job)
            except RuntimeError:  # shut down since
                raise Unavailable("the server is shutting down") from None

    def _encode_released(self, request: GenerationRequest) -> list[int]:
        """request.prompt's ids, as Tokenizer.encode gives them. `encode` holds the GIL while
        it runs (it would stall the event loop from any thread); `encode_batch_fast` releases
        it and computes no offsets, which nothing here reads."""
        [encoding] = self.tokenizer.inner.encode_batch_fast(
            [request.prompt], add_special_tokens=request.add_special_tokens
        )
        return list(encoding.ids)

    def _check_open(self, request: GenerationRequest) -> None:
        self._check_accepting()
        request.check(self.limits)

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise Unavailable("the server is not accepting requests (starting or draining)")

    def _submit(
        self,
        request: GenerationRequest,
        arrived_at: float,
        prompt_ids: list[int] | None = None,
        waited: Tokenizing | None = None,
    ) -> GenerationHandle:
        self._check_open(request)
        if prompt_ids is None:
            prompt_ids = list(request.prompt_ids) or self.tokenizer.encode(
                request.prompt, add_special_tokens=request.add_special_tokens
            )
        cancelled = waited is not None and waited.cancelled
        if cancelled:
            # Cancelled while its prompt was tokenized: it ends so, generating nothing, as
            # Cancel answered, whatever its ids would have been refused for.
            budget = 0
        else:
            if self._beyond_vocab and not request.prompt_ids:
                check_encoded(prompt_ids, self._beyond_vocab, self.model.spec.vocab_size)
            budget = request.token_budget(len(prompt_ids), self.limits)
            check_ids(request, self._vocab)
            check_continuation(request.continuation, budget, self._vocab)
        sequence = Sequence(
            request=request,
            prompt_ids=prompt_ids,
            budget=budget,
            eos_ids=self.model.spec.eos_token_ids,
            sampler=Sampler(request.sampling),
            text=TextStream.create(self.tokenizer, request.stop),
            mailbox=Mailbox(asyncio.get_running_loop()),
            arrived_at=arrived_at,
        )
        if cancelled:
            self._admit_cancelled(sequence)
        else:
            self._admit(sequence, None if waited is None else waited.order)
        return GenerationHandle(self, sequence)

    def _admit(self, sequence: Sequence, order: int | None = None) -> None:
        """Make the request active and hand it to the decode thread, under the lock that
        shutdown() takes: a request is admitted before the decode thread is told to stop (and
        ends with the others) or refused."""
        with self._lock:
            self._check_accepting()
            running = self._active.get(sequence.request_id)
            self._check_id_free(sequence.request, order)
            self._check_capacity(replacing=self._replaces(sequence.request))
            # A retry or continuation of the caller's own running stream: its caller lost that
            # stream (a broken connection the server has yet to notice) and goes on here.
            if running is not None:
                self._end_locked(running, FinishReason.CANCELLED)
            if _goes_on(sequence.request):
                # An older retry still waiting for the tokenizer would replace this one later
                # (a newer one will: of an id's retries the newest wins). `order` is this
                # one's arrival where it waited for the tokenizer too; else it came just now.
                cancel_tokenizing(self._tokenizing_requests, sequence.request_id, order)
            self._active[sequence.request_id] = sequence
            self._scheduler.post(Submit(sequence))
        if running is not None:
            log.info("request.replaced", reason="a retry of its id arrived")

    def _admit_cancelled(self, sequence: Sequence) -> None:
        """A request cancelled while its prompt was tokenized (by Cancel, or a newer retry of
        its id): it ends at once, as cancelled, through the decode thread like any other (its
        usage, completion and metrics), and takes no id and replaces nothing."""
        with self._lock:
            self._check_accepting()
            sequence.claim_end(FinishReason.CANCELLED)
            self._leaving.add(sequence)
            self._scheduler.post(Submit(sequence))  # it arrives ended (Scheduler._enqueue)

    def _hold_place(self, request: GenerationRequest) -> Tokenizing:
        """Take a place in the capacity for a long prompt while it waits for the tokenizer (a
        retry of the caller's running request takes that one's, see _admit)."""
        with self._lock:
            self._check_id_free(request)
            self._check_capacity(replacing=self._replaces(request))
            # Older retries of its id waiting too are cancelled once this one is admitted
            # (_admit), not before: this one may yet be refused.
            waiting = Tokenizing(request.request_id, _goes_on(request), order=next(self._arrivals))
            self._tokenizing_requests.append(waiting)
        self._scheduler.post(Refresh())  # the gauges count it waiting
        return waiting

    def _check_id_free(self, request: GenerationRequest, order: int | None = None) -> None:
        """InvalidRequest where the request's id is the caller's running request's, or that of
        one that came before it (before `order`, its arrival where it waited for the tokenizer
        too) and still waits for the tokenizer, and the request is not a retry or continuation
        (under the lock): the id was taken first, so the newcomer is refused at once."""
        request_id = request.request_id
        taken = request_id in self._active or claims(self._tokenizing_requests, request_id, order)
        if taken and not _goes_on(request):
            raise InvalidRequest("request_id", request_id, "must not match a running request's id")

    def _replaces(self, request: GenerationRequest) -> bool:
        """Whether the request continues the caller's running request of its id (under the
        lock): it replaces that one (see _admit)."""
        return _goes_on(request) and request.request_id in self._active

    def _check_capacity(self, *, replacing: bool = False) -> None:
        """Overloaded when running, queued and tokenizing requests fill the rows decoded
        together (max_rows: max_batch_size, or fewer where a preallocated cache holds fewer)
        and the queue (called under the lock); a request `replacing` a running one takes no
        more. Where the KV budget lets fewer requests run at once than max_rows, the rest of
        those places wait too."""
        capacity = self.max_rows + self.config.max_queue
        # A request that is leaving (cancelled, expired, replaced) holds no place: its row, if
        # it has one, is free at the next step boundary, before any request is admitted to one.
        waiting = tokenizing_places(self._tokenizing_requests, self._active)
        held = len(self._active) + waiting - replacing
        if held >= capacity:
            raise Overloaded(
                f"{held} requests are running, queued or being tokenized (limit {capacity}: "
                f"{self.max_rows} {'row' if self.max_rows == 1 else 'rows'} decoded together + "
                f"max_queue {self.config.max_queue})",
                retry_after_s=self.config.retry_after_s,
            )

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> bool:
        """Stop a request at the next step boundary; False if no such request is active."""
        with self._lock:
            # Looked up and ended at once: a retry that replaces the request meanwhile is not
            # the one named (it is, by a later cancel). One still waiting for the tokenizer
            # ends as soon as it is tokenized.
            sequence = self._active.get(request_id)
            ended = sequence is not None and self._end_locked(sequence, reason)
            return cancel_tokenizing(self._tokenizing_requests, request_id) or ended

    def end(self, sequence: Sequence, reason: FinishReason = FinishReason.CANCELLED) -> bool:
        """Stop this request at the next step boundary; False if it has ended or is ending.

        Its id is free for a new request at once (for its caller the request is over); the
        cancel applies to this request alone, never to a new one with the same id."""
        with self._lock:
            return self._end_locked(sequence, reason)

    def _end_locked(self, sequence: Sequence, reason: FinishReason) -> bool:
        """end() under the lock."""
        if self._active.get(sequence.request_id) is not sequence:
            return False
        if not sequence.claim_end(reason):  # it has just ended; its release is under way
            return False
        del self._active[sequence.request_id]
        self._leaving.add(sequence)
        self._scheduler.post(Cancel(sequence, reason))
        return True

    def cancel_all(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        self._scheduler.post(Cancel(None, reason))

    def _release(self, sequence: Sequence) -> None:
        with self._lock:
            if self._active.get(sequence.request_id) is sequence:
                del self._active[sequence.request_id]
            self._leaving.discard(sequence)


@dataclasses.dataclass(eq=False, slots=True)
class _Encoding:
    """One long prompt's tokenizing, and how many callers wait for it."""

    future: concurrent.futures.Future[list[int]]
    waiters: int = 0


def _goes_on(request: GenerationRequest) -> bool:
    """Whether the request goes on with a broken stream of its id: a retry, or a continuation
    (which only a retry sends)."""
    return request.retry or bool(request.continuation)
