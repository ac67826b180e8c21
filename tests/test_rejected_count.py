"""Every refused Generate counts once as `rejected`, whichever layer refused it, so the
documented completion-rate query holds on real traffic."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer, collect, eventually_awaited, greedy, start_server
from tests.fakes import ScriptedModel
from tokenwire.server.config import Settings
from tokenwire.server.engine import ModelSpec, OnnxCausalLM
from tokenwire.server.rpc.server import TokenwireServer
from tokenwire.server.telemetry.metrics import ServerMetrics
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

KEY = "k-rejected"
AUTH = (("authorization", f"Bearer {KEY}"),)
OBSERVABILITY = Path(__file__).resolve().parent.parent / "docs" / "observability.md"


async def _requests_total(port: int) -> dict[str, float]:
    """tokenwire_requests_total by finish_reason, from a live scrape of /metrics."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tokenwire_requests_total":
                found[sample.labels["finish_reason"]] = sample.value
    return found


@pytest.fixture
async def guarded(
    spec: ModelSpec, tokenizer: Tokenizer
) -> AsyncIterator[tuple[RunningServer, int]]:
    """A keyed server with room for one request (a slow scripted model) and its metrics port."""
    metrics = ServerMetrics()
    port, _ = metrics.serve("127.0.0.1", 0)
    slow = ScriptedModel(spec, {}, step_delay_s=0.01)
    running = await start_server(
        slow, tokenizer, metrics, api_keys=(KEY,), max_batch_size=1, max_queue=0
    )
    yield running, port
    await running.server.drain()


async def _refused(call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    return caught.value.code().name


async def test_every_kind_of_refusal_counts_once(
    guarded: tuple[RunningServer, int],
) -> None:
    """Eight refusals from every layer (key check, wire parsing, conversion, engine limits,
    admission) raise tokenwire_requests_total{finish_reason="rejected"} by exactly eight."""
    running, port = guarded
    before = (await _requests_total(port)).get("rejected", 0.0)
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        busy = stub.Generate(
            pb.GenerateRequest(prompt="a", max_tokens=400, ignore_eos=True), metadata=AUTH
        )
        await busy.initial_metadata()
        raw = channel.unary_stream(
            "/tokenwire.v1.GenerationService/Generate",
            request_serializer=lambda data: data,
            response_deserializer=lambda data: data,
        )
        codes = [
            await _refused(stub.Generate(greedy("x"))),  # no key
            await _refused(raw(b"\xff\xff\xff", metadata=AUTH)),  # not a protobuf message
            await _refused(stub.Generate(greedy(""), metadata=AUTH)),  # empty prompt
            await _refused(stub.Generate(greedy("x", request_id="a\x01b"), metadata=AUTH)),
            await _refused(
                stub.Generate(
                    pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=3.0)),
                    metadata=AUTH,
                )
            ),
            await _refused(
                stub.Generate(
                    pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=1.5)),
                    metadata=AUTH,
                )
            ),
            await _refused(stub.Generate(greedy("x", max_tokens=100_000), metadata=AUTH)),
            await _refused(stub.Generate(greedy("x"), metadata=AUTH)),  # the one slot is busy
        ]
        busy.cancel()
    assert codes == ["UNAUTHENTICATED"] + ["INVALID_ARGUMENT"] * 6 + ["RESOURCE_EXHAUSTED"]
    assert (await _requests_total(port))["rejected"] - before == 8


async def test_requests_while_the_model_loads_count_as_rejected() -> None:
    """UNAVAILABLE before an engine is attached (model still loading) counts as rejected."""
    metrics = ServerMetrics()
    port, _ = metrics.serve("127.0.0.1", 0)
    server = TokenwireServer(Settings(port=0), observer=metrics)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            code = await _refused(stub.Generate(greedy("x")))
    finally:
        await server.drain()
    assert code == "UNAVAILABLE"
    assert (await _requests_total(port))["rejected"] == 1


def _documented_completion_rate_reasons() -> tuple[str, str]:
    """The numerator's finish_reason regex and the denominator's selector, read from the
    completion-rate query in docs/observability.md."""
    text = OBSERVABILITY.read_text()
    block = text.split("Stream completion rate", 1)[1].split("```promql", 1)[1].split("```")[0]
    numerator, denominator = block.split("/")
    match = re.search(r'finish_reason=~"([^"]+)"', numerator)
    assert match is not None
    selector = re.search(r"tokenwire_requests_total(\{[^}]*\})?", denominator)
    assert selector is not None
    return match.group(1), selector.group(1) or ""


async def test_documented_completion_rate_matches_real_traffic(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """After 3 finished, 1 cancelled and 2 refused streams (one by conversion, one by the
    engine), the documented query over a live scrape gives 3 / 6."""
    metrics = ServerMetrics()
    port, _ = metrics.serve("127.0.0.1", 0)
    running = await start_server(onnx_model, tokenizer, metrics)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            for _ in range(3):
                await collect(stub, greedy("def f():", max_tokens=4))
            call = stub.Generate(greedy("def g():", max_tokens=400))
            async for _ in call:
                break
            call.cancel()
            for bad in (greedy(""), greedy("x", max_tokens=100_000)):
                with pytest.raises(grpc.aio.AioRpcError):
                    await collect(stub, bad)

        async def all_counted() -> bool:
            # The engine counts the cancelled stream on its own thread, after the call ended.
            return sum((await _requests_total(port)).values()) == 6

        assert await eventually_awaited(all_counted)
        totals = await _requests_total(port)
    finally:
        await running.server.drain()
    finished, denominator = _documented_completion_rate_reasons()
    assert denominator == ""  # every outcome, rejected ones included
    completed = sum(v for reason, v in totals.items() if re.fullmatch(finished, reason))
    assert completed / sum(totals.values()) == pytest.approx(3 / 6)
