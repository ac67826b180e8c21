"""A stream whose server is killed continues on another replica, as one event sequence.

Two real `tokenwire serve` processes on the bundled model; the client streams 400 tokens from
the first, which is killed with SIGKILL once 50 tokens have arrived. The client continues on
the second with the tokens it already had: indices 0..399 exactly once, one Usage, one
Completion, and, for greedy and seeded sampling, the ids an uninterrupted run gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.conftest import MODEL, RunningServer, eventually, start_edge, start_server
from tests.procs import ServerProcess
from tests.replicas import GoneReplica, Relay, SlowReplica
from tokenwire.client import AsyncTokenwireClient, TokenwireClient, failover
from tokenwire.client.errors import (
    Cancelled,
    DeadlineExceeded,
    ModelMismatch,
    TokenwireError,
    Unavailable,
)
from tokenwire.client.failover import Resumption
from tokenwire.client.messages import Completion, GenerateOptions, StreamEvent, Token, Usage
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

PROMPT = "def fib(n):"
MODEL_KEY = "x-tokenwire-model"
RELAYED = ("x-request-id", "x-tokenwire-seed", MODEL_KEY, "x-tokenwire-max-tokens")
"""The initial metadata a relay passes on from the server behind it."""
KILL_AT = 50
OPTIONS = {
    "greedy": GenerateOptions(max_tokens=400, temperature=0.0, ignore_eos=True),
    "seeded": GenerateOptions(max_tokens=400, temperature=0.9, seed=42, ignore_eos=True),
    "unseeded": GenerateOptions(max_tokens=400, temperature=0.9, ignore_eos=True),
}

pytestmark = pytest.mark.slow


@pytest.fixture
def pair() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two server processes; the first is the one the client starts on."""
    first = ServerProcess("--metrics-port", "0")
    second = ServerProcess("--metrics-port", "0")
    first.wait_for("server.started")
    second.wait_for("server.started")
    yield first, second
    first.close()
    second.close()


def _assert_one_sequence(events: list[StreamEvent], tokens: int) -> None:
    indices = [e.index for e in events if isinstance(e, Token)]
    assert indices == list(range(tokens))
    assert [type(e) for e in events[-2:]] == [Usage, Completion]
    assert sum(isinstance(e, Usage | Completion) for e in events) == 2
    usage = events[-2]
    assert isinstance(usage, Usage)
    assert usage.completion_tokens == tokens


async def _stream(
    targets: list[str], options: GenerateOptions, kill: ServerProcess | None
) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    async with AsyncTokenwireClient(targets) as client:
        async for event in client.generate(PROMPT, options):
            events.append(event)
            if kill is not None and isinstance(event, Token) and event.index == KILL_AT:
                kill.proc.kill()
    return events


@pytest.mark.parametrize("mode", sorted(OPTIONS))
async def test_client_continues_on_the_survivor_after_kill_9(
    pair: tuple[ServerProcess, ServerProcess], mode: str
) -> None:
    """Killing the serving replica mid-stream costs the caller nothing but a delay."""
    first, second = pair
    events = await _stream([first.target, second.target], OPTIONS[mode], kill=first)
    second.wait_for("request.finished")
    _assert_one_sequence(events, 400)
    if mode != "unseeded":
        alone = await _stream([second.target], OPTIONS[mode], kill=None)
        assert [e.id for e in events if isinstance(e, Token)] == [
            e.id for e in alone if isinstance(e, Token)
        ]


def test_cli_json_stream_continues_after_kill_9(pair: tuple[ServerProcess, ServerProcess]) -> None:
    """`tokenwire generate --json --target a,b` prints one uninterrupted event per line."""
    first, second = pair
    command = [
        sys.executable,
        "-m",
        "tokenwire.client.command",
        "generate",
        PROMPT,
        "--json",
        "--target",
        f"{first.target},{second.target}",
        "--max-tokens",
        "400",
        "--temperature",
        "0",
        "--ignore-eos",
    ]
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(json.loads(line))
            if len(lines) == KILL_AT:
                first.proc.kill()
        assert proc.wait(60) == 0
    second.wait_for("request.finished")
    tokens = [line["token"] for line in lines if "token" in line]
    assert [t["index"] for t in tokens] == list(range(400))
    assert [next(iter(line)) for line in lines[-2:]] == ["usage", "completion"]


async def test_one_round_robin_target_continues_on_another_address(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    """With one ipv4: target listing both replicas, two concurrent streams land one on each;
    killing one replica mid-stream, both streams still arrive whole."""
    first, second = pair
    async with AsyncTokenwireClient(f"ipv4:{first.target},{second.target}") as client:
        short = GenerateOptions(max_tokens=2, temperature=0.0)
        for _ in range(4):  # round robin reaches both replicas once they are READY
            [_ async for _ in client.generate(PROMPT, short)]

        async def stream(kill: bool) -> list[StreamEvent]:
            events: list[StreamEvent] = []
            async for event in client.generate(PROMPT, OPTIONS["greedy"]):
                events.append(event)
                if kill and isinstance(event, Token) and event.index == KILL_AT:
                    first.proc.kill()
            return events

        both = await asyncio.gather(stream(True), stream(False))
    for events in both:
        _assert_one_sequence(events, 400)


BODY = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}


async def test_edge_native_stream_continues_after_its_server_is_killed(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    """A native SSE stream through an edge whose --grpc-target lists both replicas: the first
    is killed after 50 token events, and the stream still has tokens 0..399, usage, done."""
    first, second = pair
    edge = await start_edge(f"{first.target},{second.target}")
    events = []
    try:
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=60) as http,
            aconnect_sse(http, "POST", "/v1/generate", json=BODY) as source,
        ):
            async for event in source.aiter_sse():
                events.append(event)
                if sum(e.event == "token" for e in events) == KILL_AT and event.event == "token":
                    first.proc.kill()
    finally:
        await edge.edge.stop()
    second.wait_for("request.finished")
    assert [json.loads(e.data)["index"] for e in events if e.event == "token"] == list(range(400))
    assert [e.event for e in events[-2:]] == ["usage", "done"]


