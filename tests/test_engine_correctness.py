"""Engine numerics on the bundled model: the KV cache and batching change no greedy token."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from tests.conftest import eventually
from tokenwire.server.domain import (
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    SamplingParams,
    TokenEvent,
)
from tokenwire.server.engine import Engine, EngineConfig, OnnxCausalLM
from tokenwire.server.engine.engine import LONG_PROMPT_CHARS
from tokenwire.server.tokenizer import Tokenizer

PROMPTS = ["def fib(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, x):", "# x"]


def greedy_without_cache(model: OnnxCausalLM, ids: list[int], steps: int) -> list[int]:
    """Reference decode: recompute the whole sequence every step, no cache at all."""
    seq = list(ids)
    for _ in range(steps):
        n = len(seq)
        logits, _ = model.forward(
            np.asarray([seq], dtype=np.int64),
            np.ones((1, n), dtype=np.int64),
            np.arange(n, dtype=np.int64)[None, :],
            model.new_cache(1).tensors,
        )
        seq.append(int(logits.host()[0].argmax()))
    return seq[len(ids) :]


async def _engine_greedy(engine: Engine, prompts: list[str], steps: int) -> list[list[int]]:
    async def one(i: int, prompt: str) -> list[int]:
        await asyncio.sleep(0.003 * i)  # staggered arrivals join a running batch
        request = GenerationRequest(
            request_id=f"g{i}",
            prompt=prompt,
            max_tokens=steps,
            sampling=SamplingParams(temperature=0.0),
            ignore_eos=True,
        )
        handle = engine.submit(request)
        return [e.token_id async for e in handle.events() if isinstance(e, TokenEvent)]

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def test_cached_greedy_decode_equals_full_recomputation(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """32 greedy tokens through the engine (KV cache) equal recomputing without a cache."""
    engine = Engine(onnx_model, tokenizer, EngineConfig())
    engine.start()
    try:
        [got] = await _engine_greedy(engine, ["def fib(n):"], 32)
    finally:
        engine.shutdown()
    assert got == greedy_without_cache(onnx_model, tokenizer.encode("def fib(n):"), 32)


async def test_batched_greedy_equals_each_request_alone(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """Prompts of different lengths decoded together match the uncached reference each."""
    engine = Engine(onnx_model, tokenizer, EngineConfig(max_batch_size=8, prefill_chunk_tokens=8))
    engine.start()
    try:
        together = await _engine_greedy(engine, PROMPTS, 20)
    finally:
        engine.shutdown()
    for prompt, got in zip(PROMPTS, together, strict=True):
        assert got == greedy_without_cache(onnx_model, tokenizer.encode(prompt), 20), prompt


async def test_shutdown_ends_active_requests_as_cancelled(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """Engine.shutdown completes every active stream with a CANCELLED completion."""
    engine = Engine(onnx_model, tokenizer)
    engine.start()
    handle = engine.submit(GenerationRequest("s1", "def f():", max_tokens=400, ignore_eos=True))
    events = handle.events()
    await anext(events)
    engine.shutdown()
    rest = [e async for e in events]
    assert getattr(rest[-1], "finish_reason", None) == FinishReason.CANCELLED
    assert engine.active_count == 0


async def test_a_long_prompt_tokenized_on_a_worker_thread_is_fed_as_the_tokenizer_encodes_it(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A prompt long enough for submit_async to tokenize it off the event loop is fed exactly
    as Tokenizer.encode gives it: its greedy tokens equal recomputing from those ids."""
    prompt = "#" * 5000 + "\ndef fib(n):"
    assert len(prompt) > LONG_PROMPT_CHARS
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    engine = Engine(onnx_model, tokenizer, EngineConfig())
    engine.start()
    try:
        request = GenerationRequest(
            "long", prompt, max_tokens=8, sampling=SamplingParams(temperature=0.0), ignore_eos=True
        )
        handle = await engine.submit_async(request)
        got = [e.token_id async for e in handle.events() if isinstance(e, TokenEvent)]
    finally:
        engine.shutdown()
    assert handle.prompt_tokens == len(ids)
    assert got == greedy_without_cache(onnx_model, ids, 8)


