"""Cancellation and deadlines reach the engine and free its slots."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from structlog.testing import capture_logs

from tests.conftest import (
    RunningServer,
    collect,
    eventually,
    greedy,
    start_server,
)
from tests.fakes import RecordingObserver, ScriptedModel
from tokenwire.server.domain import (
    CompletionEvent,
    FinishReason,
    GenerationRequest,
)
from tokenwire.server.engine import ModelSpec, RequestRecord
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc


async def _recorded(served: RunningServer, request_id: str) -> RequestRecord:
    """The request's record, once the observer has it (just after the engine released it)."""
    assert isinstance(served.observer, RecordingObserver)
    finished = served.observer.finished
    assert await eventually(lambda: request_id in finished, within_s=10.0)
    return finished[request_id]


async def test_client_cancel_mid_stream_frees_the_engine(
    stub: pb_grpc.GenerationServiceStub, served: RunningServer
) -> None:
    """Cancelling the RPC after a few tokens ends the request in the engine as cancelled."""
    call = stub.Generate(greedy("def long():", max_tokens=400, request_id="cancel-me"))
    received = 0
    async for message in call:
        received += message.WhichOneof("event") == "token"
        if received == 3:
            break
    call.cancel()
    assert await eventually(lambda: served.engine.active_count == 0, within_s=5.0)
    assert served.engine.running_count == 0
    record = await _recorded(served, "cancel-me")
    assert record.finish_reason == FinishReason.CANCELLED
    assert record.completion_tokens < 400


async def test_next_request_works_after_a_cancel(
    stub: pb_grpc.GenerationServiceStub, served: RunningServer
) -> None:
    """A request after a cancelled one streams to completion."""
    call = stub.Generate(greedy("while True:", max_tokens=400))
    async for _ in call:
        break
    call.cancel()
    messages = await collect(stub, greedy("if x:", max_tokens=6))
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH


async def test_deadline_ends_the_stream_with_deadline_exceeded(slow: RunningServer) -> None:
    """A deadline shorter than the generation (0.5 s, on a model taking SLOW_STEP_S a step: it
    passes while the request is generating) ends it as deadline_exceeded and frees the engine.

    Whichever notices first, the client sees it: a DEADLINE_EXCEEDED status (gRPC's timer) or a
    completion with FINISH_REASON_DEADLINE_EXCEEDED (the engine's check between steps).
    """
    request = greedy("def slow():", max_tokens=100, request_id="late")
    async with grpc.aio.insecure_channel(slow.target) as channel:
        await channel.channel_ready()  # the deadline covers the call, not the connection
        stub = pb_grpc.GenerationServiceStub(channel)
        try:
            messages = await collect(stub, request, timeout=0.5)
            seen = messages[-1].completion.finish_reason
        except grpc.aio.AioRpcError as error:
            seen = error.code()
    assert seen in {grpc.StatusCode.DEADLINE_EXCEEDED, pb.FINISH_REASON_DEADLINE_EXCEEDED}
    assert await eventually(lambda: slow.engine.active_count == 0, within_s=5.0)
    record = await _recorded(slow, "late")
    assert record.finish_reason == FinishReason.DEADLINE_EXCEEDED
    assert record.completion_tokens < 100


async def test_cancel_rpc_ends_a_stream_with_a_cancelled_completion(
    stub: pb_grpc.GenerationServiceStub, served: RunningServer
) -> None:
    """Cancel(request_id) from another call ends that stream with usage + CANCELLED."""
    call = stub.Generate(greedy("def other():", max_tokens=450, request_id="to-cancel"))
    messages = []
    async for message in call:
        messages.append(message)
        if len(messages) == 2:
            reply = await stub.Cancel(pb.CancelRequest(request_id="to-cancel"))
            assert reply.cancelled
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_CANCELLED
    assert messages[-2].usage.completion_tokens < 450


