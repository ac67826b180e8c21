"""The Generate stream on the bundled model: order, counts, determinism."""

from __future__ import annotations

import grpc
import pytest

from tests.conftest import collect, greedy, start_server, text_of
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc


async def test_stream_is_tokens_then_one_usage_then_one_completion(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """Every token message precedes exactly one usage, which precedes exactly one completion."""
    messages = await collect(stub, greedy("def fib(n):", max_tokens=12))
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds == ["token"] * 12 + ["usage", "completion"]


async def test_usage_counts_match_the_tokens_received(stub: pb_grpc.GenerationServiceStub) -> None:
    """completion_tokens equals the token messages; total is prompt + completion."""
    messages = await collect(stub, greedy("import os\n", max_tokens=9))
    usage = messages[-2].usage
    tokens = [m.token for m in messages if m.WhichOneof("event") == "token"]
    assert usage.completion_tokens == len(tokens) == 9
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert [t.index for t in tokens] == list(range(9))


async def test_max_tokens_reached_finishes_with_length(stub: pb_grpc.GenerationServiceStub) -> None:
    """Hitting max_tokens ends the stream with FINISH_REASON_LENGTH."""
    messages = await collect(stub, greedy("class A:", max_tokens=5))
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH


async def test_usage_reports_server_timings(stub: pb_grpc.GenerationServiceStub) -> None:
    """Usage carries queue time, TTFT, decode and total time, consistently ordered."""
    usage = (await collect(stub, greedy("for i in range(10):", max_tokens=8)))[-2].usage
    assert 0 <= usage.queue_time_ms <= usage.time_to_first_token_ms <= usage.total_time_ms
    assert usage.decode_time_ms <= usage.total_time_ms


async def test_request_id_is_echoed_in_usage(stub: pb_grpc.GenerationServiceStub) -> None:
    """A client-chosen request id comes back in Usage."""
    messages = await collect(stub, greedy("x = 1", max_tokens=3, request_id="abc-123"))
    assert messages[-2].usage.request_id == "abc-123"


async def test_server_generates_a_request_id_when_absent(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """Without a client id the server makes one and returns it in Usage and initial metadata."""
    call = stub.Generate(greedy("x = 1", max_tokens=3))
    header = dict(await call.initial_metadata())
    messages = [m async for m in call]
    assert header["x-request-id"] == messages[-2].usage.request_id != ""


async def test_greedy_output_is_repeatable(stub: pb_grpc.GenerationServiceStub) -> None:
    """Two greedy requests for the same prompt produce the same text."""
    first = text_of(await collect(stub, greedy("def add(a, b):", max_tokens=24)))
    second = text_of(await collect(stub, greedy("def add(a, b):", max_tokens=24)))
    assert first == second != ""


async def test_seeded_sampling_is_deterministic(stub: pb_grpc.GenerationServiceStub) -> None:
    """The same seed gives the same sampled tokens; another seed gives different ones."""

    def sampled(seed: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            prompt="def main():",
            max_tokens=32,
            ignore_eos=True,
            sampling=pb.SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=seed),
        )

    def ids(messages: list[pb.GenerateResponse]) -> list[int]:
        return [m.token.id for m in messages if m.WhichOneof("event") == "token"]

    a = ids(await collect(stub, sampled(7)))
    b = ids(await collect(stub, sampled(7)))
    c = ids(await collect(stub, sampled(8)))
    assert a == b
    assert a != c


async def test_logprobs_are_returned_when_asked(stub: pb_grpc.GenerationServiceStub) -> None:
    """With logprobs on, every token carries a log-probability <= 0; without, none does."""
    with_lp = await collect(stub, greedy("import sys", max_tokens=5, logprobs=True))
    without = await collect(stub, greedy("import sys", max_tokens=5))
    tokens = [m.token for m in with_lp if m.WhichOneof("event") == "token"]
    assert all(t.HasField("logprob") and t.logprob <= 0 for t in tokens)
    assert not any(m.token.HasField("logprob") for m in without if m.WhichOneof("event") == "token")


async def test_get_model_info_describes_the_bundled_model(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """GetModelInfo reports the model's context, vocabulary, EOS ids and the provider."""
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.context_length > 0
    assert info.vocab_size > 0
    assert list(info.eos_token_ids)
    assert info.provider == "CPUExecutionProvider"
    assert info.max_tokens_limit >= info.default_max_tokens > 0


async def test_model_info_context_is_the_kv_budget_where_that_is_smaller(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """With a KV-cache budget below the model's context, GetModelInfo's context_length is the
    budget: the longest prompt plus max_tokens a request may hold there."""
    running = await start_server(onnx_model, tokenizer, max_kv_tokens=200)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            refused = stub.Generate(greedy("x", max_tokens=info.context_length))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await refused.read()
    finally:
        await running.server.drain()
    assert onnx_model.spec.context_length > 200
    assert info.context_length == 200
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_under_a_small_kv_budget_the_default_max_tokens_shrinks_to_fit(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """With a KV budget (200) below the model's context, a prompt that fits and asks for no
    max_tokens is served, generating what the budget leaves (as on a model of that context),
    instead of being refused for a max_tokens it never sent."""
    prompt_ids = list(range(10, 160))  # 150 tokens: 50 left, below the default of 128
    running = await start_server(onnx_model, tokenizer, max_kv_tokens=200)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            request = pb.GenerateRequest(prompt_ids=prompt_ids, ignore_eos=True)
            messages = await collect(stub, request)
    finally:
        await running.server.drain()
    assert messages[-2].usage.completion_tokens == 50
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH


async def test_under_a_small_kv_budget_a_prompt_that_fills_it_is_refused_naming_the_prompt(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """With a KV budget (200) below the model's context, a 200-token prompt leaves no room:
    INVALID_ARGUMENT naming `prompt`, as on a model of that context, not `max_tokens`."""
    running = await start_server(onnx_model, tokenizer, max_kv_tokens=200)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            request = pb.GenerateRequest(prompt_ids=list(range(10, 210)), max_tokens=1)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect(stub, request)
    finally:
        await running.server.drain()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("prompt")
