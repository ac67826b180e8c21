"""The places retries take in the capacity: a retry takes the place of the request of its id it
replaces, at once and while its long prompt is tokenized; Cancel reaches a request whose long
prompt is still being tokenized. A real server on 127.0.0.1 with a scripted model (one token
every 20 ms) and room for few requests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from tests.conftest import RunningServer, collect, eventually, greedy, start_server
from tests.fakes import ScriptedModel
from tokenwire.server.domain import GenerationRequest
from tokenwire.server.engine import Engine, ModelSpec
from tokenwire.server.engine.engine import LONG_PROMPT_CHARS
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

LONG = "#" * (LONG_PROMPT_CHARS + 100) + "\ndef f(n):"
Call = grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse]


async def _server(spec: ModelSpec, tokenizer: Tokenizer, rows: int, queue: int) -> RunningServer:
    token = tokenizer.encode(" x")[0]
    model = ScriptedModel(spec, dict.fromkeys(range(spec.context_length), token), 0.02)
    return await start_server(model, tokenizer, max_batch_size=rows, max_queue=queue)


@pytest.fixture
async def one_place(spec: ModelSpec, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    """Room for one request: one row, no queue."""
    running = await _server(spec, tokenizer, 1, 0)
    yield running
    await running.server.drain()


@pytest.fixture
async def two_places(spec: ModelSpec, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    """Room for two requests: one row and a queue of one."""
    running = await _server(spec, tokenizer, 1, 1)
    yield running
    await running.server.drain()


@pytest.fixture
def tokenizer_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Long prompts wait on the tokenizer thread until the event is set (set at the end)."""
    gate = threading.Event()
    encode = Engine._encode_released

    def gated(engine: Engine, request: object) -> list[int]:
        gate.wait(10)
        return encode(engine, request)  # type: ignore[arg-type]

    monkeypatch.setattr(Engine, "_encode_released", gated)
    yield gate
    gate.set()


async def _reason(call: Call) -> str:
    """How a stream ended: its finish reason's name, or the status that ended it."""
    last = None
    try:
        while isinstance(message := await call.read(), pb.GenerateResponse):
            last = message
    except grpc.aio.AioRpcError as error:
        return error.code().name
    assert last is not None
    return pb.FinishReason.Name(last.completion.finish_reason)


async def _running(stub: pb_grpc.GenerationServiceStub, request_id: str) -> Call:
    """A long request of this id, running: its first token has come."""
    call: Call = stub.Generate(greedy("x", 200, request_id=request_id))
    await call.read()
    return call


