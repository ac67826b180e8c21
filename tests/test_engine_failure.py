"""A failing model step ends the affected streams with an explicit error, not silence."""

from __future__ import annotations

import grpc
import pytest
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

from service.engine import ModelSpec
from service.tokenizer import Tokenizer
from tests.conftest import collect, start_server
from tests.fakes import ScriptedModel


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
