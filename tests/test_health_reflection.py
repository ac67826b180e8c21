"""Standard health (NOT_SERVING until warm) and server reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import RunningServer
from tokenwire.server.config import Settings
from tokenwire.server.engine import Engine, OnnxCausalLM
from tokenwire.server.rpc.server import SERVICE_NAME, TokenwireServer
from tokenwire.server.tokenizer import Tokenizer


async def _health(target: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service)
        )
        return reply.status


async def test_health_is_not_serving_until_the_engine_is_attached(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A started server reports NOT_SERVING; once the warm engine is attached, SERVING."""
    server = TokenwireServer(Settings(port=0, drain_grace_s=1.0))
    await server.start()
    target = f"127.0.0.1:{server.port}"
    try:
        before = await _health(target), await _health(target, SERVICE_NAME)
        await server.attach(Engine(onnx_model, tokenizer))
        after = await _health(target), await _health(target, SERVICE_NAME)
    finally:
        await server.drain()
    not_serving, serving = (
        health_pb2.HealthCheckResponse.NOT_SERVING,
        health_pb2.HealthCheckResponse.SERVING,
    )
    assert before == (not_serving, not_serving)
    assert after == (serving, serving)


async def test_reflection_lists_the_generation_service(served: RunningServer) -> None:
    """grpcurl-style `list` through reflection shows tokenwire.v1.GenerationService."""
    async with grpc.aio.insecure_channel(served.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for reply in call for s in reply.list_services_response.service]
    assert "tokenwire.v1.GenerationService" in names
    assert "grpc.health.v1.Health" in names
