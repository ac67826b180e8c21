"""No request can hurt another: numerics-prone parameters and failures stay with their request."""

from __future__ import annotations

import asyncio

import grpc

from tests.conftest import collect, greedy, start_server
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

NAN_PRONE = [
    pb.SamplingParams(temperature=1.0, repetition_penalty=1e-38),
    pb.SamplingParams(temperature=1e-45),
    pb.SamplingParams(temperature=2.0, top_p=1e-30, repetition_penalty=2.0),
    pb.SamplingParams(temperature=1e-30, top_k=1, repetition_penalty=1e-30),
]


async def test_nan_prone_parameters_finish_beside_running_streams(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """Extreme but accepted sampling values complete normally, and so do their neighbours;
    afterwards nothing is active and a full batch of requests is admitted and completes."""
    capacity = 4
    running = await start_server(onnx_model, tokenizer, max_batch_size=capacity, max_queue=4)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            neighbours = [asyncio.create_task(collect(stub, greedy("def f():", 40))) for _ in "ab"]
            extreme = await asyncio.gather(
                *(
                    collect(stub, pb.GenerateRequest(prompt="x = 1", max_tokens=24, sampling=s))
                    for s in NAN_PRONE
                )
            )
            calm = await asyncio.gather(*neighbours)
            after = await asyncio.gather(
                *(collect(stub, greedy("import os", 8)) for _ in range(capacity))
            )
    finally:
        await running.server.drain()
    for stream in (*extreme, *calm, *after):
        assert stream[-1].WhichOneof("event") == "completion"
    assert running.engine.active_count == 0