async def test_edge_openai_stream_continues_after_its_server_is_killed(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    """An OpenAI completions stream through the edge loses its server after 50 chunks and
    still ends with finish_reason length and no error chunk."""
    first, second = pair
    edge = await start_edge(f"{first.target},{second.target}")
    chunks = []
    try:
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=60) as http,
            http.stream(
                "POST", "/v1/completions", json={**BODY, "model": MODEL, "stream": True}
            ) as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line.removeprefix("data: ")))
                    if len(chunks) == KILL_AT:
                        first.proc.kill()
    finally:
        await edge.edge.stop()
    second.wait_for("request.finished")
    alone = await _stream([second.target], OPTIONS["greedy"], kill=None)
    assert "error" not in json.dumps(chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] or "" for c in chunks if c["choices"])
    assert text == "".join(e.text for e in alone if isinstance(e, Token))


class CutRelay(Relay):
    """A replica that dies at a chosen point: it relays to a real server and ends each stream
    with UNAVAILABLE right after relaying the message `cut` picks. With `info_target`, its
    GetModelInfo answers come from that other server (as when replicas behind one channel, or
    a target replaced since its answer was kept, serve different models)."""

    ends_quietly = False
    """Whether a cut stream ends with OK (no Usage, no Completion) instead of UNAVAILABLE."""
    dies = False
    """Whether the replica is gone after its first cut: every later stream UNAVAILABLE."""
    gone = False

    def __init__(
        self,
        target: str,
        cut: Callable[[pb.GenerateResponse], bool],
        info_target: str | None = None,
    ) -> None:
        super().__init__(target)
        self._info_stub = self._stub_of(info_target or target)
        self._cut = cut

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        if self.gone:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica is gone")
        call = self._stub.Generate(request)
        header = await call.initial_metadata()
        await context.send_initial_metadata([(k, v) for k, v in header if k in RELAYED])
        async for message in call:
            yield message
            if self._cut(message):
                call.cancel()
                self.gone = self.dies
                if self.ends_quietly:
                    return
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelInfoResponse:
        return await self._info_stub.GetModelInfo(request)


@contextlib.asynccontextmanager
async def cut_relay(
    target: str,
    cut: Callable[[pb.GenerateResponse], bool],
    info_target: str | None = None,
    *,
    dies: bool = False,
) -> AsyncIterator[CutRelay]:
    relay = CutRelay(target, cut, info_target)
    relay.dies = dies
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


class LosesFirstStream(CutRelay):
    """A replica whose first stream breaks right after its headers, before any token, while
    the server behind it runs that stream on (it has yet to notice the break); later streams
    pass through whole."""

    def __init__(self, target: str, *, headers: bool = True) -> None:
        super().__init__(target, lambda message: False)
        self.lost: list[Any] = []
        self.headers = headers
        """Whether the broken stream's headers reach the caller before the break."""

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        if self.lost:
            async for message in super().Generate(request, context):
                yield message
            return
        call = self._stub.Generate(request)
        self.lost.append(call)
        header = await call.initial_metadata()
        if self.headers:
            await context.send_initial_metadata([(k, v) for k, v in header if k in RELAYED])
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")


async def test_a_stream_broken_before_its_first_token_is_retried_in_its_place(
    paced: RunningServer,
) -> None:
    """A stream that breaks after its server accepted it but before its first token is retried
    with its id on the same server, which still runs the broken stream: the retry takes its
    place and streams the whole generation, instead of being refused for a taken id."""
    options = GenerateOptions(max_tokens=12, temperature=0.0, ignore_eos=True)
    events, lost = await _losing_the_first_stream(paced, options, headers=True)
    _assert_one_sequence(events, 12)
    assert lost == 1


async def _losing_the_first_stream(
    server: RunningServer, options: GenerateOptions, *, headers: bool
) -> tuple[list[StreamEvent], int]:
    """A stream's events through a LosesFirstStream relay in front of `server`, and how many
    streams the relay broke."""
    relay = LosesFirstStream(server.target, headers=headers)
    await relay.start()
    try:
        async with AsyncTokenwireClient([relay.target]) as client:
            events = [event async for event in client.generate(PROMPT, options)]
    finally:
        await relay.stop()
    return events, len(relay.lost)


async def test_a_stream_broken_before_its_headers_arrived_is_retried_in_its_place(
    paced: RunningServer,
) -> None:
    """A stream of the caller's own id whose connection breaks after its server accepted it
    but before its headers arrived (the caller cannot tell it was accepted) is retried with
    its id on the same server, which still runs the broken stream: the retry takes its place
    and streams the whole generation, instead of being refused for a taken id."""
    options = GenerateOptions(
        max_tokens=12, temperature=0.0, ignore_eos=True, request_id="mine-before-headers"
    )
    events, lost = await _losing_the_first_stream(paced, options, headers=False)
    _assert_one_sequence(events, 12)
    assert lost == 1


async def test_edge_stream_broken_before_its_headers_arrived_is_retried_in_its_place(
    paced: RunningServer,
) -> None:
    """Through the edge (which sends every stream with an id of its own), a stream whose
    connection breaks after its server accepted it but before its headers arrived is retried
    on the same server as a retry of its id: the native stream gets its 12 tokens and ends
    done, not an error for a taken id."""
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    relay = LosesFirstStream(paced.target, headers=False)
    await relay.start()
    try:
        events = await _through_edge(relay.target, body)
    finally:
        await relay.stop()
    tokens = [e for e in events if e.event == "token"]
    assert [json.loads(e.data)["index"] for e in tokens] == list(range(12))
    assert events[-1].event == "done"
    assert len(relay.lost) == 1


