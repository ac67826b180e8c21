"""Cancellation and deadlines reach the engine and free its slots."""

from __future__ import annotations

import grpc

from tests.conftest import RunningServer, collect, eventually, greedy
from tests.fakes import RecordingObserver
from tokenwire.server.domain import FinishReason
from tokenwire.server.engine import RequestRecord
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc


def _recorded(served: RunningServer, request_id: str) -> RequestRecord:
    assert isinstance(served.observer, RecordingObserver)
    return served.observer.finished[request_id]


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
    record = _recorded(served, "cancel-me")
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


async def test_deadline_ends_the_stream_with_deadline_exceeded(
    stub: pb_grpc.GenerationServiceStub, served: RunningServer
) -> None:
    """A deadline shorter than the generation ends it as deadline_exceeded and frees the engine.

    Whichever notices first, the client sees it: a DEADLINE_EXCEEDED status (gRPC's timer) or a
    completion with FINISH_REASON_DEADLINE_EXCEEDED (the engine's check between steps).
    """
    request = greedy("def slow():", max_tokens=450, request_id="late")
    try:
        messages = await collect(stub, request, timeout=0.05)
        seen = messages[-1].completion.finish_reason
    except grpc.aio.AioRpcError as error:
        seen = error.code()
    assert seen in {grpc.StatusCode.DEADLINE_EXCEEDED, pb.FINISH_REASON_DEADLINE_EXCEEDED}
    assert await eventually(lambda: served.engine.active_count == 0, within_s=5.0)
    record = _recorded(served, "late")
    assert record.finish_reason == FinishReason.DEADLINE_EXCEEDED
    assert record.completion_tokens < 450


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


async def test_cancel_of_an_unknown_id_reports_not_found(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """Cancel for an id that is not running answers cancelled=false."""
    reply = await stub.Cancel(pb.CancelRequest(request_id="nobody"))
    assert not reply.cancelled
