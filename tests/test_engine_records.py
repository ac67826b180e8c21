"""What the engine reports about each request and each step is what happened to it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from tests.conftest import RunningServer, eventually, start_server
from tests.fakes import RecordingObserver, ScriptedModel
from tokenwire.server.domain import (
    CompletionEvent,
    Event,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    UsageEvent,
)
from tokenwire.server.engine import Engine, ModelSpec, OnnxCausalLM, RequestRecord, StepRecord
from tokenwire.server.engine import engine as engine_module
from tokenwire.server.tokenizer import Tokenizer

STEP_S = 0.3
"""Each forward of the scripted model takes this long."""


@pytest.fixture
async def slow(spec: ModelSpec, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    """A scripted model (always " x") taking STEP_S per forward, prefilling 4 tokens a step."""
    token = tokenizer.encode(" x")[0]
    model = ScriptedModel(spec, dict.fromkeys(range(spec.context_length), token), STEP_S)
    running = await start_server(model, tokenizer, RecordingObserver(), prefill_chunk_tokens=4)
    yield running
    await running.server.drain()


def _records(running: RunningServer) -> RecordingObserver:
    assert isinstance(running.observer, RecordingObserver)
    return running.observer


async def _recorded(running: RunningServer, request_id: str) -> RequestRecord:
    finished = _records(running).finished
    assert await eventually(lambda: request_id in finished, within_s=10.0)
    return finished[request_id]


def _request(
    request_id: str, max_tokens: int, prompt: str = "x", **fields: object
) -> GenerationRequest:
    return GenerationRequest(
        request_id,
        prompt,
        max_tokens=max_tokens,
        ignore_eos=True,
        **fields,  # type: ignore[arg-type]
    )


async def test_a_cancel_during_the_last_step_ends_the_stream_as_cancelled(
    slow: RunningServer,
) -> None:
    """A request cancelled while the step that would finish it is computing ends as cancelled
    in its stream and in the engine's record alike, as the cancel answered."""
    handle = slow.engine.submit(_request("late", 2))
    events = aiter(handle.events())
    assert isinstance(await anext(events), TokenEvent)  # the prefill's token; step 2 runs now
    outcome = handle.cancel()
    rest: list[Event] = [event async for event in events]
    assert isinstance(rest[-1], CompletionEvent)
    assert outcome == rest[-1].finish_reason == FinishReason.CANCELLED
    assert (await _recorded(slow, "late")).finish_reason == FinishReason.CANCELLED


async def test_cancelling_a_finished_request_reports_how_it_finished(slow: RunningServer) -> None:
    """Leaving a stream whose request has already finished reports the engine's finish
    reason, the one its record gives, not a cancel."""
    handle = slow.engine.submit(_request("done", 1))
    assert isinstance([event async for event in handle.events()][-1], CompletionEvent)
    assert handle.cancel() == FinishReason.LENGTH
    assert (await _recorded(slow, "done")).finish_reason == FinishReason.LENGTH


async def test_queue_time_ends_when_the_prefill_starts(slow: RunningServer) -> None:
    """A short prompt admitted behind a long one prefilled in chunks (4 tokens a step) queues
    until its own prefill starts: its queue time covers the long prompt's chunks."""
    long = slow.engine.submit(_request("long", 1, prompt=" x" * 12))
    short = slow.engine.submit(_request("short", 1))
    for handle in (long, short):
        assert isinstance([event async for event in handle.events()][-1], CompletionEvent)
    record = await _recorded(slow, "short")
    assert record.queue_time is not None
    assert record.queue_time >= 2 * STEP_S


async def test_a_records_duration_is_its_usages_total_time(slow: RunningServer) -> None:
    """The duration the engine records for a request (the duration metric's observation) is
    the total time its Usage reports, the end its caller saw, not its release a step later."""
    handle = slow.engine.submit(_request("timed", 2))
    usage = next(e for e in [e async for e in handle.events()] if isinstance(e, UsageEvent))
    record = await _recorded(slow, "timed")
    assert record.finished_at - record.arrived_at == pytest.approx(usage.total_time_s, abs=1e-9)


async def test_every_decoded_row_counts_in_its_steps_batch_size(slow: RunningServer) -> None:
    """Four 3-token requests decode 2 tokens each after their prefill: the steps' batch sizes
    add up to those 8 rows, including the step whose rows all finish."""
    handles = [slow.engine.submit(_request(f"row{i}", 3)) for i in range(4)]
    for handle in handles:
        assert isinstance([event async for event in handle.events()][-1], CompletionEvent)
    for i in range(4):
        await _recorded(slow, f"row{i}")
    assert sum(step.batch_size for step in _records(slow).steps) == 8


