"""A failing model step ends the affected streams with an explicit error, not silence."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import collect, start_server
from tests.fakes import ScriptedModel
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc


async def test_step_failure_is_internal_and_the_server_keeps_serving(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """The stream in flight gets INTERNAL; the next request completes normally."""
    model = ScriptedModel(spec, {}, step_delay_s=0.001)
    model.fail_on_calls = {5}
    running = await start_server(model, tokenizer)
    request = pb.GenerateRequest(prompt="x", max_tokens=20, ignore_eos=True)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stub, request)
            after = await collect(stub, request)
    finally:
        await running.server.drain()
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "injected failure" in (caught.value.details() or "")
    assert after[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert running.engine.active_count == 0


async def test_failing_prefill_fails_only_its_request(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """A prompt whose prefill fails gets INTERNAL; a running stream and a co-arriving request
    (prefilled in the same group, then retried alone) complete normally."""
    model = ScriptedModel(spec, {}, step_delay_s=0.002)
    poison = tokenizer.encode("@")[0]
    model.fail_on_prompt_token = poison
    running = await start_server(model, tokenizer)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            long_call = stub.Generate(
                pb.GenerateRequest(prompt="x", max_tokens=60, ignore_eos=True), timeout=30
            )
            await anext(aiter(long_call))  # decoding before the bad prompt arrives
            outcomes = await asyncio.gather(
                collect(stub, pb.GenerateRequest(prompt="@ b", max_tokens=5, ignore_eos=True)),
                collect(stub, pb.GenerateRequest(prompt="a b", max_tokens=5, ignore_eos=True)),
                return_exceptions=True,
            )
            rest = [m async for m in long_call]
    finally:
        await running.server.drain()
    bad, good = outcomes
    assert isinstance(bad, grpc.aio.AioRpcError)
    assert bad.code() == grpc.StatusCode.INTERNAL
    assert "prefill failed" in (bad.details() or "")
    assert isinstance(good, list)
    assert good[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert rest[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert running.engine.active_count == 0
