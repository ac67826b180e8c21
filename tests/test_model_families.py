"""Every fixture family is served exactly: PyTorch's greedy ids, alone and in a moving batch.

models/fixtures/<family>/ holds a tiny random-initialised Optimum export and reference.json
(prompts as transformers tokenizes them, PyTorch greedy ids for each prompt run alone), built
by models/build_fixtures.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

from service.engine import OnnxCausalLM
from service.tokenizer import Tokenizer
from tests.conftest import RunningServer, collect, greedy, start_server
from tests.invariance import Job, together

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.json").exists())


def _reference(family: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / family / "reference.json").read_text())
    return data


@pytest.fixture(scope="module", params=FAMILIES)
async def family(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, RunningServer]]:
    """One family's fixture behind a real gRPC server."""
    name = str(request.param)
    model_dir = FIXTURES / name
    model = OnnxCausalLM(model_dir, provider="cpu", intra_op_threads=1)
    running = await start_server(
        model, Tokenizer.from_dir(model_dir), max_batch_size=16, prefill_chunk_tokens=32
    )
    yield name, running
    await running.server.drain()


def test_every_position_scheme_has_a_fixture() -> None:
    """The fixtures cover explicit, counted and learned positions, ALiBi, MQA and BOS."""
    required = {"llama", "gemma", "gpt2", "opt", "bloom", "falcon", "gpt_bigcode", "qwen2"}
    assert required <= set(FAMILIES)


async def test_served_greedy_ids_equal_pytorch(family: tuple[str, RunningServer]) -> None:
    """Each prompt alone through the gRPC server gives PyTorch's greedy ids and prompt count."""
    name, running = family
    reference = _reference(name)
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for prompt in reference["prompts"]:
            messages = await collect(stub, greedy(prompt["text"], reference["max_new_tokens"]))
            ids = [m.token.id for m in messages if m.WhichOneof("event") == "token"]
            usage = next(m.usage for m in messages if m.WhichOneof("event") == "usage")
            assert ids == prompt["output_ids"], prompt["text"]
            assert usage.prompt_tokens == len(prompt["prompt_ids"]), prompt["text"]


async def test_batched_greedy_ids_equal_pytorch(family: tuple[str, RunningServer]) -> None:
    """All prompts together (staggered joins, the long one mid-decode, different lengths so
    rows leave at different steps) give each prompt's solo PyTorch ids."""
    name, running = family
    reference = _reference(name)
    prompts = sorted(reference["prompts"], key=lambda p: bool(p.get("long")))
    n = reference["max_new_tokens"]
    jobs = [Job(p["text"], n - (i * 5) % (n // 2)) for i, p in enumerate(prompts)]
    got = await together(running.engine, jobs)
    for job, prompt, ids in zip(jobs, prompts, got, strict=True):
        assert ids == prompt["output_ids"][: job.max_tokens], prompt["text"]


def test_tokenization_matches_transformers(family: tuple[str, RunningServer]) -> None:
    """The engine encodes each prompt to the ids transformers gives (BOS and all)."""
    name, running = family
    for prompt in _reference(name)["prompts"]:
        got = running.engine.tokenizer.encode(prompt["text"], add_special_tokens=True)
        assert got == prompt["prompt_ids"], prompt["text"]


async def test_context_length_is_enforced_as_invalid_argument() -> None:
    """GPT-2's n_positions bounds prompt + max_tokens: beyond it is INVALID_ARGUMENT."""
    model_dir = FIXTURES / "gpt2"
    context = int(json.loads((model_dir / "config.json").read_text())["n_positions"])
    model = OnnxCausalLM(model_dir, provider="cpu", intra_op_threads=1)
    # The server's own max_tokens limit sits above the context, so the context is what binds.
    running = await start_server(model, Tokenizer.from_dir(model_dir), max_tokens_limit=4 * context)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stub, greedy("a b c d", context))
    finally:
        await running.server.drain()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"context length is {context}" in (caught.value.details() or "")