async def test_a_step_that_runs_no_forward_records_no_step_duration(
    slow: RunningServer, tokenizer: Tokenizer
) -> None:
    """A continuation that brings every token ends at once: the step that ends it runs no
    forward, so its record carries the engine's state but no step duration (the step
    histogram counts forwards' steps only)."""
    token = tokenizer.encode(" x")[0]
    handle = slow.engine.submit(_request("all", 2, continuation=(token, token)))
    assert isinstance([event async for event in handle.events()][-1], CompletionEvent)
    await _recorded(slow, "all")
    steps = _records(slow).steps
    assert steps
    assert [s for s in steps if s.stepped and not (s.batch_size or s.prefill_tokens)] == []


async def test_long_prompts_waiting_for_the_tokenizer_count_as_waiting(
    slow: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two long prompts held on the tokenizer thread hold places in the capacity: the
    engine's gauges count them waiting while they wait (an idle-looking server that refuses
    requests misleads a load balancer), and stop counting them once they ran."""
    gate = threading.Event()
    encode = Engine._encode_released

    def gated(engine: Engine, request: GenerationRequest) -> list[int]:
        gate.wait(10)
        return encode(engine, request)

    monkeypatch.setattr(Engine, "_encode_released", gated)
    # Long enough for the tokenizer's thread, short to prefill (the scripted forward is slow).
    monkeypatch.setattr(engine_module, "LONG_PROMPT_CHARS", 16)
    long = "#" * 40
    submits = [
        asyncio.ensure_future(slow.engine.submit_async(_request(f"long{i}", 1, prompt=long)))
        for i in range(2)
    ]
    steps = _records(slow).steps
    try:
        assert await eventually(lambda: bool(steps) and steps[-1].waiting == 2)
    finally:
        gate.set()
    for handle in await asyncio.gather(*submits):
        assert isinstance([event async for event in handle.events()][-1], CompletionEvent)
    assert await eventually(lambda: steps[-1].waiting == 0 and steps[-1].running == 0)


async def test_a_continued_stream_counts_only_the_tokens_generated_here(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A stream continued after 6 of its 10 tokens reports 4 generated tokens, and the 6 it
    brought as prompt tokens fed, not as tokens generated."""
    observer = RecordingObserver()
    engine = Engine(onnx_model, tokenizer, observer=observer)
    engine.start()
    try:
        whole = [e async for e in engine.submit(_request("whole", 10, "def f():")).events()]
        ids = tuple(e.token_id for e in whole if isinstance(e, TokenEvent))
        request = _request("rest", 10, "def f():", continuation=ids[:6])
        assert isinstance([e async for e in engine.submit(request).events()][-1], CompletionEvent)
        assert await eventually(lambda: "rest" in observer.finished, within_s=10.0)
    finally:
        engine.shutdown()
    whole_record, record = observer.finished["whole"], observer.finished["rest"]
    assert record.completion_tokens == 4
    assert record.prompt_tokens == whole_record.prompt_tokens + 6


class _BrokenObserver(RecordingObserver):
    """An exporter with a bug: every report raises."""

    def request_finished(self, record: RequestRecord) -> None:
        raise RuntimeError("exporter bug")

    def step_finished(self, record: StepRecord) -> None:
        raise RuntimeError("exporter bug")


async def test_an_observer_that_raises_fails_no_request(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """An observer whose every report raises neither fails a request nor stops the engine:
    two requests in turn run to their length and the engine ends idle."""
    token = tokenizer.encode(" x")[0]
    model = ScriptedModel(spec, dict.fromkeys(range(spec.context_length), token))
    engine = Engine(model, tokenizer, observer=_BrokenObserver())
    engine.start()
    try:
        ends = []
        async with asyncio.timeout(10):  # a request the failure left hanging fails here
            for i in range(2):
                events = [e async for e in engine.submit(_request(f"r{i}", 3)).events()]
                ends.append(events[-1])
        assert await eventually(lambda: engine.active_count == 0)
    finally:
        engine.shutdown()
    assert [getattr(e, "finish_reason", None) for e in ends] == [FinishReason.LENGTH] * 2
