"""Continuing an interrupted generation: the rest of the stream is the uninterrupted one's.

A client that received tokens 0..k-1 before its stream broke sends them back as
continuation_ids (with the same seed); the server streams from index k with the same ids, text
deltas, finish reason and Usage as if nothing had happened.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import RunningServer, collect, greedy, start_server
from tests.fakes import CountingModel, ScriptedModel
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.domain import (
    CompletionEvent,
    Event,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
    TokenEvent,
    UsageEvent,
)
from tokenwire.server.engine import Engine, EngineConfig, ModelSpec, OnnxCausalLM
from tokenwire.server.engine.engine import LONG_PROMPT_CHARS, GenerationHandle
from tokenwire.server.engine.padding import Padding
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

PROMPT = "def fib(n):"


@pytest.fixture
async def engine(onnx_model: OnnxCausalLM, tokenizer: Tokenizer) -> AsyncIterator[Engine]:
    running = Engine(onnx_model, tokenizer)
    running.start()
    yield running
    running.shutdown()


async def _events(engine: Engine, request: GenerationRequest) -> list[Event]:
    return [event async for event in engine.submit(request).events()]


def _request(
    name: str,
    max_tokens: int,
    *,
    prompt: str = PROMPT,
    continuation: tuple[int, ...] = (),
    sampling: SamplingParams | None = None,
    stop: tuple[str, ...] = (),
    ignore_eos: bool = False,
    min_tokens: int = 0,
) -> GenerationRequest:
    return GenerationRequest(
        name,
        prompt,
        max_tokens=max_tokens,
        sampling=sampling or SamplingParams(temperature=0.0),
        stop=stop,
        ignore_eos=ignore_eos,
        continuation=continuation,
        min_tokens=min_tokens,
    )


def _tokens(events: list[Event]) -> list[TokenEvent]:
    return [e for e in events if isinstance(e, TokenEvent)]


def _tail(events: list[Event]) -> tuple[int, FinishReason, str]:
    usage = next(e for e in events if isinstance(e, UsageEvent))
    completion = events[-1]
    assert isinstance(completion, CompletionEvent)
    return usage.completion_tokens, completion.finish_reason, completion.stop_sequence


async def _assert_continues(engine: Engine, k: int, max_tokens: int, **fields: Any) -> None:
    """Run uninterrupted, then continue from the first k ids: the rest must be identical."""
    whole = await _events(engine, _request("whole", max_tokens, **fields))
    delivered = tuple(t.token_id for t in _tokens(whole)[:k])
    rest = await _events(engine, _request("rest", max_tokens, continuation=delivered, **fields))
    assert _tokens(rest) == _tokens(whole)[k:]
    assert _tail(rest) == _tail(whole)


async def test_continuing_from_nothing_is_the_whole_stream(engine: Engine) -> None:
    """An empty continuation (index 0) gives exactly the uninterrupted stream."""
    await _assert_continues(
        engine, 0, 16, sampling=SamplingParams(temperature=0.0), ignore_eos=True
    )


async def test_greedy_continuation_is_the_uninterrupted_tail(engine: Engine) -> None:
    """Continuing greedy decoding after 10 of 24 tokens gives tokens 10..23 and the same Usage."""
    await _assert_continues(
        engine, 10, 24, sampling=SamplingParams(temperature=0.0), ignore_eos=True
    )


async def test_seeded_sampled_continuation_draws_the_same_tokens(engine: Engine) -> None:
    """With the same seed, sampled tokens after the boundary are the ones first drawn."""
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=5)
    await _assert_continues(engine, 7, 24, sampling=sampled, ignore_eos=True)


async def test_an_unseeded_stream_can_be_continued_with_the_seed_it_was_given(
    engine: Engine,
) -> None:
    """The server picks a seed for an unseeded request; continuing with it draws the same."""
    handle = engine.submit(
        _request("first", 20, sampling=SamplingParams(temperature=1.0), ignore_eos=True)
    )
    whole = [e async for e in handle.events()]
    again = SamplingParams(temperature=1.0, seed=handle.seed)
    delivered = tuple(t.token_id for t in _tokens(whole)[:5])
    rest = await _events(
        engine, _request("rest", 20, continuation=delivered, sampling=again, ignore_eos=True)
    )
    assert _tokens(rest) == _tokens(whole)[5:]


INT4 = BUNDLED_MODEL_DIR.parent / "fixtures-genai" / "llama-int4"


@pytest.mark.parametrize(
    ("prompt_ids", "k", "sampling", "max_tokens"),
    [
        ((96, 54, 246, 206, 44, 14, 143, 234, 62, 134), 15, SamplingParams(temperature=0.0), 40),
        (
            (
                *(164, 162, 210, 41, 287, 159, 242, 37, 187, 41, 74, 57, 204, 239, 65, 230),
                *(9, 196, 246, 124, 153),
            ),
            12,
            SamplingParams(temperature=1.0, seed=2422859385),
            32,
        ),
    ],
    ids=["greedy", "seeded"],
)
async def test_an_int4_graphs_continuation_is_the_uninterrupted_tail(
    prompt_ids: tuple[int, ...], k: int, sampling: SamplingParams, max_tokens: int
) -> None:
    """On the int4 GenAI graph, whose MatMulNBits quantise each row's activations, continuing
    after k tokens gives the uninterrupted stream's tail: the continuation's ids go in one per
    forward, as the stream's decode steps fed them (prefilled together, their positions
    rounded into other tokens: a greedy resume here went on with another token at once)."""
    model = OnnxCausalLM(INT4, provider="cpu", intra_op_threads=2)
    engine = Engine(model, Tokenizer.from_dir(INT4), EngineConfig(prefill_chunk_tokens=256))
    engine.start()
    try:

        async def ids(continuation: tuple[int, ...]) -> list[int]:
            request = GenerationRequest(
                f"r{len(continuation)}",
                "",
                prompt_ids=prompt_ids,
                max_tokens=max_tokens,
                sampling=sampling,
                ignore_eos=True,
                continuation=continuation,
            )
            return [t.token_id for t in _tokens(await _events(engine, request))]

        whole = await ids(())
        rest = await ids(tuple(whole[:k]))
    finally:
        engine.shutdown()
    assert model.steps_continuations
    assert rest == whole[k:]


INT8 = BUNDLED_MODEL_DIR.parent / "fixtures-int8" / "llama-dynamic"


@pytest.mark.parametrize("model_dir", [INT4, INT8], ids=["int4", "int8-dynamic"])
async def test_a_continuation_fed_one_id_per_forward_holds_no_other_prompt_back(
    model_dir: Path,
) -> None:
    """Where a continuation's ids go in one per forward (int4's MatMulNBits, a dynamically
    quantised int8 graph), they go in with the decode steps: a request that arrives right
    after a continuation of 100 ids has all its tokens before the continuation's first new
    one (fed as prefills, the 100 ids held every prompt behind them for 100 forwards), and
    the continuation is still the uninterrupted stream's tail."""
    model = OnnxCausalLM(model_dir, provider="cpu", intra_op_threads=2)
    engine = Engine(model, Tokenizer.from_dir(model_dir), EngineConfig(prefill_chunk_tokens=256))
    engine.start()
    prompt = (96, 54, 246, 206, 44, 14, 143, 234, 62, 134)

    def request(
        name: str, max_tokens: int, continuation: tuple[int, ...] = ()
    ) -> GenerationRequest:
        return GenerationRequest(
            name,
            "",
            prompt_ids=prompt,
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature=0.0),
            ignore_eos=True,
            continuation=continuation,
        )

    order: list[str] = []

    async def run(handle: GenerationHandle, name: str) -> list[int]:
        ids = []
        async for event in handle.events():
            if isinstance(event, TokenEvent):
                ids.append(event.token_id)
                order.append(f"{name} token")
        order.append(f"{name} end")
        return ids

    try:
        whole = [t.token_id for t in _tokens(await _events(engine, request("whole", 110)))]
        resumed = engine.submit(request("resumed", 110, tuple(whole[:100])))
        fresh = engine.submit(request("fresh", 2))
        rest, _ = await asyncio.gather(run(resumed, "resumed"), run(fresh, "fresh"))
    finally:
        engine.shutdown()
    assert model.steps_continuations or model.padding is Padding.ALONE
    assert rest == whole[100:]
    assert order.index("fresh end") < order.index("resumed token")


