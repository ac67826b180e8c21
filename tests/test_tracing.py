"""OpenTelemetry traces: the edge's span continues the caller's traceparent, the server's Generate
span continues the edge's (or any gRPC client's), and its queue, prefill and decode spans carry
what the Usage message says. Spans go to the SDK's in-memory exporter of a real server and a real
edge on 127.0.0.1:0."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import httpx
import pytest
import structlog
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from structlog.testing import capture_logs

from tests.conftest import MODEL, RunningEdge, collect, eventually, greedy
from tokenwire.common.settings import SettingsError
from tokenwire.edge import tracing as edge_tracing
from tokenwire.edge.server import EdgeServer
from tokenwire.edge.settings import EdgeSettings
from tokenwire.server.config import Settings
from tokenwire.server.domain import GenerationRequest
from tokenwire.server.engine import Engine, OnnxCausalLM
from tokenwire.server.engine.engine import LONG_PROMPT_CHARS
from tokenwire.server.main import engine_config
from tokenwire.server.rpc.server import TokenwireServer
from tokenwire.server.telemetry.tracing import GENERATE_SPAN, Tracing
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


@dataclasses.dataclass
class Traced:
    server: TokenwireServer
    edge: RunningEdge
    server_spans: InMemorySpanExporter
    edge_spans: InMemorySpanExporter

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def clear(self) -> None:
        self.server_spans.clear()
        self.edge_spans.clear()


@pytest.fixture(scope="module")
async def traced(onnx_model: OnnxCausalLM, tokenizer: Tokenizer) -> AsyncIterator[Traced]:
    """The bundled model behind a real server and a real edge, each exporting to memory."""
    server_spans, edge_spans = InMemorySpanExporter(), InMemorySpanExporter()
    settings = Settings(port=0, drain_grace_s=5.0)
    server = TokenwireServer(settings, tracing=Tracing.to(server_spans))
    await server.start()
    await server.attach(Engine(onnx_model, tokenizer, engine_config(settings)))
    edge_settings = EdgeSettings(port=0, grpc_target=f"127.0.0.1:{server.port}")
    edge = EdgeServer(edge_settings, tracing=edge_tracing.Tracing.to(edge_spans))
    await edge.start()
    yield Traced(server, RunningEdge(edge), server_spans, edge_spans)
    await edge.stop()
    await server.drain()


@pytest.fixture
def fresh(traced: Traced) -> Traced:
    """The traced pair with no spans from earlier tests."""
    traced.clear()
    return traced


def _hex(value: int, width: int) -> str:
    return f"{value:0{width}x}"


def _times(span: ReadableSpan) -> tuple[int, int]:
    """Start and end, in epoch nanoseconds."""
    assert span.start_time is not None
    assert span.end_time is not None
    return span.start_time, span.end_time


def _named(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


async def _spans(exporter: InMemorySpanExporter, count: int) -> tuple[ReadableSpan, ...]:
    """The exporter's spans once `count` have ended (a span ends just after its response)."""
    assert await eventually(lambda: len(exporter.get_finished_spans()) >= count)
    return exporter.get_finished_spans()


async def _completion(traced: Traced, **body: object) -> httpx.Response:
    request = {"model": MODEL, "prompt": "def f():", "max_tokens": 4, "temperature": 0} | body
    async with httpx.AsyncClient(base_url=traced.edge.url, timeout=60) as http:
        return await http.post(
            "/v1/completions", json=request, headers={"traceparent": TRACEPARENT}
        )


async def test_edge_span_continues_the_callers_traceparent_and_the_server_joins_it(
    fresh: Traced,
) -> None:
    """A traceparent sent to the edge is the edge span's parent; the server's spans share its
    trace id, with the Generate span a child of the edge span."""
    response = await _completion(fresh)
    assert response.status_code == 200
    (edge_span,) = await _spans(fresh.edge_spans, 1)
    server_spans = await _spans(fresh.server_spans, 4)
    assert edge_span.name == "POST /v1/completions"
    assert edge_span.kind == SpanKind.SERVER
    assert edge_span.parent is not None
    assert _hex(edge_span.parent.span_id, 16) == CALLER_SPAN
    assert _hex(edge_span.context.trace_id, 32) == CALLER_TRACE
    assert {_hex(s.context.trace_id, 32) for s in server_spans} == {CALLER_TRACE}
    generate = _named(server_spans, GENERATE_SPAN)
    assert generate.parent is not None
    assert generate.parent.span_id == edge_span.context.span_id