async def test_a_stream_cancelled_before_its_first_token_logs_no_latencies(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """A stream cancelled while it waits in the queue logs its request.finished line without
    ttft_ms or inter-token percentiles (it had no token), not with a ttft_ms of 0."""
    running = await start_server(
        ScriptedModel(spec, {}, step_delay_s=0.01), tokenizer, max_batch_size=1
    )
    try:
        with capture_logs() as logs:
            async with grpc.aio.insecure_channel(running.target) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                first = stub.Generate(
                    pb.GenerateRequest(prompt="x", max_tokens=300, ignore_eos=True)
                )
                await anext(aiter(first))  # it holds the only row: the next request waits
                queued = stub.Generate(greedy("y", max_tokens=5, request_id="queued"))

                for _ in range(250):  # until the server has it (a cancel is answered once)
                    if (await stub.Cancel(pb.CancelRequest(request_id="queued"))).cancelled:
                        break
                    await asyncio.sleep(0.02)
                messages = [m async for m in queued]
                first.cancel()
    finally:
        await running.server.drain()
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_CANCELLED
    [line] = [e for e in logs if e["event"] == "request.finished" and e["completion_tokens"] == 0]
    assert "queue_ms" in line
    assert not {"ttft_ms", "itl_p50_ms", "itl_p95_ms"} & set(line), line


async def test_a_stream_its_caller_leaves_logs_its_duration_and_ttft(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """A stream whose caller leaves after its third token (no Usage reaches the handler) logs
    its request.finished line with duration_ms and ttft_ms as the handler saw them, not
    without any timing; no queue_ms or inter-token percentiles (the engine's, in its Usage)."""
    running = await start_server(ScriptedModel(spec, {}, step_delay_s=0.01), tokenizer)
    try:
        with capture_logs() as logs:
            async with grpc.aio.insecure_channel(running.target) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                call = stub.Generate(greedy("x", max_tokens=300, request_id="left"))
                tokens = 0
                async for message in call:
                    tokens += message.WhichOneof("event") == "token"
                    if tokens == 3:
                        call.cancel()
                        break
            assert await eventually(
                lambda: any(e["event"] == "request.finished" for e in logs), within_s=5
            )
    finally:
        await running.server.drain()
    [line] = [e for e in logs if e["event"] == "request.finished"]
    assert line["finish_reason"] == "cancelled"
    assert 0 < line["ttft_ms"] <= line["duration_ms"]
    assert not {"queue_ms", "itl_p50_ms", "itl_p95_ms"} & set(line), line


async def test_cancel_of_an_unknown_id_reports_not_found(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """Cancel for an id that is not running answers cancelled=false."""
    reply = await stub.Cancel(pb.CancelRequest(request_id="nobody"))
    assert not reply.cancelled


SLOW_STEP_S = 0.3


async def _slow_server(spec: ModelSpec, tokenizer: Tokenizer, **overrides: object) -> RunningServer:
    """A scripted model that takes SLOW_STEP_S per forward: a cancel posted during a step
    reaches the decode thread only at the step's end."""
    token = tokenizer.encode(" x")[0]
    model = ScriptedModel(spec, dict.fromkeys(range(spec.context_length), token), SLOW_STEP_S)
    return await start_server(model, tokenizer, RecordingObserver(), **overrides)


@pytest.fixture
async def slow(spec: ModelSpec, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    running = await _slow_server(spec, tokenizer)
    yield running
    await running.server.drain()


async def _finish_reason(request: GenerationRequest, running: RunningServer) -> FinishReason:
    events = [event async for event in running.engine.submit(request).events()]
    assert isinstance(events[-1], CompletionEvent)
    return events[-1].finish_reason


async def test_a_cancelled_requests_id_is_free_for_a_new_request_at_once(
    slow: RunningServer,
) -> None:
    """Right after Cancel answers, a new request with the same id is accepted and runs to its
    end: the pending cancel ends the old stream only, never the new one."""
    async with grpc.aio.insecure_channel(slow.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        old = stub.Generate(greedy("x", max_tokens=100, request_id="again"))
        await old.read()
        reply = await stub.Cancel(pb.CancelRequest(request_id="again"))
        retry = await collect(stub, greedy("x", max_tokens=2, request_id="again"))
        rest: list[pb.GenerateResponse] = []
        while (message := await old.read()) is not grpc.aio.EOF:
            rest.append(message)
    assert reply.cancelled
    assert retry[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert rest[-1].completion.finish_reason == pb.FINISH_REASON_CANCELLED


async def test_a_stream_left_early_frees_its_id_at_once(slow: RunningServer) -> None:
    """A handle cancelled by its consumer frees its id before the decode thread has seen the
    cancel: a new request with that id is accepted and runs to its end."""
    handle = slow.engine.submit(GenerationRequest("left", "x", max_tokens=100, ignore_eos=True))
    await anext(aiter(handle.events()))
    handle.cancel()
    request = GenerationRequest("left", "x", max_tokens=2, ignore_eos=True)
    assert await _finish_reason(request, slow) == FinishReason.LENGTH


async def test_a_cancelled_requests_slot_is_taken_by_a_request_sent_right_after(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """With room for one request, a new one sent right after a cancel is taken, not refused as
    overload: the cancelled request leaves its row at the next step boundary, before any
    request is admitted to one, so the new one runs there (it never shares the row)."""
    running = await _slow_server(spec, tokenizer, max_batch_size=1, max_queue=0)
    try:
        engine = running.engine
        handle = engine.submit(GenerationRequest("first", "x", max_tokens=100, ignore_eos=True))
        await anext(aiter(handle.events()))
        handle.cancel()
        request = GenerationRequest("second", "x", max_tokens=2, ignore_eos=True)
        assert await _finish_reason(request, running) == FinishReason.LENGTH
        assert isinstance(running.observer, RecordingObserver)
        assert max(step.batch_size for step in running.observer.steps) == 1
    finally:
        await running.server.drain()