def test_an_attempt_after_a_lost_connection_is_a_retry_and_after_a_refusal_is_not() -> None:
    """UNAVAILABLE from a server (a refusal: it carries the server's status), or from a
    channel that reached no server, leaves the next attempt a fresh request; UNAVAILABLE from
    the caller's own channel after the request went out (a lost connection, after which the
    server may run the stream on) makes it a retry of the stream's id."""
    resume = Resumption.start(pb.GenerateRequest(prompt="x"), 10.0)
    resume.broke(Unavailable(grpc.StatusCode.UNAVAILABLE, "draining", from_channel=False))
    unreached = "failed to connect to all addresses; last error: UNKNOWN: Connection refused"
    resume.broke(Unavailable(grpc.StatusCode.UNAVAILABLE, unreached, from_channel=True))
    assert not resume.request().retry
    resume.broke(Unavailable(grpc.StatusCode.UNAVAILABLE, "Socket closed", from_channel=True))
    assert resume.request().retry


def test_only_an_attempt_after_an_accepted_one_is_a_retry() -> None:
    """A stream's first attempt, and one after a server refused it (no request id in its
    headers), is no retry, so a fresh request with a running id is still refused; an attempt
    after a server accepted the stream is one."""
    resume = Resumption.start(pb.GenerateRequest(prompt="x"), 10.0)
    assert not resume.request().retry
    resume.see_metadata([])
    assert not resume.request().retry
    resume.see_metadata([("x-request-id", "kept")])
    assert resume.request().retry


def _after_usage(message: pb.GenerateResponse) -> bool:
    return message.HasField("usage")


def _after_token(index: int) -> Callable[[pb.GenerateResponse], bool]:
    return lambda message: message.HasField("token") and message.token.index == index


@pytest.fixture(scope="module")
async def gpt2() -> AsyncIterator[RunningServer]:
    """A server on another model (the gpt2 fixture) than the bundled one."""
    model_dir = BUNDLED_MODEL_DIR.parent / "fixtures" / "gpt2"
    model = OnnxCausalLM(model_dir, provider="cpu", intra_op_threads=1)
    running = await start_server(model, Tokenizer.from_dir(model_dir))
    yield running
    await running.server.drain()


CUT_CASES = {
    "length": (GenerateOptions(max_tokens=8, temperature=0.0, ignore_eos=True), "length"),
    "stop": (GenerateOptions(max_tokens=40, temperature=0.0, stop=("\n",)), "stop_sequence"),
}


@pytest.mark.parametrize("case", sorted(CUT_CASES))
async def test_a_stream_cut_after_its_usage_delivers_one_usage(
    served: RunningServer, case: str
) -> None:
    """A replica that dies between Usage and Completion: the caller gets that Usage once (not
    the continuation's again) and the continuation's Completion, with the stream's reason."""
    options, reason = CUT_CASES[case]
    async with (
        cut_relay(served.target, _after_usage) as relay,
        AsyncTokenwireClient([relay.target, served.target]) as client,
    ):
        events = [event async for event in client.generate(PROMPT, options)]
    tokens = [e for e in events if isinstance(e, Token)]
    assert [type(e) for e in events] == [Token] * len(tokens) + [Usage, Completion]
    usage, completion = events[-2:]
    assert isinstance(usage, Usage)
    assert usage.completion_tokens == len(tokens)
    assert isinstance(completion, Completion)
    assert completion.finish_reason == reason


async def test_a_cancelled_stream_cut_after_its_usage_ends_cancelled(paced: RunningServer) -> None:
    """A stream cancelled at its server (Cancel) whose replica dies between its Usage and its
    Completion: the continuation would generate on, so the stream ends there with its one
    Usage and a cancelled Completion, not an error."""
    options = GenerateOptions(max_tokens=400, temperature=0.0, request_id="cut-cancelled")
    events: list[StreamEvent] = []
    async with (
        cut_relay(paced.target, _after_usage) as relay,
        AsyncTokenwireClient([relay.target, paced.target]) as client,
        AsyncTokenwireClient(paced.target) as canceller,
    ):
        async for event in client.generate(PROMPT, options):
            events.append(event)
            if isinstance(event, Token) and event.index == 2:
                assert await canceller.cancel("cut-cancelled")
    tokens = [e for e in events if isinstance(e, Token)]
    assert [type(e) for e in events] == [Token] * len(tokens) + [Usage, Completion]
    usage, completion = events[-2:]
    assert isinstance(usage, Usage)
    assert usage.completion_tokens == len(tokens) < 400
    assert isinstance(completion, Completion)
    assert completion.finish_reason == "cancelled"


async def test_the_blocking_client_delivers_one_usage_when_cut_after_it(
    served: RunningServer,
) -> None:
    """The blocking client, too, passes on one Usage and one Completion when the stream's
    replica dies between the two."""
    options, _ = CUT_CASES["length"]
    async with cut_relay(served.target, _after_usage) as relay:

        def stream() -> list[StreamEvent]:
            with TokenwireClient([relay.target, served.target]) as client:
                return list(client.generate(PROMPT, options))

        events = await asyncio.to_thread(stream)
    assert [type(e) for e in events] == [Token] * 8 + [Usage, Completion]


async def test_edge_stream_cut_after_its_usage_sends_one_usage(served: RunningServer) -> None:
    """Through the edge, a replica that dies between Usage and Completion: the native stream
    has its tokens, one `usage` and `done`."""
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    async with cut_relay(served.target, _after_usage) as relay:
        events = await _through_edge(f"{relay.target},{served.target}", body)
    assert [e.event for e in events] == ["token"] * 8 + ["usage", "done"]


