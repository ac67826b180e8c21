"""Server metrics, scraped over HTTP from a real server: TTFT, ITL, outcomes, gauges."""

from __future__ import annotations

import asyncio
import http.client
import socket
import struct
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.conftest import (
    RunningServer,
    collect,
    eventually_awaited,
    eventually_blocking,
    greedy,
    start_server,
)
from tests.fakes import ScriptedModel
from tests.sockets import closed_within
from tokenwire.server.engine import CausalLM, ModelSpec, OnnxCausalLM
from tokenwire.server.telemetry.metrics import ServerMetrics, _MetricsServer
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


async def _metered(
    model: CausalLM, tokenizer: Tokenizer, **overrides: object
) -> tuple[RunningServer, Scraper]:
    """A real server exporting its metrics on their own port, and a scraper of them."""
    metrics = ServerMetrics()
    port, _ = metrics.serve("127.0.0.1", 0)
    return await start_server(model, tokenizer, metrics, **overrides), Scraper(port)


@pytest.fixture
async def metered(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> AsyncIterator[tuple[RunningServer, Scraper]]:
    running, scrape = await _metered(onnx_model, tokenizer, max_batch_size=2, max_queue=1)
    yield running, scrape
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

    async def recorded() -> bool:
        # The engine reports the end and its last step on its own thread, after the call ends.
        return (
            await scrape.value("tokenwire_requests_total", finish_reason="cancelled") == 1
            and await scrape.value("tokenwire_requests_running") == 0
        )

    assert await eventually_awaited(recorded)
    assert await scrape.value("tokenwire_requests_total", finish_reason="cancelled") == 1
    assert await scrape.value("tokenwire_requests_total", finish_reason="rejected") == 1
    assert await scrape.value("tokenwire_requests_running") == 0
    assert await scrape.value("tokenwire_requests_waiting") == 0


async def test_the_batch_size_gauge_is_0_once_the_server_is_idle(
    metered: tuple[RunningServer, Scraper],
) -> None:
    """After the last stream ends, tokenwire_batch_size reads 0 (no batch is decoding), not the
    size of the last step."""
    running, scrape = metered
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await asyncio.gather(
            *(collect(stub, greedy(p, max_tokens=6)) for p in ("def f():", "def g():"))
        )

    async def idle() -> bool:
        return (
            await scrape.value("tokenwire_requests_total", finish_reason="length") == 2
            and await scrape.value("tokenwire_batch_size") == 0
        )

    assert await eventually_awaited(idle)


async def test_gauges_return_to_zero_after_a_failed_step(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """A step that fails in the engine's own code (outside any forward) while two streams run
    ends the one still running with INTERNAL, and the running and KV-cache gauges, read while
    the engine is idle after it, are 0 again instead of the last good step's values."""
    model = ScriptedModel(spec, {}, step_delay_s=0.002)
    running, scrape = await _metered(model, tokenizer)
    model.malformed_on_calls = {model.calls + 3}  # the rows' cache breaks when one leaves
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            ends = await asyncio.gather(
                collect(stub, pb.GenerateRequest(prompt="x", max_tokens=6, ignore_eos=True)),
                collect(stub, pb.GenerateRequest(prompt="x", max_tokens=60, ignore_eos=True)),
                return_exceptions=True,
            )

        async def recorded() -> bool:
            return await scrape.value("tokenwire_requests_total", finish_reason="error") >= 1

        assert await eventually_awaited(recorded)
        assert any(
            isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.INTERNAL
            for e in ends
        ), ends
        assert await scrape.value("tokenwire_requests_running") == 0
        assert await scrape.value("tokenwire_kv_cache_usage_ratio") == 0
    finally:
        await running.server.drain()


@pytest.fixture
async def one_row(
    spec: ModelSpec, tokenizer: Tokenizer
) -> AsyncIterator[tuple[RunningServer, Scraper]]:
    """A metered server of one row on a scripted model (a step per 10 ms)."""
    model = ScriptedModel(spec, {}, step_delay_s=0.01)
    running, scrape = await _metered(model, tokenizer, max_batch_size=1)
    yield running, scrape
    await running.server.drain()


async def _cancel_while_queued(running: RunningServer) -> None:
    """One stream runs on the only row while another waits behind it and is cancelled; then
    the first finishes."""
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        first = stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=30, ignore_eos=True))
        await anext(aiter(first))
        queued = stub.Generate(greedy("waits here", max_tokens=5, request_id="queued"))
        for _ in range(250):  # until the server has it (a cancel is answered once)
            if (await stub.Cancel(pb.CancelRequest(request_id="queued"))).cancelled:
                break
            await asyncio.sleep(0.02)
        assert [m async for m in queued][-1].completion.finish_reason == (
            pb.FINISH_REASON_CANCELLED
        )
        assert [m async for m in first][-1].completion.finish_reason == pb.FINISH_REASON_LENGTH