async def test_continuations_resumed_together_feed_their_ids_in_the_same_decode_steps() -> None:
    """Two streams resumed at once on the int4 graph (a replica taking over streams) each
    cost one prefill forward, their prompt's: both feed their 60 ids in the decode steps, in
    shared forwards (two rows each; one row each where this CPU makes every row decode alone),
    not in the prefill queue, and both are exact."""
    model = CountingModel(INT4, provider="cpu", intra_op_threads=2)
    engine = Engine(model, Tokenizer.from_dir(INT4), EngineConfig(prefill_chunk_tokens=256))
    engine.start()
    prompts = [(96, 54, 246, 206, 44, 14, 143, 234, 62, 134), (164, 162, 210, 41, 287, 159)]

    def request(prompt: tuple[int, ...], continuation: tuple[int, ...] = ()) -> GenerationRequest:
        return GenerationRequest(
            f"{prompt[0]}-{len(continuation)}",
            "",
            prompt_ids=prompt,
            max_tokens=70,
            sampling=SamplingParams(temperature=0.0),
            ignore_eos=True,
            continuation=continuation,
        )

    async def ids(prompt: tuple[int, ...], continuation: tuple[int, ...] = ()) -> list[int]:
        events = await _events(engine, request(prompt, continuation))
        return [t.token_id for t in _tokens(events)]

    try:
        wholes = [await ids(p) for p in prompts]
        model.forget()
        rests = await asyncio.gather(
            *(ids(p, tuple(w[:60])) for p, w in zip(prompts, wholes, strict=True))
        )
    finally:
        engine.shutdown()
    assert rests == [w[60:] for w in wholes]
    assert len(model.prefills) == 2
    if model.decodes_rows_alone:
        assert sum(rows == 1 for rows, _ in model.decodes) >= 2 * 59
    else:
        assert sum(rows == 2 for rows, _ in model.decodes) >= 59