async def test_edge_cancelled_stream_cut_after_its_usage_ends_done_cancelled(
    paced: RunningServer,
) -> None:
    """Through the edge, a stream cancelled at its server whose replica dies between its Usage
    and its Completion: the native stream ends with one `usage` and `done` cancelled, and the
    continuation that would generate on is cancelled (its server holds no request after)."""
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "request_id": "edge-cut"}
    async with cut_relay(paced.target, _after_usage) as relay:
        edge = await start_edge(f"{relay.target},{paced.target}")
        try:
            async with (
                httpx.AsyncClient(base_url=edge.url, timeout=60) as http,
                AsyncTokenwireClient(paced.target) as canceller,
                aconnect_sse(http, "POST", "/v1/generate", json=body) as source,
            ):
                events = []
                async for event in source.aiter_sse():
                    events.append(event)
                    if event.event == "token" and json.loads(event.data)["index"] == 2:
                        assert await canceller.cancel("edge-cut")
                    if event.event == "done":  # 400 tokens take 4 s: its continuation is gone
                        assert await eventually(lambda: paced.engine.active_count == 0, 1.0)
        finally:
            await edge.edge.stop()
    names = [e.event for e in events]
    assert names == ["token"] * names.count("token") + ["usage", "done"]
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"


def _after_completion(message: pb.GenerateResponse) -> bool:
    return message.HasField("completion")


async def test_edge_stream_cut_after_its_completion_ends_once(served: RunningServer) -> None:
    """Through the edge, a replica that dies after the stream's Completion, before its call
    ends: the stream is over, so nothing continues it elsewhere and the native stream has
    one `usage` and one `done`."""
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    async with cut_relay(served.target, _after_completion) as relay:
        events = await _through_edge(f"{relay.target},{served.target}", body)
    assert [e.event for e in events] == ["token"] * 5 + ["usage", "done"]


async def test_a_taken_id_is_refused_after_a_dead_target_too(paced: RunningServer) -> None:
    """A second stream with the id of the caller's running stream is refused for its id
    (INVALID_ARGUMENT naming request_id) when the client's first target was dead (connection
    refused: no request left), as it is when sent straight to the server; the running stream
    is not replaced and ends with all its tokens."""
    # 3 s of tokens: still running when the second stream has found its first target dead.
    options = GenerateOptions(
        max_tokens=300, temperature=0.0, ignore_eos=True, request_id="taken-after-dead"
    )
    # Bound but not listening: connections are refused, and no other listener takes the port.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{unused.getsockname()[1]}"
        async with AsyncTokenwireClient([dead, paced.target]) as second:
            refused, rest = await _second_of_a_running_id(paced, second, options)
    _assert_refused_and_whole(refused, rest)


