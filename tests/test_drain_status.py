"""A draining or drained server answers new calls UNAVAILABLE, which clients retry elsewhere,
never CANCELLED (which they do not)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.conftest import RunningServer, collect, eventually, greedy, start_server
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2_grpc as pb_grpc


@pytest.fixture
async def doomed(onnx_model: OnnxCausalLM, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    """A server each test drains itself (draining again at teardown is a no-op)."""
    running = await start_server(onnx_model, tokenizer)
    yield running
    await running.server.drain()


async def _status(stub: pb_grpc.GenerationServiceStub) -> grpc.StatusCode:
    try:
        await collect(stub, greedy("late", max_tokens=1), timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_generate_after_the_drain_is_unavailable(doomed: RunningServer) -> None:
    """Once drain() has returned, a new Generate on the same channel gets UNAVAILABLE."""
    async with grpc.aio.insecure_channel(doomed.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        assert await _status(stub) == grpc.StatusCode.OK
        await doomed.server.drain()
        assert await _status(stub) == grpc.StatusCode.UNAVAILABLE


async def test_generate_while_streams_drain_is_unavailable(doomed: RunningServer) -> None:
    """While an in-flight stream finishes its drain, a new Generate gets UNAVAILABLE."""
    async with grpc.aio.insecure_channel(doomed.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        running = stub.Generate(greedy("def f():", max_tokens=400))
        await running.read()
        drain = asyncio.create_task(doomed.server.drain())
        assert await eventually(lambda: not doomed.engine.accepting)
        status = await _status(stub)
        running.cancel()
        await drain
    assert status == grpc.StatusCode.UNAVAILABLE


async def test_a_retrying_client_sees_only_unavailable_through_the_end_of_a_drain(
    doomed: RunningServer,
) -> None:
    """A client calling again every 100 ms (the client retry policy's pace) from the start of
    a drain until well after the server stopped gets UNAVAILABLE, except at most one call that
    lands in grpc core's own shutdown window (CANCELLED; see docs/security.md)."""
    seen: list[grpc.StatusCode] = []
    async with grpc.aio.insecure_channel(doomed.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        running = stub.Generate(greedy("def f():", max_tokens=200))
        await running.read()
        drain = asyncio.create_task(doomed.server.drain())
        after = 0
        while after < 3:
            seen.append(await _status(stub))
            after += drain.done()
            await asyncio.sleep(0.1)
        running.cancel()
    assert seen.count(grpc.StatusCode.CANCELLED) <= 1
    assert set(seen) - {grpc.StatusCode.CANCELLED} == {grpc.StatusCode.UNAVAILABLE}