async def test_generate_span_tree_carries_gen_ai_attributes_and_the_usage_counts(
    fresh: Traced,
) -> None:
    """Generate has queue, prefill and decode children, laid end to end inside it; its gen_ai
    attributes name the model and request, and its usage counts are the Usage message's."""
    async with grpc.aio.insecure_channel(fresh.target) as channel:
        messages = await collect(pb_grpc.GenerationServiceStub(channel), greedy("def f():", 8))
    usage = next(m.usage for m in messages if m.WhichOneof("event") == "usage")
    spans = await _spans(fresh.server_spans, 4)
    generate = _named(spans, GENERATE_SPAN)
    queue, prefill, decode = (_named(spans, name) for name in ("queue", "prefill", "decode"))
    for child in (queue, prefill, decode):
        assert child.parent is not None
        assert child.parent.span_id == generate.context.span_id
    assert generate.kind == SpanKind.SERVER
    (started, ended), (queued, prefilled), (decoding, decoded) = map(
        _times, (generate, queue, decode)
    )
    assert started <= queued
    assert _times(prefill) == (prefilled, decoding)
    assert decoded <= ended
    assert (decoded - decoding) / 1e6 == pytest.approx(usage.decode_time_ms, abs=0.01)
    attributes = dict(generate.attributes or {})
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.request.max_tokens"] == 8
    assert attributes["gen_ai.request.temperature"] == 0.0
    assert attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens == 8
    assert attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert attributes["gen_ai.response.id"] == usage.request_id


