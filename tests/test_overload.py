"""Admission control: a full server answers RESOURCE_EXHAUSTED at once, with a retry hint."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import collect, eventually, start_server
from tests.fakes import ScriptedModel
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.domain import GenerationRequest, Overloaded
from tokenwire.server.engine import Engine, EngineConfig, ModelSpec, OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc


async def test_full_queue_rejects_with_resource_exhausted_and_retry_info(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """With 1 running + 1 queued allowed, a third request is rejected with RetryInfo."""
    slow = ScriptedModel(spec, {}, step_delay_s=0.02)
    running = await start_server(slow, tokenizer, max_batch_size=1, max_queue=1)
    request = pb.GenerateRequest(prompt="a", max_tokens=100, ignore_eos=True)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            first = asyncio.ensure_future(collect(stub, request))
            second = asyncio.ensure_future(collect(stub, request))
            assert await eventually(lambda: running.engine.active_count == 2)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stub, request)
            first.cancel()
            second.cancel()
    finally:
        await running.server.drain()
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(error.trailing_metadata())["retry-after-ms"] == "1000"
    info = error_details_pb2.RetryInfo()
    rpc_status.from_call(error).details[0].Unpack(info)  # type: ignore[arg-type]
    assert info.retry_delay.seconds == 1


async def test_the_queue_counts_from_the_rows_a_preallocated_cache_holds(
    tokenizer: Tokenizer,
) -> None:
    """Where the preallocated cache holds fewer rows than max_batch_size (two whole contexts
    in max_kv_tokens), max_queue counts from those rows: with no queue, a third request is
    Overloaded at once, naming both numbers, instead of waiting behind the two."""
    model_dir = BUNDLED_MODEL_DIR.parent / "fixtures-genai" / "llama-fp32"
    model = OnnxCausalLM(model_dir, provider="cpu")
    context = model.spec.context_length
    config = EngineConfig(max_batch_size=8, max_queue=0, max_kv_tokens=2 * context)
    engine = Engine(model, Tokenizer.from_dir(model_dir), config)
    engine.start()
    try:
        assert engine.max_rows == 2
        for name in ("a", "b"):
            engine.submit(GenerationRequest(name, "x", max_tokens=64, ignore_eos=True))
        with pytest.raises(Overloaded, match=r"limit 2: 2 rows decoded together \+ max_queue 0"):
            engine.submit(GenerationRequest("c", "x", max_tokens=64, ignore_eos=True))
    finally:
        engine.shutdown()
