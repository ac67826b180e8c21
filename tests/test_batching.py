"""Continuous batching: neighbours change no output, limits hold, cancel storms leave no trace."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from tests.conftest import start_server
from tests.fakes import CountingModel, RecordingObserver, ScriptedModel
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.domain import GenerationRequest, SamplingParams, TokenEvent
from tokenwire.server.engine import Engine, EngineConfig, ModelSpec, OnnxCausalLM
from tokenwire.server.engine.logits import Logits
from tokenwire.server.engine.types import CacheTensor, IntArray
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

LINES = [
    "def fib(n):",
    "import os",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "x",
    "for i in range(10):\n    print(i)\n",
    "# Copyright notice\n# All rights reserved.\n\nimport sys\nimport re\n",
    "return",
    "async def fetch(url, *, timeout=10):",
]
PROMPTS = [LINES[i % len(LINES)] * (1 + i // len(LINES)) for i in range(16)]


async def _generate(
    engine: Engine, request_id: str, prompt: str, sampling: SamplingParams, delay: float = 0.0
) -> list[int]:
    await asyncio.sleep(delay)
    request = GenerationRequest(
        request_id, prompt, max_tokens=24, sampling=sampling, ignore_eos=True
    )
    handle = engine.submit(request)
    return [e.token_id async for e in handle.events() if isinstance(e, TokenEvent)]


def _engine(model: OnnxCausalLM, tokenizer: Tokenizer, **config: int) -> Engine:
    engine = Engine(model, tokenizer, EngineConfig(**config))  # type: ignore[arg-type]
    engine.start()
    return engine


async def test_greedy_output_is_the_same_alone_and_in_a_batch_of_16(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """16 greedy requests of different lengths, arriving at different times, match solo runs."""
    greedy = SamplingParams(temperature=0.0)
    engine = _engine(onnx_model, tokenizer, max_batch_size=16, prefill_chunk_tokens=32)
    try:
        alone = [await _generate(engine, f"a{i}", p, greedy) for i, p in enumerate(PROMPTS)]
        together = await asyncio.gather(
            *(_generate(engine, f"b{i}", p, greedy, delay=0.004 * i) for i, p in enumerate(PROMPTS))
        )
    finally:
        engine.shutdown()
    assert together == alone


async def test_seeded_sampling_ignores_batch_neighbours(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A seeded request samples the same tokens alone and beside 7 other sampled requests."""
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=1234)
    engine = _engine(onnx_model, tokenizer, max_batch_size=8)
    try:
        alone = await _generate(engine, "solo", "def main():", seeded)
        crowd = [
            _generate(engine, f"n{i}", p, SamplingParams(temperature=1.0, seed=i), 0.002 * i)
            for i, p in enumerate(PROMPTS[:7])
        ]
        results = await asyncio.gather(_generate(engine, "again", "def main():", seeded), *crowd)
    finally:
        engine.shutdown()
    assert results[0] == alone


async def test_kv_budget_limits_how_many_requests_run_together(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """With a KV budget for two requests, a third waits in the queue until one finishes."""
    model = ScriptedModel(spec, {}, step_delay_s=0.01)
    reservation = len(tokenizer.encode("abc")) + 24
    steps = RecordingObserver()
    config = EngineConfig(max_batch_size=8, max_kv_tokens=2 * reservation)
    engine = Engine(model, tokenizer, config, steps)  # type: ignore[arg-type]
    engine.start()
    try:
        greedy = SamplingParams(temperature=0.0)
        finished = await asyncio.gather(
            *(_generate(engine, f"k{i}", "abc", greedy) for i in range(3))
        )
    finally:
        engine.shutdown()
    # Every step reports how many requests ran and waited: none ran three at once, and the
    # third waited while two ran.
    assert [len(tokens) for tokens in finished] == [24, 24, 24]
    assert max(step.running for step in steps.steps) == 2
    assert any((step.running, step.waiting) == (2, 1) for step in steps.steps)


async def test_cancellation_storm_leaves_nothing_running(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """200 streams cancelled at random points beside finishing ones: no hang, nothing left."""
    running = await start_server(onnx_model, tokenizer, max_queue=256)
    rng = random.Random(7)
    finished: list[int] = []

    async def stream(stub: pb_grpc.GenerationServiceStub, i: int) -> None:
        request = pb.GenerateRequest(prompt=PROMPTS[i % 16], max_tokens=48, ignore_eos=True)
        cancel_after = rng.randint(0, 40) if i % 5 else None  # every 5th runs to completion
        call = stub.Generate(request, timeout=120)
        seen = 0
        async for message in call:
            seen += message.WhichOneof("event") == "token"
            if cancel_after is not None and seen >= cancel_after:
                call.cancel()
                return
            if message.WhichOneof("event") == "completion":
                finished.append(i)

    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            await asyncio.wait_for(asyncio.gather(*(stream(stub, i) for i in range(200))), 120)
        for _ in range(500):
            if running.engine.active_count == 0:
                break
            await asyncio.sleep(0.01)
        counts = (
            running.engine.active_count,
            running.engine.running_count,
            running.engine.waiting_count,
        )
    finally:
        await running.server.drain()
    assert counts == (0, 0, 0)
    assert len(finished) == 40


class _HeldDecode(CountingModel):
    """The bundled model, counting forwards; a decode step waits while `held` is clear."""

    def __init__(self, model_dir: Path) -> None:
        self.held = threading.Event()
        self.held.set()
        self.waiting = threading.Event()
        """Set once a decode step waits."""
        super().__init__(model_dir, provider="cpu", intra_op_threads=1)

    def forward(
        self, input_ids: IntArray, attention_mask: IntArray, *args: Any, **kwargs: Any
    ) -> tuple[Logits, Sequence[CacheTensor]]:
        if kwargs.get("decode") and not self.held.is_set():
            self.waiting.set()
            self.held.wait(10)
        return super().forward(input_ids, attention_mask, *args, **kwargs)


async def test_a_prefill_forward_computes_no_more_positions_than_the_chunk(
    tokenizer: Tokenizer,
) -> None:
    """A 60-token prompt and fifteen 1-token prompts arriving in the same step, with a prefill
    chunk of 64: no prefill forward computes more than 64 positions, padding included (each
    row is as wide as the forward's longest prompt), so a running stream waits for at most one
    chunk's worth of prefill per step (one group of 16 would compute 16 x 60)."""
    model = _HeldDecode(BUNDLED_MODEL_DIR)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=17, prefill_chunk_tokens=64))
    engine.start()
    one = tokenizer.encode(" x")[:1]
    long = (one * 60)[:60]

    async def ids(name: str, prompt: list[int], new: int) -> list[int]:
        request = GenerationRequest(
            name,
            "",
            prompt_ids=tuple(prompt),
            max_tokens=new,
            ignore_eos=True,
            sampling=SamplingParams(temperature=0.0),
        )
        handle = engine.submit(request)
        return [e.token_id async for e in handle.events() if isinstance(e, TokenEvent)]

    try:
        model.held.clear()
        running = asyncio.ensure_future(ids("running", one, 8))
        while not model.waiting.is_set():  # the running stream's first decode step waits
            await asyncio.sleep(0.01)
        model.forget()
        burst = [asyncio.ensure_future(ids("long", long, 2))]
        burst += [asyncio.ensure_future(ids(f"short{i}", one, 2)) for i in range(15)]
        await asyncio.sleep(0.1)  # all submitted while the step is held
        model.held.set()
        await asyncio.gather(running, *burst)
    finally:
        model.held.set()
        engine.shutdown()
    assert model.prefills
    assert max(rows * width for rows, width in model.prefills) <= 64