async def test_a_continuation_that_generates_nothing_has_no_prefill_or_decode_span(
    fresh: Traced,
) -> None:
    """A continuation that brings every token of its stream generates none: like any stream
    without a token, its Generate span has a queue child only, though its Usage counts the
    delivered tokens."""
    async with grpc.aio.insecure_channel(fresh.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        first = await collect(stub, greedy("def f():", 4))
        delivered = [m.token.id for m in first if m.WhichOneof("event") == "token"]
        await _spans(fresh.server_spans, 4)
        fresh.clear()
        again = greedy("def f():", 4, continuation_ids=delivered)
        messages = await collect(stub, again)
    usage = next(m.usage for m in messages if m.WhichOneof("event") == "usage")
    assert (usage.completion_tokens, usage.time_to_first_token_ms) == (4, 0)
    assert await eventually(
        lambda: any(s.name == GENERATE_SPAN for s in fresh.server_spans.get_finished_spans())
    )
    spans = fresh.server_spans.get_finished_spans()
    assert sorted(s.name for s in spans) == sorted([GENERATE_SPAN, "queue"])


async def test_grpc_clients_traceparent_is_the_generate_spans_parent(fresh: Traced) -> None:
    """A traceparent sent as gRPC metadata by any client (not only the edge) is continued."""
    async with grpc.aio.insecure_channel(fresh.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        call = stub.Generate(greedy("x", 2), timeout=60, metadata=(("traceparent", TRACEPARENT),))
        [message async for message in call]
    generate = _named(await _spans(fresh.server_spans, 4), GENERATE_SPAN)
    assert _hex(generate.context.trace_id, 32) == CALLER_TRACE
    assert generate.parent is not None
    assert _hex(generate.parent.span_id, 16) == CALLER_SPAN


async def test_malformed_traceparent_starts_a_new_trace_and_the_request_is_served(
    fresh: Traced,
) -> None:
    """A traceparent that is not W3C Trace Context is ignored: the edge answers 200 and its span
    roots a new trace, which the server joins."""
    async with httpx.AsyncClient(base_url=fresh.edge.url, timeout=60) as http:
        response = await http.post(
            "/v1/generate",
            json={"prompt": "x", "max_tokens": 2},
            # An all-zero trace id, and a byte that is not ASCII.
            headers={"traceparent": f"00-{'0' * 32}-{CALLER_SPAN}-01".encode() + b"\xe9"},
        )
    assert response.status_code == 200
    (edge_span,) = await _spans(fresh.edge_spans, 1)
    generate = _named(await _spans(fresh.server_spans, 4), GENERATE_SPAN)
    assert edge_span.parent is None
    assert generate.context.trace_id == edge_span.context.trace_id != int(CALLER_TRACE, 16)


async def test_request_log_lines_carry_the_trace_and_span_ids(fresh: Traced) -> None:
    """The server's request.finished line and the edge's edge.stream line name the trace id of
    the request, and each the id of its own span."""
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with httpx.AsyncClient(base_url=fresh.edge.url, timeout=60) as http:
            response = await http.post(
                "/v1/generate",
                json={"prompt": "def f():", "max_tokens": 3},
                headers={"traceparent": TRACEPARENT},
            )
        assert response.status_code == 200
        (edge_span,) = await _spans(fresh.edge_spans, 1)
        generate = _named(await _spans(fresh.server_spans, 4), GENERATE_SPAN)
        assert await eventually(lambda: any(e["event"] == "edge.stream" for e in logs))
    finished = next(e for e in logs if e["event"] == "request.finished")
    streamed = next(e for e in logs if e["event"] == "edge.stream")
    assert finished["trace_id"] == streamed["trace_id"] == CALLER_TRACE
    assert finished["span_id"] == _hex(generate.context.span_id, 16)
    assert streamed["span_id"] == _hex(edge_span.context.span_id, 16)


async def test_refused_generate_span_has_error_status(fresh: Traced) -> None:
    """An invalid request's Generate span ends with status ERROR and the status code sent."""
    async with grpc.aio.insecure_channel(fresh.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        bad = greedy("x", 2)
        bad.sampling.temperature = 5.0
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(stub, bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (generate,) = await _spans(fresh.server_spans, 1)
    assert generate.status.status_code == StatusCode.ERROR
    attributes = dict(generate.attributes or {})
    assert attributes["rpc.response.status_code"] == "INVALID_ARGUMENT"
    assert attributes["error.type"] == "InvalidRequest"


async def test_a_refused_generate_span_names_the_field_not_the_callers_value(
    fresh: Traced,
) -> None:
    """A request refused for its prompt ends its span with a status that names the field and
    the rule but not the prompt (the caller's own status quotes it)."""
    secret = "SECRET-NOTE: the patient"
    async with grpc.aio.insecure_channel(fresh.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        bad = greedy(secret, 2)
        bad.prompt_ids.append(1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(stub, bad)
    assert secret in (refused.value.details() or "")
    (generate,) = await _spans(fresh.server_spans, 1)
    description = generate.status.description or ""
    assert description.startswith("INVALID_ARGUMENT: prompt: ")
    assert "SECRET" not in description


@dataclasses.dataclass
class _Gate:
    reached: threading.Event
    """A long prompt has reached the tokenizer thread."""
    release: threading.Event
    """Set: the held prompts are tokenized."""


@pytest.fixture
def tokenizer_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Gate]:
    """Long prompts wait on the tokenizer thread until `release` is set (set at the end)."""
    gate = _Gate(threading.Event(), threading.Event())
    encode = Engine._encode_released

    def gated(engine: Engine, request: GenerationRequest) -> list[int]:
        gate.reached.set()
        gate.release.wait(10)
        return encode(engine, request)

    monkeypatch.setattr(Engine, "_encode_released", gated)
    yield gate
    gate.release.set()


async def test_a_call_that_ends_while_its_prompt_is_tokenized_ends_its_span(
    fresh: Traced, tokenizer_gate: _Gate
) -> None:
    """A call whose deadline passes while its long prompt is being tokenized (held on the
    tokenizer thread until then, before the engine accepts it) ends its Generate span with
    DEADLINE_EXCEEDED and logs its end."""
    prompt = "#" * (LONG_PROMPT_CHARS + 100) + "\ndef f(n):"
    with capture_logs() as logs:
        async with grpc.aio.insecure_channel(fresh.target) as channel:
            await channel.channel_ready()
            stub = pb_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await collect(stub, greedy(prompt, 2), timeout=0.5)
        assert tokenizer_gate.reached.is_set(), (
            "the call ended before its prompt reached the tokenizer"
        )
        (generate,) = await _spans(fresh.server_spans, 1)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert generate.status.status_code == StatusCode.ERROR
    assert dict(generate.attributes or {})["rpc.response.status_code"] == "DEADLINE_EXCEEDED"
    assert any(e["event"] == "request.rejected" and e["code"] == "DEADLINE_EXCEEDED" for e in logs)


async def test_refused_edge_request_span_has_error_status(fresh: Traced) -> None:
    """A request the edge answers 400 ends its span with status ERROR and the status code."""
    response = await _completion(fresh, temperature=5)
    assert response.status_code == 400
    (edge_span,) = await _spans(fresh.edge_spans, 1)
    assert edge_span.status.status_code == StatusCode.ERROR
    assert dict(edge_span.attributes or {})["http.response.status_code"] == 400


def test_no_endpoint_installs_no_exporter() -> None:
    """With TOKENWIRE_OTLP_ENDPOINT unset, neither the server nor the edge has an exporter."""
    server = Tracing.from_endpoint(Settings.from_env({}).otlp_endpoint)
    edge = edge_tracing.Tracing.from_endpoint(EdgeSettings.from_env({}).otlp_endpoint)
    assert (server.exporter, edge.exporter) == (None, None)
    assert TokenwireServer(Settings()).tracing.exporter is None


def test_endpoint_setting_installs_an_otlp_exporter() -> None:
    """TOKENWIRE_OTLP_ENDPOINT gives the server and the edge an OTLP/gRPC span exporter."""
    env = {"TOKENWIRE_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    server = Tracing.from_endpoint(Settings.from_env(env).otlp_endpoint)
    edge = edge_tracing.Tracing.from_endpoint(EdgeSettings.from_env(env).otlp_endpoint)
    try:
        assert isinstance(server.exporter, OTLPSpanExporter)
        assert isinstance(edge.exporter, OTLPSpanExporter)
    finally:
        server.shutdown()
        edge.shutdown()


@pytest.mark.parametrize("settings", [Settings, EdgeSettings])
def test_endpoint_without_a_scheme_is_refused_naming_the_variable(settings: type) -> None:
    """An endpoint without http:// or https:// (which would silently mean TLS) is a settings
    error that names TOKENWIRE_OTLP_ENDPOINT."""
    with pytest.raises(SettingsError, match="TOKENWIRE_OTLP_ENDPOINT"):
        settings.from_env({"TOKENWIRE_OTLP_ENDPOINT": "collector:4317"})
