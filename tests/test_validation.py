"""Bad input gets INVALID_ARGUMENT naming the field and its allowed range, and harms no one."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import collect, greedy, start_server
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

S = pb.SamplingParams

CASES = [
    ("empty prompt", pb.GenerateRequest(prompt=""), "prompt", "non-empty"),
    (
        "prompt longer than the context",
        pb.GenerateRequest(prompt="x = 1\n" * 2000),
        "prompt",
        "context length",
    ),
    (
        "max_tokens above the limit",
        pb.GenerateRequest(prompt="a", max_tokens=100_000),
        "max_tokens",
        "between 1 and",
    ),
    (
        "negative temperature",
        pb.GenerateRequest(prompt="a", sampling=S(temperature=-0.5)),
        "sampling.temperature",
        "between 0 and 2",
    ),
    (
        "top_p above 1",
        pb.GenerateRequest(prompt="a", sampling=S(top_p=1.5)),
        "sampling.top_p",
        "(0, 1]",
    ),
    (
        "top_p of 0",
        pb.GenerateRequest(prompt="a", sampling=S(top_p=0.0)),
        "sampling.top_p",
        "(0, 1]",
    ),
    (
        "repetition penalty of 0",
        pb.GenerateRequest(prompt="a", sampling=S(repetition_penalty=0.0)),
        "sampling.repetition_penalty",
        "(0, 2]",
    ),
    ("too many stop strings", pb.GenerateRequest(prompt="a", stop=["s"] * 20), "stop", "at most 8"),
    (
        "too long a stop string",
        pb.GenerateRequest(prompt="a", stop=["s" * 500]),
        "stop[0]",
        "at most 64",
    ),
    ("an empty stop string", pb.GenerateRequest(prompt="a", stop=[""]), "stop[0]", "non-empty"),
    (
        "an oversize prompt message",
        pb.GenerateRequest(prompt="y" * 300_000),
        "prompt",
        "at most 262144 bytes",
    ),
    (
        "an overlong request id",
        pb.GenerateRequest(prompt="a", request_id="r" * 300),
        "request_id",
        "at most 128",
    ),
]


@pytest.mark.parametrize(
    ("request_message", "field", "allowed"),
    [pytest.param(r, f, a, id=name) for name, r, f, a in CASES],
)
async def test_invalid_input_is_invalid_argument_naming_the_field(
    stub: pb_grpc.GenerationServiceStub,
    request_message: pb.GenerateRequest,
    field: str,
    allowed: str,
) -> None:
    """The status is INVALID_ARGUMENT; the message and BadRequest detail name the field."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub, request_message)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}:")
    assert allowed in error.details()
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == field


async def test_bad_requests_do_not_disturb_a_running_stream(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """A stream running while a burst of invalid requests arrives completes normally."""
    good = asyncio.ensure_future(collect(stub, greedy("def f(x):", max_tokens=40)))
    bad = [collect(stub, request) for _, request, _, _ in CASES]
    results = await asyncio.gather(*bad, return_exceptions=True)
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
    messages = await good
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert messages[-2].usage.completion_tokens == 40


async def test_tokenizing_long_prompts_leaves_the_event_loop_free(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """While prompts far over the context are tokenized and refused (INVALID_ARGUMENT naming
    prompt), the event loop that serves every stream never stalls for half as long as
    tokenizing one of them takes."""
    # 2 MB of UTF-8: tokenizing one takes most of a second, so half of it is far above the
    # loop's ordinary hiccups on a loaded machine (tens of ms), and a loop that tokenizes
    # stalls for all of it.
    prompt = "".join(chr(0x100 + i % 0x600) for i in range(1_000_000))
    tokenizing_s = []
    for _ in range(2):
        started = time.monotonic()
        tokenizer.encode(prompt)
        tokenizing_s.append(time.monotonic() - started)
    running = await start_server(onnx_model, tokenizer, max_prompt_bytes=2**22)
    loop = asyncio.get_running_loop()
    stalls: list[float] = []

    async def watch() -> None:
        while True:
            started = loop.time()
            await asyncio.sleep(0.005)
            stalls.append(loop.time() - started - 0.005)

    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            watcher = asyncio.ensure_future(watch())
            results = await asyncio.gather(
                *(collect(stub, pb.GenerateRequest(prompt=prompt)) for _ in range(3)),
                return_exceptions=True,
            )
            watcher.cancel()
    finally:
        await running.server.drain()
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError)
        assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (result.details() or "").startswith("prompt: must be shorter than the context")
    assert max(stalls) < min(tokenizing_s) / 2
