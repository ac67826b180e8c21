"""A target that spreads over several servers (a Kubernetes headless Service's DNS name, or
ipv4:a,b) sends new work only to the servers whose health reports SERVING: one that has begun
to drain gets no new stream, and the edge's readiness does not depend on which server its
check lands on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest

from tests.conftest import RunningServer, eventually, start_edge, start_server
from tests.fakes import RecordingObserver, ScriptedModel
from tokenwire.client import AsyncTokenwireClient, GenerateOptions
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc


@pytest.fixture
async def pair(
    spec: ModelSpec, tokenizer: Tokenizer
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two servers of a scripted model (a step per 10 ms); the first is put into a drain held
    open by a stream of 500 tokens (5 s, as long as the drain waits for it; the tests end
    sooner)."""
    model = ScriptedModel(spec, {}, step_delay_s=0.01)
    draining = await start_server(model, tokenizer, RecordingObserver())
    serving = await start_server(model, tokenizer, RecordingObserver())
    async with grpc.aio.insecure_channel(draining.target) as channel:
        request = pb.GenerateRequest(prompt="x", max_tokens=500, ignore_eos=True)
        held = pb_grpc.GenerationServiceStub(channel).Generate(request)
        await held.read()
        drain = asyncio.create_task(draining.server.drain())
        assert await eventually(lambda: not draining.engine.accepting)
        yield draining, serving
        held.cancel()
        await drain
    await serving.server.drain()


def _refusals(server: RunningServer) -> list[str]:
    assert isinstance(server.observer, RecordingObserver)
    return server.observer.rejected


async def test_new_streams_go_only_to_the_server_that_is_serving(
    pair: tuple[RunningServer, RunningServer],
) -> None:
    """Eight streams through one channel over both servers all finish, and the draining
    server refuses none of them: none was sent to it."""
    draining, serving = pair
    options = GenerateOptions(max_tokens=2, ignore_eos=True)
    async with AsyncTokenwireClient(f"ipv4:{draining.target},{serving.target}") as client:
        for _ in range(8):
            events = [event async for event in client.generate("x = ", options)]
            assert events[-1].finish_reason == "length"  # type: ignore[union-attr]
    assert _refusals(draining) == []


async def test_the_edge_stays_ready_while_one_of_its_servers_drains(
    pair: tuple[RunningServer, RunningServer],
) -> None:
    """Five readiness probes of an edge whose one upstream target spreads over a draining and
    a serving server all answer 200 (each one asks a server: a ready answer is kept for half
    a second)."""
    draining, serving = pair
    edge = await start_edge(f"ipv4:{draining.target},{serving.target}")
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
            statuses = []
            for _ in range(5):
                statuses.append((await http.get("/readyz")).status_code)
                await asyncio.sleep(0.55)
    finally:
        await edge.edge.stop()
    assert statuses == [200] * 5
