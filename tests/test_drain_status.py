"""A draining or drained server answers new calls UNAVAILABLE, which clients retry elsewhere,
never CANCELLED (which they do not); a client whose channel watches health says why."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from tests.conftest import RunningServer, collect, eventually, greedy, start_edge, start_server
from tokenwire.client import AsyncTokenwireClient
from tokenwire.client.errors import NOT_SERVING, Unavailable
from tokenwire.client.messages import GenerateOptions
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


async def test_a_client_told_no_server_is_serving_says_so(doomed: RunningServer) -> None:
    """The Python client, whose channel watches each server's health, against a server that
    reports NOT_SERVING (as a draining one does): Unavailable whose message says no server
    reports SERVING (starting, draining or stopped), not only gRPC's `backend unhealthy`."""
    await doomed.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    async with AsyncTokenwireClient([doomed.target], timeout_s=10) as client:
        with pytest.raises(Unavailable) as caught:
            async for _ in client.generate("x", GenerateOptions(max_tokens=1)):
                pass
    assert caught.value.message.startswith(NOT_SERVING)


async def test_the_edge_told_no_server_is_serving_says_so(doomed: RunningServer) -> None:
    """Through the edge, the same: a 503 whose message says no server reports SERVING, with
    a Retry-After, rather than that the server cannot be reached."""
    await doomed.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    edge = await start_edge(doomed.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            response = await http.post("/v1/generate", json={"prompt": "x", "max_tokens": 1})
    finally:
        await edge.edge.stop()
    assert response.status_code == 503
    assert response.json()["error"]["message"] == NOT_SERVING
    assert response.headers["retry-after"] == "1"
