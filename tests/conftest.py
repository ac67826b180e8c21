"""Shared fixtures: the bundled model, and real servers on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse
from hypothesis.configuration import set_hypothesis_home_dir

from tests import sentencepiece
from tests.fakes import RecordingObserver, ScriptedModel
from tests.redisproc import RedisServer
from tokenwire.edge.context import EdgeContext
from tokenwire.edge.resumable import ResumableStreams
from tokenwire.edge.server import EdgeServer
from tokenwire.edge.settings import EdgeSettings
from tokenwire.edge.store import ResumeStore
from tokenwire.server.config import BUNDLED_MODEL_DIR, Settings
from tokenwire.server.engine import (
    CausalLM,
    Engine,
    EngineObserver,
    ModelSpec,
    NullObserver,
    OnnxCausalLM,
)
from tokenwire.server.main import engine_config
from tokenwire.server.rpc.server import TokenwireServer
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

# Hypothesis keeps caches (constants found in the code, Unicode tables) under ./.hypothesis even
# with database=None: it keeps them in a folder of this run's own instead, so a test run writes
# nothing in the tree. Set before any test asks Hypothesis for its storage.
HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="tokenwire-hypothesis-")
set_hypothesis_home_dir(HYPOTHESIS_HOME)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(HYPOTHESIS_HOME, ignore_errors=True)


MODEL = ModelSpec.from_dir(BUNDLED_MODEL_DIR).name
"""The bundled model's id: what /v1/models lists and the OpenAI routes accept as `model`."""


@dataclasses.dataclass
class RunningServer:
    server: TokenwireServer
    engine: Engine
    observer: EngineObserver | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


async def start_server(
    model: CausalLM,
    tokenizer: Tokenizer,
    observer: EngineObserver | None = None,
    **overrides: object,
) -> RunningServer:
    """A real grpc.aio server on an ephemeral loopback port, with a warm engine attached."""
    settings = Settings(port=0, drain_grace_s=5.0, **overrides)  # type: ignore[arg-type]
    engine = Engine(model, tokenizer, engine_config(settings), observer)
    server = TokenwireServer(settings, observer=observer or NullObserver())
    await server.start()
    await server.attach(engine)
    return RunningServer(server, engine, observer)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(BUNDLED_MODEL_DIR)


@pytest.fixture(scope="module", params=sorted(sentencepiece.LAYOUTS))
def sp_tokenizer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Tokenizer:
    """A SentencePiece-style tokenizer (each layout of tests/sentencepiece.py), written at test
    time."""
    folder = tmp_path_factory.mktemp(request.param)
    return Tokenizer.from_dir(sentencepiece.write(folder, request.param))


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop for the mailboxes of Sequences that tests drive without an engine."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def spec() -> ModelSpec:
    return ModelSpec.from_dir(BUNDLED_MODEL_DIR)


@pytest.fixture(scope="session")
def onnx_model() -> OnnxCausalLM:
    return OnnxCausalLM(BUNDLED_MODEL_DIR, provider="cpu", intra_op_threads=2)


@pytest.fixture(scope="session")
async def served(onnx_model: OnnxCausalLM, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    """The bundled model behind a real server, shared by the tests that only read from it."""
    running = await start_server(onnx_model, tokenizer, RecordingObserver())
    yield running
    await running.server.drain()


@pytest.fixture
async def stub(served: RunningServer) -> AsyncIterator[pb_grpc.GenerationServiceStub]:
    async with grpc.aio.insecure_channel(served.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def greedy(prompt: str, max_tokens: int = 16, **fields: object) -> pb.GenerateRequest:
    """A deterministic request: temperature 0, EOS ignored so the length is known."""
    return pb.GenerateRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=pb.SamplingParams(temperature=0.0),
        ignore_eos=True,
        **fields,  # type: ignore[arg-type]
    )


async def collect(
    stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest, timeout: float = 60.0
) -> list[pb.GenerateResponse]:
    return [message async for message in stub.Generate(request, timeout=timeout)]


def text_of(messages: list[pb.GenerateResponse]) -> str:
    return "".join(m.token.text for m in messages if m.WhichOneof("event") == "token")


async def eventually(condition: Callable[[], bool], within_s: float = 5.0) -> bool:
    """Poll condition until it holds or within_s passes; return its last value."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    return condition()


async def eventually_awaited(check: Callable[[], Awaitable[bool]], within_s: float = 5.0) -> bool:
    """Await check until it holds or within_s passes; return its last value."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not await check() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    return await check()


def eventually_blocking(condition: Callable[[], bool], within_s: float = 5.0) -> bool:
    """`eventually` for a synchronous test: poll condition, sleeping between tries."""
    deadline = time.monotonic() + within_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@dataclasses.dataclass
class RunningEdge:
    edge: EdgeServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.edge.port}"

    @property
    def streams(self) -> ResumableStreams:
        """The in-memory store (the default)."""
        ctx = self.edge.app.state.ctx
        assert isinstance(ctx.streams, ResumableStreams)
        return ctx.streams

    @property
    def store(self) -> ResumeStore:
        """Whichever store the edge runs with."""
        ctx = self.edge.app.state.ctx
        assert isinstance(ctx, EdgeContext)
        return ctx.streams


async def start_edge(target: str, **overrides: object) -> RunningEdge:
    """The real edge app under uvicorn on an ephemeral loopback port."""
    settings = EdgeSettings(port=0, grpc_target=target, **overrides)  # type: ignore[arg-type]
    edge = EdgeServer(settings)
    await edge.start()
    return RunningEdge(edge)


@pytest.fixture
async def edge(served: RunningServer) -> AsyncIterator[RunningEdge]:
    """The edge in front of the shared server, with a 2 s resume window."""
    running = await start_edge(served.target, resume_window_s=2.0)
    yield running
    await running.edge.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server of this test's own on a loopback port."""
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
async def paced(spec: ModelSpec, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    """A server whose scripted model emits one non-EOS token every 10 ms: timing-safe streams."""
    token = tokenizer.encode(" x")[0]
    model = ScriptedModel(spec, dict.fromkeys(range(spec.context_length), token), 0.01)
    running = await start_server(model, tokenizer, RecordingObserver())
    yield running
    await running.server.drain()


async def cancelled_after(
    reader: httpx.AsyncClient,
    canceller: httpx.AsyncClient,
    count: int,
    body: dict[str, object],
    request_id: str,
) -> tuple[list[ServerSentEvent], httpx.Response]:
    """Start a native stream with `reader`, and after its first `count` events ask
    `canceller` (the same edge or another one) to cancel it; return every event the reader got
    and the cancel's reply."""
    events: list[ServerSentEvent] = []
    reply: httpx.Response | None = None
    headers = {"X-Request-ID": request_id}
    async with aconnect_sse(reader, "POST", "/v1/generate", json=body, headers=headers) as source:
        async for event in source.aiter_sse():
            events.append(event)
            if len(events) == count:
                reply = await canceller.post(f"/v1/generate/{request_id}/cancel", json={})
    assert reply is not None, f"the stream ended before {count} events"
    return events, reply


@pytest.fixture
def interruptible() -> Iterator[None]:
    """Children get SIGINT's default disposition: a suite started as a background job inherits
    an ignored SIGINT, which a child process would inherit too (and rightly ignore)."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