async def test_a_long_prompts_timings_count_from_its_arrival_not_from_its_tokenizing(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """The timings of a prompt tokenized on the worker thread (queue time, TTFT, Usage) count
    from submit_async's call: the handle's arrival comes before the tokenizing, not after."""
    prompt = "#" * 5000 + "\ndef fib(n):"
    engine = Engine(onnx_model, tokenizer, EngineConfig())
    engine.start()
    try:
        request = GenerationRequest("long", prompt, max_tokens=1, ignore_eos=True)
        called = time.monotonic()
        handle = await engine.submit_async(request)
        returned = time.monotonic()
        assert [e async for e in handle.events()]
    finally:
        engine.shutdown()
    assert handle.arrived_at - called < (returned - called) / 2


async def test_a_long_prompt_waiting_for_the_tokenizer_holds_a_place_in_the_capacity(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """With room for one request, a second long prompt that arrives while the first is being
    tokenized is refused (Overloaded) at once, before the first is even admitted: long prompts
    no longer queue for the tokenizer without bound, each refused only after its turn."""
    prompt = "#" * 5000 + "\ndef fib(n):"
    engine = Engine(onnx_model, tokenizer, EngineConfig(max_batch_size=1, max_queue=0))
    engine.start()
    try:
        first = asyncio.create_task(
            engine.submit_async(GenerationRequest("a", prompt, max_tokens=1, ignore_eos=True))
        )
        second = asyncio.create_task(
            engine.submit_async(GenerationRequest("b", prompt, max_tokens=1, ignore_eos=True))
        )
        done, _ = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {second}
        with pytest.raises(Overloaded):
            second.result()
        handle = await first
        assert [e async for e in handle.events()]
    finally:
        engine.shutdown()


async def test_a_long_prompt_gives_its_tokenizer_place_back(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """With room for one request, long prompts sent one after the other are each admitted:
    the place a prompt held while it was tokenized is given back, whether the request was
    then admitted or refused (a prompt beyond the context)."""
    fits = "#" * 5000 + "\ndef fib(n):"
    too_long = "x " * 60_000
    engine = Engine(onnx_model, tokenizer, EngineConfig(max_batch_size=1, max_queue=0))
    engine.start()
    try:
        with pytest.raises(InvalidRequest):
            await engine.submit_async(GenerationRequest("big", too_long, max_tokens=1))
        for i in range(3):
            request = GenerationRequest(f"r{i}", fits, max_tokens=1, ignore_eos=True)
            handle = await engine.submit_async(request)
            assert [e async for e in handle.events()]
    finally:
        engine.shutdown()


class _CountingEngine(Engine):
    """The engine, counting the long prompts its tokenizer thread encodes, which waits for
    `gate` before each."""

    encoded = 0
    gate: threading.Event

    def _encode_released(self, request: GenerationRequest) -> list[int]:
        self.gate.wait(10)
        self.encoded += 1
        return super()._encode_released(request)


async def test_requests_with_the_same_long_prompt_share_one_tokenizing(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """Four requests that bring the same long prompt at once (an OpenAI request's n choices)
    are tokenized once between them, each fed the ids Tokenizer.encode gives; a different
    prompt, or the same one after that tokenizing ended, is tokenized anew."""
    prompt = "#" * 5000 + "\ndef fib(n):"
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    engine = _CountingEngine(onnx_model, tokenizer, EngineConfig())
    engine.gate = threading.Event()
    engine.start()
    try:
        submitted = [
            asyncio.ensure_future(
                engine.submit_async(GenerationRequest(f"n{i}", prompt, max_tokens=1))
            )
            for i in range(4)
        ]
        # All four wait for the tokenizer before it runs, however slow this machine is.
        assert await eventually(lambda: len(engine._tokenizing_requests) == 4)
        engine.gate.set()
        handles = await asyncio.gather(*submitted)
        assert engine.encoded == 1
        assert [h.prompt_tokens for h in handles] == [len(ids)] * 4
        for handle in handles:
            assert [e async for e in handle.events()]
        again = await engine.submit_async(GenerationRequest("again", prompt, max_tokens=1))
        other = await engine.submit_async(GenerationRequest("other", prompt + "#", max_tokens=1))
        assert engine.encoded == 3
        for handle in (again, other):
            assert [e async for e in handle.events()]
    finally:
        engine.shutdown()