async def test_a_taken_id_is_refused_after_a_target_that_went_away(
    paced: RunningServer, onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A target whose model the client knows and that has since gone away (connection
    refused on the Generate itself: gRPC's channel says it reached no server) leaves the next
    attempt a fresh request: a second stream with the id of the caller's running stream on
    the other target is refused for its id there, and the running stream goes on whole."""
    options = GenerateOptions(
        max_tokens=300, temperature=0.0, ignore_eos=True, request_id="taken-after-gone"
    )
    gone = await start_server(onnx_model, tokenizer)
    async with AsyncTokenwireClient([gone.target, paced.target]) as client:
        short = GenerateOptions(max_tokens=2, temperature=0.0, ignore_eos=True)
        assert [e async for e in client.generate(PROMPT, short)]  # its model is known now
        await gone.server.drain()
        refused, rest = await _second_of_a_running_id(paced, client, options)
    _assert_refused_and_whole(refused, rest)


async def _second_of_a_running_id(
    server: RunningServer, client: AsyncTokenwireClient, options: GenerateOptions
) -> tuple[TokenwireError, list[StreamEvent]]:
    """A stream of options.request_id running on `server` (its own client), and a second
    stream of that id sent through `client`: the second's error, and the first's events after
    its first token."""
    async with AsyncTokenwireClient([server.target]) as first:
        running = first.generate(PROMPT, options)
        await anext(running)
        with pytest.raises(TokenwireError) as refused:
            await anext(client.generate(PROMPT, options))
        return refused.value, [event async for event in running]


def _assert_refused_and_whole(refused: TokenwireError, rest: list[StreamEvent]) -> None:
    """The second stream was refused for its id; the running one went on to its end (300
    tokens, the first read before)."""
    assert (refused.code, refused.field) == (grpc.StatusCode.INVALID_ARGUMENT, "request_id")
    assert isinstance(rest[-1], Completion)
    assert sum(isinstance(e, Token) for e in rest) == 299


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """A target that takes TCP connections and never answers (a host gone silent)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


async def test_client_moves_on_from_a_target_that_never_answers(
    served: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first target that takes connections and never answers costs a stream its model
    check's time (MODEL_CHECK_S, shortened here), then the stream runs on the next target
    within the call's timeout, instead of waiting there until the deadline."""
    monkeypatch.setattr(failover, "MODEL_CHECK_S", 0.5)
    options = GenerateOptions(max_tokens=6, temperature=0.0, ignore_eos=True)
    with black_hole() as silent:
        async with AsyncTokenwireClient([silent, served.target], timeout_s=5) as client:
            events = [event async for event in client.generate(PROMPT, options)]
    _assert_one_sequence(events, 6)


async def test_edge_moves_on_from_a_target_that_never_answers(
    served: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the edge, a first target that takes connections and never answers: the stream
    runs on the next target after the model check's time, not a 504."""
    monkeypatch.setattr(failover, "MODEL_CHECK_S", 0.5)
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with black_hole() as silent:
        events = await _through_edge(f"{silent},{served.target}", body)
    assert [e.event for e in events] == ["token"] * 6 + ["usage", "done"]


async def test_edge_openai_routes_move_on_from_a_target_that_never_answers(
    served: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OpenAI request through an edge whose first target takes connections and never
    answers: the model it asks the targets for comes from the next one, after the check's
    time, and the request is answered (not a 504)."""
    monkeypatch.setattr(failover, "MODEL_CHECK_S", 0.5)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3}
    with black_hole() as silent:
        edge = await start_edge(f"{silent},{served.target}")
        try:
            async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
                answer = await http.post("/v1/completions", json=body)
        finally:
            await edge.edge.stop()
    assert answer.status_code == 200
    assert answer.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "blocking"])
async def test_client_unary_calls_move_on_from_a_target_that_never_answers(
    served: RunningServer, monkeypatch: pytest.MonkeyPatch, blocking: bool
) -> None:
    """Tokenize, Detokenize and GetModelInfo with a first target that takes connections and
    never answers: each moves on after MODEL_CHECK_S (shortened here), as a stream does, and
    is answered by the next target within the call's timeout."""
    monkeypatch.setattr(failover, "MODEL_CHECK_S", 0.5)
    with black_hole() as silent:
        targets = [silent, served.target]
        if blocking:
            with TokenwireClient(targets, timeout_s=5) as sync:
                ids = await asyncio.to_thread(lambda: sync.tokenize("x = 1").ids)
                text = await asyncio.to_thread(sync.detokenize, ids)
                info = await asyncio.to_thread(sync.model_info)
        else:
            async with AsyncTokenwireClient(targets, timeout_s=5) as client:
                ids = (await client.tokenize("x = 1")).ids
                text = await client.detokenize(ids)
                info = await client.model_info()
    assert text == "x = 1"
    assert info.model == MODEL


async def test_edge_tokenize_moves_on_from_a_target_that_stops_answering(
    served: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge's /tokenize with a first target that says which model it serves but never
    answers a Tokenize: answered by the next target after MODEL_CHECK_S (shortened here), not
    a 504 at the upstream timeout."""
    monkeypatch.setattr(failover, "MODEL_CHECK_S", 0.5)
    stuck = SlowReplica(served.target, 30.0, gives_up=False)
    await stuck.start()
    edge = await start_edge(f"{stuck.target},{served.target}", upstream_timeout_s=5.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
            answer = await http.post("/tokenize", json={"prompt": "x = 1"})
    finally:
        await edge.edge.stop()
        await stuck.stop()
    assert answer.status_code == 200, answer.text


async def test_a_target_answering_unavailable_is_asked_once_before_the_next(
    served: RunningServer,
) -> None:
    """With several targets, a unary call one answers UNAVAILABLE goes to the next at once:
    the channel does not retry it there first (up to 0.7 s of backoff per dead target)."""
    gone = GoneReplica(served.target)
    await gone.start()
    try:
        async with AsyncTokenwireClient([gone.target, served.target], timeout_s=5) as client:
            tokens = await client.tokenize("x = 1")
    finally:
        await gone.stop()
    assert tokens.ids
    assert gone.asked == 1


async def _through_edge(targets: str, body: dict[str, Any]) -> list[ServerSentEvent]:
    """A native stream's events through an edge of its own in front of `targets`."""
    edge = await start_edge(targets)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
            return await _sse(http, body)
    finally:
        await edge.edge.stop()


async def _sse(http: httpx.AsyncClient, body: dict[str, Any]) -> list[ServerSentEvent]:
    async with aconnect_sse(http, "POST", "/v1/generate", json=body) as source:
        return [event async for event in source.aiter_sse()]


async def test_client_refuses_to_continue_on_another_model(
    served: RunningServer, gpt2: RunningServer
) -> None:
    """A stream of the bundled model whose replica dies continues nowhere when the only other
    target serves gpt2: ModelMismatch naming both models, after the bundled model's tokens
    only."""
    options = GenerateOptions(max_tokens=16, temperature=0.0, ignore_eos=True)
    events: list[StreamEvent] = []

    async def stream(client: AsyncTokenwireClient) -> None:
        async for event in client.generate(PROMPT, options):
            events.append(event)

    async with (
        cut_relay(served.target, _after_token(3), dies=True) as relay,
        AsyncTokenwireClient([relay.target, gpt2.target]) as client,
    ):
        with pytest.raises(ModelMismatch) as raised:
            await stream(client)
    assert [e.index for e in events if isinstance(e, Token)] == [0, 1, 2, 3]
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert MODEL in raised.value.message
    assert "gpt2" in raised.value.message


async def test_edge_refuses_to_continue_on_another_model(
    served: RunningServer, gpt2: RunningServer
) -> None:
    """Through the edge, the same break ends the native stream with an UNAVAILABLE `error`
    event naming both models instead of gpt2's tokens."""
    events = await _edge_stream_cut_after_token_3(served, [gpt2.target])
    assert [e.event for e in events] == ["token"] * 4 + ["error"]
    error = json.loads(events[-1].data)
    assert error["code"] == "UNAVAILABLE"
    assert MODEL in error["message"]
    assert "gpt2" in error["message"]


async def test_failover_keeps_the_calls_deadline(paced: RunningServer) -> None:
    """timeout_s bounds the whole call: a 3 s call on a 5 s stream (a token per 10 ms) whose
    replica dies after 200 tokens (2 s) ends with DeadlineExceeded at 3 s, not 3 s after the
    failover (5 s)."""
    options = GenerateOptions(max_tokens=500, ignore_eos=True)
    async with (
        cut_relay(paced.target, _after_token(199)) as relay,
        AsyncTokenwireClient([relay.target, paced.target]) as client,
    ):
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            [_ async for _ in client.generate(PROMPT, options, timeout_s=3.0)]
        elapsed = time.monotonic() - started
    assert elapsed < 4.0  # halfway between the two


async def test_edge_failover_keeps_the_upstream_deadline(paced: RunningServer) -> None:
    """The edge's upstream_timeout_s bounds a stream with its failovers: with a 3 s timeout, the
    5 s stream whose replica dies after 200 tokens (2 s) ends at its deadline at 3 s, not 3 s
    after the failover (5 s). Whichever side notices the deadline first ends it, so the end is
    either form the native route documents: an error DEADLINE_EXCEEDED (gRPC ended the call),
    or a done with finish_reason deadline_exceeded (the server ended the generation)."""
    body = {"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True}
    async with cut_relay(paced.target, _after_token(199)) as relay:
        edge = await start_edge(f"{relay.target},{paced.target}", upstream_timeout_s=3.0)
        try:
            async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
                started = time.monotonic()
                events = await _sse(http, body)
                elapsed = time.monotonic() - started
        finally:
            await edge.edge.stop()
    assert _deadline_end(events[-1]), events[-1]
    assert elapsed < 4.0  # halfway between the two


def _deadline_end(event: ServerSentEvent) -> bool:
    data = json.loads(event.data)
    if event.event == "error":
        return bool(data["code"] == "DEADLINE_EXCEEDED")
    return event.event == "done" and data["finish_reason"] == "deadline_exceeded"


def test_a_single_draining_target_ends_the_call_within_its_timeout() -> None:
    """The blocking client, started as its only server begins to drain (refusing with
    UNAVAILABLE) and then goes away: the call ends with Unavailable within its 20 s timeout,
    instead of waiting on a header that grpc's sync stream never completes.

    (The server is gone about 5 s after the signal: its 2 s notice, then its stop. The timeout
    leaves a loaded machine room for that; a call that waited for ever outlives the join.)"""
    server = ServerProcess("--metrics-port", "0", env={"TOKENWIRE_DRAIN_NOTICE_S": "2"})
    server.wait_for("server.started")
    ended: list[BaseException] = []

    def call() -> None:
        with TokenwireClient(server.target, timeout_s=20) as client:
            try:
                list(client.generate(PROMPT, GenerateOptions(max_tokens=2)))
            except TokenwireError as error:
                ended.append(error)

    caller = threading.Thread(target=call, daemon=True)
    try:
        server.terminate()
        started = time.monotonic()
        caller.start()
        caller.join(30)
        took = time.monotonic() - started
    finally:
        server.close()
    assert not caller.is_alive(), "the call outlived its timeout"
    assert [type(e) for e in ended] == [Unavailable]
    assert took < 22.0  # its timeout, and a moment for the thread to end


def _never(message: pb.GenerateResponse) -> bool:
    return False


async def test_every_stream_names_its_model_in_its_initial_metadata(
    stub: pb_grpc.GenerationServiceStub, served: RunningServer
) -> None:
    """A Generate call's initial metadata carries x-tokenwire-model: the model's name, its
    vocabulary size and its EOS ids, as GetModelInfo reports them."""
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    call = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=1))
    header = dict(await call.initial_metadata())
    [_ async for _ in call]
    eos = ",".join(str(i) for i in info.eos_token_ids)
    assert header[MODEL_KEY] == f"{info.model};vocab={info.vocab_size};eos={eos}"


async def test_client_checks_the_model_of_the_replica_that_streams(
    served: RunningServer, gpt2: RunningServer
) -> None:
    """A continuation streamed by a gpt2 replica whose channel answered GetModelInfo with the
    bundled model ends with ModelMismatch before any gpt2 event: the stream's own metadata
    names the model that streams. (The cut comes after token 0, whose id gpt2's small
    vocabulary holds: an id beyond it would be refused as INVALID_ARGUMENT.)"""
    options = GenerateOptions(max_tokens=16, temperature=0.0, ignore_eos=True)
    events: list[StreamEvent] = []
    async with (
        cut_relay(served.target, _after_token(0), dies=True) as relay,
        cut_relay(gpt2.target, _never, info_target=served.target) as disguised,
        AsyncTokenwireClient([relay.target, disguised.target]) as client,
    ):
        with pytest.raises(ModelMismatch) as raised:
            await _collect(client.generate(PROMPT, options), events)
    assert [e.index for e in events if isinstance(e, Token)] == [0]
    assert "gpt2" in raised.value.message
    assert MODEL in raised.value.message


async def test_the_blocking_client_checks_the_model_of_the_replica_that_streams(
    served: RunningServer, gpt2: RunningServer
) -> None:
    """The blocking client, too, ends with ModelMismatch when the replica that continues the
    stream serves gpt2, whatever its channel's GetModelInfo said."""
    options = GenerateOptions(max_tokens=16, temperature=0.0, ignore_eos=True)
    events: list[StreamEvent] = []
    async with (
        cut_relay(served.target, _after_token(0), dies=True) as relay,
        cut_relay(gpt2.target, _never, info_target=served.target) as disguised,
    ):

        def stream() -> None:
            with TokenwireClient([relay.target, disguised.target]) as client:
                events.extend(client.generate(PROMPT, options))

        with pytest.raises(ModelMismatch):
            await asyncio.to_thread(stream)
    assert [e.index for e in events if isinstance(e, Token)] == [0]


async def test_edge_checks_the_model_of_the_replica_that_streams(
    served: RunningServer, gpt2: RunningServer
) -> None:
    """Through the edge, a continuation streamed by gpt2 behind a channel whose GetModelInfo
    names the bundled model ends the native stream with an UNAVAILABLE `error` naming both."""
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    async with (
        cut_relay(served.target, _after_token(0), dies=True) as relay,
        cut_relay(gpt2.target, _never, info_target=served.target) as disguised,
    ):
        edge = await start_edge(f"{relay.target},{disguised.target}")
        try:
            async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
                events = await _sse(http, body)
        finally:
            await edge.edge.stop()
    assert [e.event for e in events] == ["token", "error"]
    error = json.loads(events[-1].data)
    assert error["code"] == "UNAVAILABLE"
    assert "gpt2" in error["message"]
    assert MODEL in error["message"]


async def _collect(events: AsyncIterator[StreamEvent], into: list[StreamEvent]) -> None:
    async for event in events:
        into.append(event)


async def test_the_blocking_client_retries_a_stream_broken_before_its_first_token(
    paced: RunningServer,
) -> None:
    """The blocking client, too, retries a stream its server accepted and that broke before its
    first token as a retry of its id: the server, still running the broken one, replaces it
    and the caller's own request id is not refused as taken."""
    options = GenerateOptions(max_tokens=12, temperature=0.0, ignore_eos=True, request_id="mine")
    relay = LosesFirstStream(paced.target)
    await relay.start()
    try:

        def stream() -> list[StreamEvent]:
            with TokenwireClient([relay.target]) as client:
                return list(client.generate(PROMPT, options))

        events = await asyncio.to_thread(stream)
    finally:
        await relay.stop()
    _assert_one_sequence(events, 12)


class EndsEarly(CutRelay):
    """A replica whose streams end with OK, no Usage and no Completion, right after relaying
    the message `cut` picks: a stream cut short without an error."""

    ends_quietly = True


class StartsOver(CutRelay):
    """A replica that drops a continuation's ids (as a server unaware of them would) and so
    streams the request again from its first token."""

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        del request.continuation_ids[:]
        request.retry = False
        async for message in super().Generate(request, context):
            yield message


def _fifth_token(message: pb.GenerateResponse) -> bool:
    return message.WhichOneof("event") == "token" and message.token.index == 4


SHORT = GenerateOptions(max_tokens=20, temperature=0.0, ignore_eos=True)


async def test_a_stream_that_ends_without_its_completion_goes_on_at_the_next_target(
    served: RunningServer,
) -> None:
    """A call that ends with OK after 5 tokens, without Usage or Completion, is a break: the
    client goes on at the next target, and the caller gets each token once, one Usage and
    one Completion."""
    relay = EndsEarly(served.target, _fifth_token)
    await relay.start()
    try:
        async with AsyncTokenwireClient([relay.target, served.target]) as client:
            events = [event async for event in client.generate(PROMPT, SHORT)]
    finally:
        await relay.stop()
    _assert_one_sequence(events, 20)


async def test_a_stream_that_ends_without_its_completion_is_an_error_where_it_cannot_go_on(
    served: RunningServer,
) -> None:
    """With failover off, a call that ends with OK before its Completion raises Unavailable
    (the stream was cut short) instead of ending as if it were whole."""
    relay = EndsEarly(served.target, _fifth_token)
    await relay.start()
    try:
        async with AsyncTokenwireClient([relay.target]) as client:
            with pytest.raises(Unavailable, match="without its Completion"):
                async for _ in client.generate(PROMPT, SHORT, failover=False):
                    pass
    finally:
        await relay.stop()


async def test_a_continuation_that_starts_over_is_refused(
    served: RunningServer, onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A next target that drops the continuation's ids and streams from token 0 again ends the
    stream with an error (INTERNAL) instead of splicing a second stream into the first."""
    other = await start_server(onnx_model, tokenizer)
    async with cut_relay(served.target, _fifth_token) as first:
        second = StartsOver(other.target, lambda message: False)
        await second.start()
        try:
            async with AsyncTokenwireClient([first.target, second.target]) as client:
                indices: list[int] = []

                async def read() -> None:
                    async for event in client.generate(PROMPT, SHORT):
                        if isinstance(event, Token):
                            indices.append(event.index)

                with pytest.raises(TokenwireError, match="went on with token index 0"):
                    await read()
        finally:
            await second.stop()
            await other.server.drain()
    assert indices == [0, 1, 2, 3, 4]


class RefusesAll(CutRelay):
    """A replica that ends every stream UNAVAILABLE after its headers, before its first token,
    counting calls (the headers make the channel pass the break on instead of retrying it)."""

    calls = 0

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.calls += 1
        await context.send_initial_metadata([("x-relay", "refusing")])
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")
        yield pb.GenerateResponse()  # never reached: makes this a stream handler


async def test_closing_the_client_while_a_stream_waits_to_go_on_cancels_it(
    served: RunningServer,
) -> None:
    """A client closed while a stream waits before its next failover (the backoff after a
    third failed attempt, 0.2 s) ends that stream with Cancelled, as it ends running ones."""
    relay = RefusesAll(served.target, lambda message: False)
    await relay.start()
    try:
        client = AsyncTokenwireClient([relay.target, relay.target])
        stream = client.generate(PROMPT, SHORT)
        reading = asyncio.ensure_future(anext(stream))
        assert await eventually(lambda: relay.calls >= 3, within_s=5)
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(Cancelled):
            await reading
    finally:
        await relay.stop()


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "blocking"])
async def test_a_cancel_reaches_the_target_that_runs_the_stream(
    served: RunningServer, onnx_model: OnnxCausalLM, tokenizer: Tokenizer, blocking: bool
) -> None:
    """A client with two targets cancels a stream running on its second one (where a
    failover took it): Cancel asks every target, and answers True."""
    other = await start_server(onnx_model, tokenizer)
    channel = grpc.aio.insecure_channel(served.target)
    asked = pb.GenerateRequest(prompt=PROMPT, max_tokens=400, ignore_eos=True)
    asked.request_id = "on-the-second"
    call = pb_grpc.GenerationServiceStub(channel).Generate(asked)
    try:
        await call.read()  # the stream runs at the client's second target
        targets = [other.target, served.target]
        if blocking:

            def cancel() -> bool:
                with TokenwireClient(targets) as client:
                    return client.cancel("on-the-second")

            found = await asyncio.to_thread(cancel)
        else:
            async with AsyncTokenwireClient(targets) as client:
                found = await client.cancel("on-the-second")
    finally:
        call.cancel()
        await channel.close()
        await other.server.drain()
    assert found is True


async def test_a_continuation_asks_for_the_length_its_first_server_gave(
    served: RunningServer, onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A stream that leaves max_tokens to its server (default 128) and fails over after 10
    tokens to a replica whose default is 20 still runs to 128 tokens: the first server's budget
    (x-tokenwire-max-tokens) is what the continuation asks for."""
    other = await start_server(onnx_model, tokenizer, default_max_tokens=20)
    options = GenerateOptions(temperature=0.0, ignore_eos=True)
    try:
        async with (
            cut_relay(served.target, _tenth_token) as relay,
            AsyncTokenwireClient([relay.target, other.target]) as client,
        ):
            events = [event async for event in client.generate(PROMPT, options)]
    finally:
        await other.server.drain()
    _assert_one_sequence(events, served.engine.config.default_max_tokens)


def _tenth_token(message: pb.GenerateResponse) -> bool:
    return message.WhichOneof("event") == "token" and message.token.index == 9


async def test_client_passes_a_target_of_another_model_for_the_next(
    served: RunningServer, gpt2: RunningServer
) -> None:
    """A stream whose replica dies goes past a next target that serves gpt2 to the one after
    it, which serves the stream's model: every token once, one Usage, one Completion."""
    options = GenerateOptions(max_tokens=16, temperature=0.0, ignore_eos=True)
    async with (
        cut_relay(served.target, _after_token(3), dies=True) as relay,
        AsyncTokenwireClient([relay.target, gpt2.target, served.target]) as client,
    ):
        events = [event async for event in client.generate(PROMPT, options)]
    _assert_one_sequence(events, 16)


async def test_edge_passes_a_target_of_another_model_for_the_next(
    served: RunningServer, gpt2: RunningServer
) -> None:
    """Through the edge, the same stream goes past the gpt2 target and ends with `done`, its
    16 tokens each once."""
    events = await _edge_stream_cut_after_token_3(served, [gpt2.target, served.target])
    assert [e.event for e in events] == ["token"] * 16 + ["usage", "done"]
    assert [json.loads(e.data)["index"] for e in events[:16]] == list(range(16))


async def _edge_stream_cut_after_token_3(
    served: RunningServer, then: list[str]
) -> list[ServerSentEvent]:
    """A native stream of 16 tokens through an edge whose first target, a replica of `served`,
    dies after token 3; the edge's other targets are `then`."""
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    async with cut_relay(served.target, _after_token(3), dies=True) as relay:
        edge = await start_edge(",".join([relay.target, *then]))
        try:
            async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
                return await _sse(http, body)
        finally:
            await edge.edge.stop()


@pytest.fixture
async def loses_then_20(
    served: RunningServer, onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> AsyncIterator[tuple[str, str]]:
    """Two targets: a replica of `served` (default max_tokens 128) whose first stream breaks
    before its first token, and a server whose default max_tokens is 20."""
    other = await start_server(onnx_model, tokenizer, default_max_tokens=20)
    relay = LosesFirstStream(served.target)
    await relay.start()
    yield relay.target, other.target
    await relay.stop()
    await other.server.drain()


async def test_a_retry_before_any_token_takes_the_next_servers_own_default(
    loses_then_20: tuple[str, str],
) -> None:
    """A stream that left max_tokens to its server and broke before its first token starts
    over at the next target with nothing to continue: that server's own default (20) decides
    its length, not the first server's budget (128), which only a continuation asks for."""
    async with AsyncTokenwireClient(list(loses_then_20)) as client:
        options = GenerateOptions(temperature=0.0, ignore_eos=True)
        events = [event async for event in client.generate(PROMPT, options)]
    _assert_one_sequence(events, 20)


async def test_a_continuation_after_a_retry_asks_for_the_budget_of_the_server_that_streamed(
    loses_then_20: tuple[str, str],
) -> None:
    """A stream that left max_tokens to its servers, broke before its first token on one
    (default 128), started over on another (default 20) and broke there after token 3: its
    continuation asks for the 20 of the server whose tokens it delivered, not the 128 of the
    one that streamed nothing."""
    lossy, other = loses_then_20
    async with (
        cut_relay(other, _after_token(3), dies=True) as cut,
        AsyncTokenwireClient([lossy, cut.target, other]) as client,
    ):
        options = GenerateOptions(temperature=0.0, ignore_eos=True)
        events = [event async for event in client.generate(PROMPT, options)]
    _assert_one_sequence(events, 20)


class SlowModelCheck(CutRelay):
    """A replica whose GetModelInfo answers only after `delay_s`, counting the calls."""

    checks = 0

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelInfoResponse:
        self.checks += 1
        await asyncio.sleep(5.0)
        return await super().GetModelInfo(request, context)


async def test_closing_the_client_during_a_failovers_model_check_cancels_the_stream(
    served: RunningServer,
) -> None:
    """A client closed while a broken stream asks its next target's model (before any call
    there) ends that stream with Cancelled, as a close during a call does."""
    slow = SlowModelCheck(served.target, lambda message: False)
    await slow.start()
    try:
        async with cut_relay(served.target, _after_token(3)) as first:
            client = AsyncTokenwireClient([first.target, slow.target])
            stream = client.generate(PROMPT, SHORT)

            async def read() -> None:
                async for _ in stream:
                    pass

            reading = asyncio.ensure_future(read())
            assert await eventually(lambda: slow.checks >= 1, within_s=10)
            await client.close()
            with pytest.raises(Cancelled):
                await reading
    finally:
        await slow.stop()