async def _counted(scrape: Scraper, finished: int) -> bool:
    async def recorded() -> bool:
        return await scrape.value("tokenwire_requests_total", finish_reason="length") == finished

    return await eventually_awaited(recorded)


async def test_a_request_cancelled_in_the_queue_observes_no_queue_time(
    one_row: tuple[RunningServer, Scraper],
) -> None:
    """Queue time is arrival to the first prefill forward: a request cancelled while it waits
    for a row never had one and adds no observation (the one that ran adds one)."""
    running, scrape = one_row
    await _cancel_while_queued(running)
    assert await _counted(scrape, 1)
    assert await scrape.value("tokenwire_requests_total", finish_reason="cancelled") == 1
    assert await scrape.value("tokenwire_request_queue_seconds_count") == 1


async def test_a_request_cancelled_in_the_queue_processes_no_prompt_tokens(
    one_row: tuple[RunningServer, Scraper],
) -> None:
    """tokenwire_prompt_tokens_total counts prompt tokens processed: a request cancelled
    before its prefill adds none; the one that ran adds its prompt (one token, "x")."""
    running, scrape = one_row
    await _cancel_while_queued(running)
    assert await _counted(scrape, 1)
    assert await scrape.value("tokenwire_requests_total", finish_reason="cancelled") == 1
    assert await scrape.value("tokenwire_prompt_tokens_total") == 1


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

    async def released() -> bool:
        return await scrape.value("tokenwire_kv_cache_usage_ratio") == 0

    assert await eventually_awaited(released)


def _scrape_status(port: int) -> int | None:
    """The HTTP status of one scrape, None if the server closed the connection instead."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return int(answer.status)
    except (OSError, http.client.HTTPException):
        return None


def test_a_trickled_request_is_cut_when_its_connection_time_is_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer sending its request a byte every 0.2 s (each read well within the limit) is
    disconnected once the connection's time (1 s here) is up, not served for ever."""
    monkeypatch.setattr(_MetricsServer, "timeout_s", 1.0)
    port, _ = ServerMetrics().serve("127.0.0.1", 0)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        closed = closed_within(sock, 8.0, trickle=True)
    assert closed is not None
    assert closed < 6.0  # the peer never stops sending: only the 1 s limit closes it


def test_connections_past_the_limit_are_closed_and_scrapes_resume_when_one_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With two connections allowed, two idle peers hold both slots: a third connection is
    closed at once; once a peer leaves, a scrape is answered."""
    monkeypatch.setattr(_MetricsServer, "max_connections", 2)
    port, _ = ServerMetrics().serve("127.0.0.1", 0)
    # The listen queue is first in, first out: the server takes both idle peers (and fills
    # both slots) before it takes the third connection.
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", port)) as third:
            refused = closed_within(third, 5.0, trickle=False)
        idle.pop().close()
        # The slot comes back once the server has read the peer's end of file. Each scrape
        # holds the other slot until its thread ends, so one answered scrape is the proof.
        statuses: list[int | None] = []
        answered = eventually_blocking(
            lambda: statuses.append(_scrape_status(port)) or 200 in statuses
        )
    finally:
        for sock in idle:
            sock.close()
    assert refused is not None
    assert refused < 3.0  # an idle peer in a slot would be held for timeout_s (10 s)
    assert answered


def test_a_connection_reset_halfway_through_its_request_is_one_log_line_not_a_traceback(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A peer that resets its connection halfway through its request line (the server's read
    raises ConnectionResetError) ends it with one metrics.connection_failed log record, not a
    Python traceback on stderr."""
    port, _ = ServerMetrics().serve("127.0.0.1", 0)
    with capture_logs() as logs:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /metr")
            # Linger 0: close() sends a RST instead of a FIN, so the server's read fails with
            # ECONNRESET instead of seeing an orderly end of file.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        failed = "metrics.connection_failed"
        assert eventually_blocking(lambda: any(e["event"] == failed for e in logs)), logs
    records = [e for e in logs if e["event"] == failed]
    assert len(records) == 1, logs
    assert "ConnectionResetError" in records[0]["error"]
    assert "Traceback" not in capfd.readouterr().err