async def test_continuing_at_max_tokens_minus_one_yields_one_token(engine: Engine) -> None:
    """With max_tokens - 1 tokens delivered, one token follows, then LENGTH; Usage counts all."""
    await _assert_continues(
        engine, 11, 12, sampling=SamplingParams(temperature=0.0), ignore_eos=True
    )


async def test_a_continuation_longer_than_max_tokens_is_refused(engine: Engine) -> None:
    """More delivered ids than max_tokens allows is INVALID_ARGUMENT naming continuation_ids."""
    with pytest.raises(InvalidRequest, match="continuation_ids"):
        engine.submit(_request("long", 4, continuation=(1, 2, 3, 4, 5)))


def _scripted(spec: ModelSpec, tokenizer: Tokenizer, prompt: str, script: list[int]) -> Engine:
    model = ScriptedModel.continuing(spec, len(tokenizer.encode(prompt)), script)
    engine = Engine(model, tokenizer)
    engine.start()
    return engine


async def test_continuing_inside_a_multibyte_character(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """Delivered up to the first byte of "é": the next token's delta is the whole "é"."""
    ids = [tokenizer.token_id(c) for c in ("A", "\u00c3", "\u00a9", "B")]
    engine = _scripted(spec, tokenizer, "x", [i for i in ids if i is not None])
    try:
        await _assert_continues(engine, 2, 4, prompt="x", ignore_eos=True)
        rest = await _events(engine, _request("r", 4, prompt="x", continuation=tuple(ids[:2])))
    finally:
        engine.shutdown()
    assert [t.text for t in _tokens(rest)] == ["\u00e9", "B"]


async def test_continuing_inside_a_partial_stop_string(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """Delivered up to "X" of the stop string "XY": the held-back "X" never leaks, and "Y"
    ends the stream as STOP_SEQUENCE, as without the interruption."""
    ids = [tokenizer.token_id(c) for c in ("A", "X", "Y", "B")]
    engine = _scripted(spec, tokenizer, "x", [i for i in ids if i is not None])
    try:
        await _assert_continues(engine, 2, 4, prompt="x", stop=("XY",))
        rest = await _events(
            engine,
            _request("r", 4, prompt="x", continuation=tuple(ids[:2]), stop=("XY",)),
        )
    finally:
        engine.shutdown()
    assert [t.text for t in _tokens(rest)] == [""]
    assert _tail(rest) == (3, FinishReason.STOP_SEQUENCE, "XY")


async def test_continuing_after_eos_ends_at_once(spec: ModelSpec, tokenizer: Tokenizer) -> None:
    """A delivered stream that already ended with EOS ends again with no new token."""
    eos = min(spec.eos_token_ids)
    a = tokenizer.token_id("A")
    assert a is not None
    engine = _scripted(spec, tokenizer, "x", [a, eos])
    try:
        await _assert_continues(engine, 2, 8, prompt="x")
        rest = await _events(engine, _request("r", 8, prompt="x", continuation=(a, eos)))
    finally:
        engine.shutdown()
    assert _tokens(rest) == []
    assert _tail(rest) == (2, FinishReason.STOP, "")


async def test_an_id_after_the_one_that_ended_the_stream_is_refused(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """Delivered ids that go on past an EOS (no uninterrupted stream has them) are
    INVALID_ARGUMENT naming the first id after it, not a stream that ends at the EOS with
    fewer tokens counted than were sent."""
    eos = min(spec.eos_token_ids)
    a = tokenizer.token_id("A")
    assert a is not None
    engine = _scripted(spec, tokenizer, "x", [a, eos, a])
    try:
        with pytest.raises(InvalidRequest, match=r"continuation_ids\[2\]"):
            engine.submit(_request("r", 8, prompt="x", continuation=(a, eos, a)))
    finally:
        engine.shutdown()


async def test_an_eos_before_min_tokens_in_a_continuation_is_refused(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """A delivered EOS before min_tokens, which the stream could not have chosen, is
    INVALID_ARGUMENT naming its index, not a stream that ends there as STOP."""
    eos = min(spec.eos_token_ids)
    a = tokenizer.token_id("A")
    assert a is not None
    engine = _scripted(spec, tokenizer, "x", [a, eos])
    try:
        with pytest.raises(InvalidRequest, match=r"continuation_ids\[1\].*min_tokens"):
            engine.submit(_request("r", 8, prompt="x", continuation=(a, eos), min_tokens=5))
    finally:
        engine.shutdown()


async def test_the_seed_is_sent_before_the_first_token(stub: pb_grpc.GenerationServiceStub) -> None:
    """Every stream's initial metadata carries x-tokenwire-seed, so any stream can be resumed."""
    call = stub.Generate(greedy("def f():", 4))
    metadata = dict(await call.initial_metadata())
    [_ async for _ in call]
    assert int(str(metadata["x-tokenwire-seed"])) >= 0
    assert await call.code() == grpc.StatusCode.OK


async def test_a_continuation_replaces_the_callers_running_stream_of_its_id(
    paced: RunningServer,
) -> None:
    """A continuation that arrives while the server still runs the stream it continues (its
    connection broke, the server has yet to notice) is served, not refused for its id: the
    running stream ends as cancelled and the continuation streams the rest (a fresh request
    with a running stream's id is still refused: test_auth)."""
    async with grpc.aio.insecure_channel(paced.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        first = stub.Generate(greedy("x", 40, request_id="kept"))
        delivered = []
        while len(delivered) < 3:
            message = await first.read()
            assert isinstance(message, pb.GenerateResponse)
            delivered.append(message.token.id)
        rest = await collect(stub, greedy("x", 40, request_id="kept", continuation_ids=delivered))
        left = []
        while isinstance(message := await first.read(), pb.GenerateResponse):
            left.append(message)
    assert [m.token.index for m in rest if m.HasField("token")] == list(range(3, 40))
    assert rest[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert left[-1].completion.finish_reason == pb.FINISH_REASON_CANCELLED
    assert paced.engine.active_count == 0


async def test_a_long_continuation_replaces_its_stream_on_a_full_server(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """On a server with room for one request, a continuation whose prompt is long enough to be
    tokenized on the worker thread takes the place of the stream it replaces (as a short one
    does), instead of being refused as overloaded while that stream decodes on."""
    token = tokenizer.encode(" x")[0]
    model = ScriptedModel(spec, dict.fromkeys(range(spec.context_length), token), 0.01)
    running = await start_server(model, tokenizer, max_batch_size=1, max_queue=0)
    prompt = "#" * (LONG_PROMPT_CHARS + 100) + "\ndef f(n):"
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            first = stub.Generate(greedy(prompt, 40, request_id="kept"))
            delivered = []
            while len(delivered) < 3:
                message = await first.read()
                assert isinstance(message, pb.GenerateResponse)
                delivered.append(message.token.id)
            rest = await collect(
                stub, greedy(prompt, 40, request_id="kept", continuation_ids=delivered)
            )
    finally:
        await running.server.drain()
    assert rest[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH
