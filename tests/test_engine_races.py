"""Requests that race the engine's shutdown, its tokenizer thread, other event loops and its
own failures: each still ends once, and is reported once."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import eventually
from tokenwire.server.config import Settings
from tokenwire.server.domain import (
    CompletionEvent,
    EngineStopped,
    Event,
    FinishReason,
    GenerationRequest,
    Unavailable,
)
from tokenwire.server.engine import Engine, EngineConfig, OnnxCausalLM
from tokenwire.server.engine.batch import Cohort, Placement
from tokenwire.server.engine.engine import LONG_PROMPT_CHARS
from tokenwire.server.engine.observer import NullObserver, RequestRecord
from tokenwire.server.main import engine_config
from tokenwire.server.rpc.server import TokenwireServer
from tokenwire.server.telemetry.metrics import ServerMetrics
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

LONG = "#" * (LONG_PROMPT_CHARS + 900) + "\ndef fib(n):"


class _Encodings(dict[tuple[str, bool], "concurrent.futures.Future[list[int]]"]):
    """The engine's long prompts being tokenized, counting the lookups that found one: the
    requests that joined a tokenizing under way (until a tokenizing ends and is forgotten,
    which looks it up too)."""

    def __init__(self) -> None:
        super().__init__()
        self.found = 0

    def get(self, key: object, default: object = None) -> Any:
        found = super().get(key, default)  # type: ignore[call-overload]
        if found is not None:
            self.found += 1
        return found


class _HeldTokenizing(Engine):
    """The engine, its tokenizer thread held at each long prompt until `release` is set."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.started = threading.Event()
        self.release = threading.Event()
        self.encoded = 0
        self._encodings = self.encodings = _Encodings()

    def _encode_released(self, request: GenerationRequest) -> list[int]:
        self.started.set()
        self.release.wait(10)
        self.encoded += 1
        return super()._encode_released(request)


async def _outcome(events: AsyncIterator[Event]) -> FinishReason | None:
    """The stream's finish reason (None: it ended with an error)."""
    try:
        seen = [event async for event in events]
    except EngineStopped:
        return None
    assert isinstance(seen[-1], CompletionEvent)
    return seen[-1].finish_reason


async def test_a_long_prompt_shared_by_two_event_loops_serves_both(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A long prompt sent from another event loop while the same prompt is being tokenized
    for this one waits for that tokenizing (one between them) and both are served."""
    engine = _HeldTokenizing(onnx_model, tokenizer, EngineConfig())
    engine.start()
    other: dict[str, object] = {}

    def from_another_loop() -> None:
        async def submit() -> FinishReason | None:
            handle = await engine.submit_async(
                GenerationRequest("b", LONG, max_tokens=2, ignore_eos=True)
            )
            return await _outcome(handle.events())

        try:
            other["outcome"] = asyncio.run(submit())
        except Exception as exc:  # reported by the assertion below
            other["outcome"] = exc

    try:
        first = asyncio.create_task(
            engine.submit_async(GenerationRequest("a", LONG, max_tokens=2, ignore_eos=True))
        )
        assert await asyncio.to_thread(engine.started.wait, 10)
        thread = threading.Thread(target=from_another_loop)
        thread.start()
        # The other loop has found the tokenizing under way, and waits for it.
        assert await eventually(lambda: engine.encodings.found == 1)
        engine.release.set()
        assert await _outcome((await first).events()) is FinishReason.LENGTH
        await asyncio.to_thread(thread.join, 10)
        assert other["outcome"] is FinishReason.LENGTH
        assert engine.encoded == 1
    finally:
        engine.release.set()
        engine.shutdown()


async def test_a_long_prompt_dropped_from_the_tokenizer_by_shutdown_is_unavailable(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A long prompt still queued for the tokenizer thread when the engine shuts down is
    refused as Unavailable, as is the one being tokenized: neither caller sees a cancel it
    never asked for."""
    engine = _HeldTokenizing(onnx_model, tokenizer, EngineConfig())
    engine.start()
    try:
        running = asyncio.create_task(engine.submit_async(GenerationRequest("a", LONG)))
        assert await asyncio.to_thread(engine.started.wait, 10)
        queued = asyncio.create_task(engine.submit_async(GenerationRequest("b", LONG + "#")))
        # Its place is held in the same synchronous run that queues it for the tokenizer.
        assert await eventually(lambda: len(engine._tokenizing_requests) == 2)
        engine.shutdown()
        engine.release.set()
        for task in (queued, running):
            with pytest.raises(Unavailable):
                await task
        assert engine.active_count == 0
    finally:
        engine.release.set()
        engine.shutdown()


class _ShutDownAfterTheCheck(Engine):
    """The engine, shut down (as from another thread) right after a request's checks pass."""

    def _check_open(self, request: GenerationRequest) -> None:
        super()._check_open(request)
        self.shutdown()


async def test_a_request_checked_before_a_shutdown_and_admitted_after_is_refused(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A request whose checks pass just before the engine shuts down is refused as
    Unavailable instead of being handed to a decode thread that has stopped (where its stream
    would never end and it would stay active)."""
    engine = _ShutDownAfterTheCheck(onnx_model, tokenizer, EngineConfig())
    engine.start()
    with pytest.raises(Unavailable):
        engine.submit(GenerationRequest("late", "def f():", max_tokens=2))
    assert engine.active_count == 0


class _Finished(NullObserver):
    def __init__(self) -> None:
        self.reported: Counter[str] = Counter()

    def request_finished(self, record: RequestRecord) -> None:
        self.reported[record.request_id] += 1


async def test_an_unexpected_step_failure_reports_a_request_that_had_ended_once(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that fails unexpectedly after its prefill ended a request (at its first and
    only token) fails the requests still running, while the one that had ended keeps its
    completion and is reported to the observer once."""
    observer = _Finished()
    engine = Engine(onnx_model, tokenizer, EngineConfig(), observer)
    armed = threading.Event()
    runs = Placement.decode_runs

    def decode_runs(self: Placement, cohort: Cohort) -> object:
        # The decode of the step whose prefill has just ended "b": its events are published,
        # its report not yet made.
        if armed.is_set() and any(s.request_id == "b" for s in engine._scheduler._done):
            armed.clear()
            raise RuntimeError("injected step failure")
        return runs(self, cohort)

    monkeypatch.setattr(Placement, "decode_runs", decode_runs)
    engine.start()
    try:
        running = engine.submit(
            GenerationRequest("a", "def f(x):", max_tokens=200, ignore_eos=True)
        )
        events = running.events()
        await anext(events)  # decoding
        armed.set()
        short = engine.submit(GenerationRequest("b", "import os", max_tokens=1, ignore_eos=True))
        assert await _outcome(short.events()) is FinishReason.LENGTH
        assert await _outcome(events) is None
        assert await eventually(lambda: engine.active_count == 0)
        assert not armed.is_set(), "the injected failure never fired"
        assert observer.reported == Counter({"a": 1, "b": 1})
    finally:
        engine.shutdown()


async def test_a_call_that_ends_while_its_prompt_is_tokenized_is_counted(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A Generate call whose deadline passes while its long prompt is being tokenized counts
    once in tokenwire_requests_total, as `rejected` (its log line is `request.rejected`)."""
    metrics = ServerMetrics(CollectorRegistry())
    settings = Settings(port=0, drain_grace_s=5.0)
    engine = _HeldTokenizing(onnx_model, tokenizer, engine_config(settings), metrics)
    server = TokenwireServer(settings, observer=metrics)
    await server.start()
    await server.attach(engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.Generate(pb.GenerateRequest(prompt=LONG), timeout=0.5):
                    pass
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert engine.started.is_set()
        engine.release.set()

        def rejected() -> float:
            value = metrics.registry.get_sample_value(
                "tokenwire_requests_total", {"finish_reason": "rejected"}
            )
            return value or 0.0

        assert await eventually(lambda: rejected() == 1.0)
    finally:
        engine.release.set()
        await server.drain()


async def test_a_long_prompt_checked_before_a_shutdown_starts_no_tokenizer_thread(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A long prompt whose checks pass just before the engine shuts down is refused as
    Unavailable before it is tokenized: no tokenizer thread is made after the shutdown, to be
    left running."""
    engine = _ShutDownAfterTheCheck(onnx_model, tokenizer, EngineConfig())
    engine.start()
    with pytest.raises(Unavailable):
        await engine.submit_async(GenerationRequest("late", LONG, max_tokens=2))
    assert engine._tokenizing is None
    assert engine.active_count == 0
