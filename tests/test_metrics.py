"""Server metrics, scraped over HTTP from a real server: TTFT, ITL, outcomes, gauges."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer, collect, eventually, greedy, start_server
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.telemetry.metrics import ServerMetrics
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc


class Scraper:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    async def text(self) -> str:
        def fetch() -> str:
            with urllib.request.urlopen(self.url, timeout=5) as response:
                return str(response.read().decode())

        return await asyncio.to_thread(fetch)

    async def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        found = {}
        for family in text_string_to_metric_families(await self.text()):
            for s in family.samples:
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return found

    async def value(self, name: str, **labels: str) -> float:
        return (await self.samples()).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def metered(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> AsyncIterator[tuple[RunningServer, Scraper]]:
    metrics = ServerMetrics()
    port, _ = metrics.serve("127.0.0.1", 0)
    running = await start_server(onnx_model, tokenizer, metrics, max_batch_size=2, max_queue=1)
    yield running, Scraper(port)
    await running.server.drain()


async def test_completed_streams_count_requests_ttft_and_itl(
    metered: tuple[RunningServer, Scraper],
) -> None:
    """N streams of T tokens add N to length, N to the TTFT count and N*(T-1) to the ITL count."""
    running, scrape = metered
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for _ in range(3):
            await collect(stub, greedy("def f():", max_tokens=6))
    assert await scrape.value("tokenwire_requests_total", finish_reason="length") == 3
    assert await scrape.value("tokenwire_time_to_first_token_seconds_count") == 3
    assert await scrape.value("tokenwire_inter_token_latency_seconds_count") == 3 * 5
    assert await scrape.value("tokenwire_generation_tokens_total") == 18


async def test_cancel_and_rejection_are_counted_and_gauges_return_to_zero(
    metered: tuple[RunningServer, Scraper],
) -> None:
    """A cancelled stream counts as cancelled, a refused one as rejected; gauges end at 0."""
    running, scrape = metered
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        call = stub.Generate(greedy("def g():", max_tokens=400))
        async for _ in call:
            break
        call.cancel()
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(stub, pb.GenerateRequest(prompt="x", max_tokens=100_000))
    assert await eventually(lambda: running.engine.active_count == 0)
    await asyncio.sleep(0.05)
    assert await scrape.value("tokenwire_requests_total", finish_reason="cancelled") == 1
    assert await scrape.value("tokenwire_requests_total", finish_reason="rejected") == 1
    assert await scrape.value("tokenwire_requests_running") == 0
    assert await scrape.value("tokenwire_requests_waiting") == 0


async def test_exposition_has_no_unbounded_labels(metered: tuple[RunningServer, Scraper]) -> None:
    """Only bounded labels appear: no request ids, whatever requests ran."""
    running, scrape = metered
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await collect(stub, greedy("x", max_tokens=2, request_id="unique-id-42"))
    text = await scrape.text()
    assert "unique-id-42" not in text
    labels = {k for (_, pairs) in (await scrape.samples()) for k, _ in pairs}
    assert labels <= {"finish_reason", "le", "version", "model", "provider"}


async def test_kv_cache_usage_is_reported_while_streaming(
    metered: tuple[RunningServer, Scraper],
) -> None:
    """tokenwire_kv_cache_usage_ratio is the reserved share of max_kv_tokens during a stream,
    and 0 once it has ended."""
    running, scrape = metered
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        call = stub.Generate(greedy("def g():", max_tokens=300))
        seen = 0
        async for _ in call:
            seen += 1
            if seen == 20:
                during = await scrape.value("tokenwire_kv_cache_usage_ratio")
    prompt_tokens = len(running.engine.tokenizer.encode("def g():"))
    assert during == (prompt_tokens + 300) / running.engine.config.max_kv_tokens
    assert await eventually(lambda: running.engine.active_count == 0)
    await asyncio.sleep(0.05)
    assert await scrape.value("tokenwire_kv_cache_usage_ratio") == 0