async def test_two_retries_at_once_each_take_the_place_of_the_one_before(
    one_place: RunningServer,
) -> None:
    """On a server with room for one request, two retries of its running request arriving at
    once are both taken: each replaces the one before (ending it as cancelled), and the
    newer retry runs to its end; neither is refused as overloaded."""
    async with grpc.aio.insecure_channel(one_place.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        first = await _running(stub, "kept")
        retries = [stub.Generate(greedy("x", 10, request_id="kept", retry=True)) for _ in "ab"]
        ends = await asyncio.gather(_reason(first), *map(_reason, retries))
    assert sorted(ends) == [
        "FINISH_REASON_CANCELLED",
        "FINISH_REASON_CANCELLED",
        "FINISH_REASON_LENGTH",
    ]
    assert ends[0] == "FINISH_REASON_CANCELLED"


async def test_a_retry_leaves_room_for_another_request(two_places: RunningServer) -> None:
    """On a server with room for two, a retry of its running request takes that one's place,
    so a request of another id that comes right after is taken too."""
    async with grpc.aio.insecure_channel(two_places.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        first = await _running(stub, "kept")
        retry = stub.Generate(greedy("x", 10, request_id="kept", retry=True))
        await retry.initial_metadata()
        other = await collect(stub, greedy("y", 3, request_id="other"))
        ends = await asyncio.gather(_reason(first), _reason(retry))
    assert other[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert ends == ["FINISH_REASON_CANCELLED", "FINISH_REASON_LENGTH"]


async def test_a_long_retry_being_tokenized_leaves_room_for_another_request(
    two_places: RunningServer, tokenizer_gate: threading.Event
) -> None:
    """On a server with room for two, a retry of its running request whose long prompt waits
    for the tokenizer holds that request's place, not one more: a request of another id that
    comes meanwhile is taken."""
    async with grpc.aio.insecure_channel(two_places.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        first = await _running(stub, "kept")
        retry = stub.Generate(greedy(LONG, 5, request_id="kept", retry=True))
        assert await eventually(lambda: bool(two_places.engine._tokenizing_requests))
        other = stub.Generate(greedy("y", 3, request_id="other"))
        accepted = "x-request-id" in dict(await other.initial_metadata())
        tokenizer_gate.set()
        ends = await asyncio.gather(_reason(first), _reason(retry), _reason(other))
    assert accepted
    assert ends == ["FINISH_REASON_CANCELLED", "FINISH_REASON_LENGTH", "FINISH_REASON_LENGTH"]


OVER_CONTEXT = " ".join(map(str, range(1500)))
"""A long prompt (over LONG_PROMPT_CHARS) of more tokens than the bundled model's context."""


@pytest.mark.parametrize("prompt", [LONG, OVER_CONTEXT], ids=["fits", "over-the-context"])
async def test_cancel_reaches_a_request_whose_long_prompt_is_being_tokenized(
    two_places: RunningServer, tokenizer_gate: threading.Event, prompt: str
) -> None:
    """Cancel of a request whose long prompt waits for the tokenizer says it cancelled it, and
    the stream ends as cancelled (with its usage) as soon as the prompt is tokenized, without
    generating, as Cancel said, even where the prompt turns out too long for the context; the
    server's capacity is whole again."""
    async with grpc.aio.insecure_channel(two_places.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        waiting = asyncio.ensure_future(collect(stub, greedy(prompt, 50, request_id="long")))
        assert await eventually(lambda: bool(two_places.engine._tokenizing_requests))
        reply = await stub.Cancel(pb.CancelRequest(request_id="long"))
        tokenizer_gate.set()
        messages = await waiting
    assert reply.cancelled
    assert [m.WhichOneof("event") for m in messages] == ["usage", "completion"]
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_CANCELLED
    assert await eventually(lambda: two_places.engine.active_count == 0)


async def test_a_drain_refuses_the_long_prompts_waiting_for_the_tokenizer_itself(
    two_places: RunningServer, tokenizer_gate: threading.Event
) -> None:
    """A drain refuses a long prompt still queued for the tokenizer at once, and one being
    tokenized once it is, each with the server's own UNAVAILABLE (its reason, which clients
    retry elsewhere), and waits for them: none is left to be cut by the transport's stop."""
    async with grpc.aio.insecure_channel(two_places.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        calls = {
            asyncio.ensure_future(collect(stub, greedy(LONG, 5, request_id="a"))),
            asyncio.ensure_future(collect(stub, greedy(LONG + "\n", 5, request_id="b"))),
        }
        assert await eventually(lambda: len(two_places.engine._tokenizing_requests) == 2)
        drain = asyncio.create_task(two_places.server.drain())
        # One is on the (held) tokenizer thread, the other queued behind it: that one ends.
        done, [tokenizing] = await asyncio.wait(calls, timeout=5, return_when="FIRST_COMPLETED")
        refused_at_once = await _refusal(done.pop())
        tokenizer_gate.set()
        refused_once_tokenized = await _refusal(tokenizing)
        await asyncio.wait_for(drain, 10)
    for error in (refused_at_once, refused_once_tokenized):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "Cancelling all calls" not in (error.details() or "")
    assert "shutting down" in (refused_at_once.details() or "")
    assert "not accepting" in (refused_once_tokenized.details() or "")


async def _refusal(call: asyncio.Future[list[pb.GenerateResponse]]) -> grpc.aio.AioRpcError:
    """The error a Generate call ended with (within 5 s)."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(call, 5)
    return refused.value


async def test_of_two_long_retries_waiting_for_the_tokenizer_the_newer_wins(
    two_places: RunningServer, tokenizer_gate: threading.Event
) -> None:
    """Two retries of a running request whose long prompts both wait for the tokenizer: the
    newer one (its caller is the live one) runs to its end, and the older one, like the
    request they both retry, ends as cancelled, as it does for short retries."""
    async with grpc.aio.insecure_channel(two_places.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        first = await _running(stub, "kept")
        older = stub.Generate(greedy(LONG, 5, request_id="kept", retry=True))
        assert await eventually(lambda: len(two_places.engine._tokenizing_requests) == 1)
        newer = stub.Generate(greedy(LONG, 5, request_id="kept", retry=True))
        assert await eventually(lambda: len(two_places.engine._tokenizing_requests) == 2)
        tokenizer_gate.set()
        ends = await asyncio.gather(_reason(first), _reason(older), _reason(newer))
    assert ends == ["FINISH_REASON_CANCELLED", "FINISH_REASON_CANCELLED", "FINISH_REASON_LENGTH"]


@pytest.mark.parametrize("second", ["short", "long"])
async def test_an_id_taken_by_a_long_prompt_being_tokenized_refuses_a_newcomer_at_once(
    two_places: RunningServer, tokenizer_gate: threading.Event, second: str
) -> None:
    """A request (not a retry) of the id of a long prompt still waiting for the tokenizer is
    refused at once, INVALID_ARGUMENT naming request_id, as for a running request's id; the
    long prompt, which took the id first, runs to its end."""
    async with grpc.aio.insecure_channel(two_places.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        first = stub.Generate(greedy(LONG, 5, request_id="taken"))
        assert await eventually(lambda: bool(two_places.engine._tokenizing_requests))
        prompt = LONG if second == "long" else "x"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(stub, greedy(prompt, 5, request_id="taken"))
        tokenizer_gate.set()
        end = await _reason(first)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in (refused.value.details() or "")
    assert end == "FINISH_REASON_LENGTH"


@pytest.fixture
async def roomy(spec: ModelSpec, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    """Room for nine requests: one row and a queue of eight."""
    running = await _server(spec, tokenizer, 1, 8)
    yield running
    await running.server.drain()


async def test_long_prompts_whose_callers_left_are_not_tokenized(
    roomy: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six different long prompts whose callers' deadlines pass while the first is on the
    tokenizer thread (held there): the five still queued behind it leave the queue with their
    callers and are never tokenized, so abandoned prompts queue no work beyond the places
    their callers held."""
    gate, started = threading.Event(), []
    encode = Engine._encode_released

    def gated(engine: Engine, request: GenerationRequest) -> list[int]:
        started.append(request.request_id)
        gate.wait(10)
        return encode(engine, request)

    monkeypatch.setattr(Engine, "_encode_released", gated)
    async with grpc.aio.insecure_channel(roomy.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        try:
            calls = [
                stub.Generate(greedy(f"{i}{LONG}", 5, request_id=f"long{i}"), timeout=0.5)
                for i in range(6)
            ]
            ends = await asyncio.gather(*map(_reason, calls))
        finally:
            gate.set()
    await asyncio.sleep(0.5)  # time for any job still queued to run
    assert ends == ["DEADLINE_EXCEEDED"] * 6
    assert len(started) == 1


async def test_a_cancelled_queued_request_gives_its_place_back_at_once(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """On a server with room for two (one row, a queue of one) and half-second steps, a
    queued request cancelled gives its place back when Cancel answers, not at the next step:
    a request of another id sent right after is taken, not refused as overloaded."""
    token = tokenizer.encode(" x")[0]
    model = ScriptedModel(spec, dict.fromkeys(range(spec.context_length), token), 0.5)
    slow = await start_server(model, tokenizer, max_batch_size=1, max_queue=1)
    try:
        async with grpc.aio.insecure_channel(slow.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            running = stub.Generate(greedy("x", 3, request_id="running"))
            await running.read()
            queued = stub.Generate(greedy("y", 3, request_id="queued"))
            await queued.initial_metadata()
            reply = await stub.Cancel(pb.CancelRequest(request_id="queued"))
            other = stub.Generate(greedy("z", 2, request_id="other"))
            ends = await asyncio.gather(_reason(running), _reason(queued), _reason(other))
    finally:
        await slow.server.drain()
    assert reply.cancelled
    assert ends == ["FINISH_REASON_LENGTH", "FINISH_REASON_CANCELLED", "FINISH_REASON_LENGTH"]
