"""Request fields beyond the basics, over gRPC: pre-tokenised input, top logprobs, stop token
ids, min_tokens, logit bias, and the penalties' ranges."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from tests.conftest import RunningServer, collect, greedy, start_server
from tests.fakes import ScriptedModel
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

PROMPT = "def fib(n):"


def _ids(messages: list[pb.GenerateResponse]) -> list[int]:
    return [m.token.id for m in messages if m.WhichOneof("event") == "token"]


async def test_prompt_ids_give_what_the_prompt_text_gives(
    stub: pb_grpc.GenerationServiceStub, tokenizer: Tokenizer
) -> None:
    """The prompt's token ids, sent pre-tokenised, produce the same tokens as the text."""
    by_text = await collect(stub, greedy(PROMPT, 12))
    by_ids = greedy("", 12)
    by_ids.prompt_ids.extend(tokenizer.encode(PROMPT))
    assert _ids(await collect(stub, by_ids)) == _ids(by_text)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": "x", "prompt_ids": [1]}, "prompt"),
        ({"prompt_ids": [10**9]}, "prompt_ids[0]"),
        ({"prompt": "x", "stop_token_ids": [10**9]}, "stop_token_ids[0]"),
        ({"prompt": "x", "top_logprobs": 3}, "top_logprobs"),
        ({"prompt": "x", "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"prompt": "x", "min_tokens": 3}, "min_tokens"),
        ({"prompt": "x", "sampling": pb.SamplingParams(presence_penalty=3.0)}, "presence_penalty"),
        (
            {"prompt": "x", "sampling": pb.SamplingParams(frequency_penalty=-2.5)},
            "frequency_penalty",
        ),
        ({"prompt": "x", "sampling": pb.SamplingParams(min_p=1.5)}, "min_p"),
        ({"prompt": "x", "sampling": pb.SamplingParams(logit_bias={5: 101.0})}, "logit_bias"),
    ],
)
async def test_out_of_range_fields_are_invalid_argument_naming_them(
    stub: pb_grpc.GenerationServiceStub, fields: dict[str, object], field: str
) -> None:
    """Each bad value is INVALID_ARGUMENT and the message names the field."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub, pb.GenerateRequest(max_tokens=2, **fields))  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


async def test_prompt_ids_that_fill_the_context_are_refused_naming_prompt_ids(
    stub: pb_grpc.GenerationServiceStub, spec: ModelSpec
) -> None:
    """Pre-tokenised input as long as the context leaves no room to generate: the refusal
    names prompt_ids, the field the caller sent, not prompt."""
    request = pb.GenerateRequest(max_tokens=1, prompt_ids=[5] * spec.context_length)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("prompt_ids: must be shorter than the context")


async def test_an_out_of_vocabulary_logit_bias_key_is_named_by_the_key(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """A logit_bias entry whose token id is outside the vocabulary is INVALID_ARGUMENT naming
    the entry by its key, as an out-of-range bias is, not by its place among the keys."""
    request = pb.GenerateRequest(prompt="x", max_tokens=2)
    request.sampling.logit_bias.update({1: 1.0, 10**6: 1.0})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("sampling.logit_bias[1000000]: ")


async def test_more_than_1024_stop_token_ids_are_invalid_argument(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """A request listing more than 1024 stop_token_ids is INVALID_ARGUMENT naming the field;
    1024 of them are accepted."""
    accepted = await collect(stub, greedy(PROMPT, 2, stop_token_ids=[1] * 1024))
    assert accepted[-1].WhichOneof("event") == "completion"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub, greedy(PROMPT, 2, stop_token_ids=[1] * 1025))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("stop_token_ids: must hold at most 1024")


async def test_top_logprobs_list_the_alternatives_most_likely_first(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """With logprobs and top_logprobs=3, every token carries 3 alternatives, sorted, and the
    greedy choice is the first with the token's own logprob."""
    request = greedy(PROMPT, 6, logprobs=True, top_logprobs=3)
    tokens = [m.token for m in await collect(stub, request) if m.WhichOneof("event") == "token"]
    for token in tokens:
        alternatives = list(token.top_logprobs)
        assert len(alternatives) == 3
        assert [a.logprob for a in alternatives] == sorted(
            (a.logprob for a in alternatives), reverse=True
        )
        assert alternatives[0].id == token.id
        assert alternatives[0].logprob == pytest.approx(token.logprob, abs=1e-5)


@pytest.mark.parametrize("logprobs", [True, False])
async def test_token_text_is_each_tokens_own_text_with_logprobs(
    stub: pb_grpc.GenerationServiceStub, tokenizer: Tokenizer, logprobs: bool
) -> None:
    """With logprobs, every Token carries its own text (what the tokenizer decodes for that
    id alone); without, the field is unset (it costs bytes on every message)."""
    messages = await collect(stub, greedy(PROMPT, 6, logprobs=logprobs))
    tokens = [m.token for m in messages if m.WhichOneof("event") == "token"]
    if logprobs:
        assert [t.token_text for t in tokens] == [tokenizer.token_text(t.id) for t in tokens]
    else:
        assert not any(t.HasField("token_text") for t in tokens)


async def test_a_stop_token_id_ends_the_stream(stub: pb_grpc.GenerationServiceStub) -> None:
    """When the model produces a listed stop token id the stream ends there with STOP."""
    first = _ids(await collect(stub, greedy(PROMPT, 4)))
    request = greedy(PROMPT, 4, stop_token_ids=[first[1]])
    messages = await collect(stub, request)
    assert _ids(messages) == first[:2]
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_STOP


async def test_logit_bias_forces_a_token(stub: pb_grpc.GenerationServiceStub) -> None:
    """A +100 bias makes greedy decoding choose that token at every step."""
    request = greedy(PROMPT, 5)
    request.sampling.logit_bias[42] = 100.0
    assert _ids(await collect(stub, request)) == [42] * 5


@pytest.fixture
async def eos_after_one(spec: ModelSpec, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    """A scripted model that says one token, then EOS."""
    token = tokenizer.token_id("A")
    assert token is not None
    model = ScriptedModel.continuing(spec, len(tokenizer.encode("x")), [token])
    running = await start_server(model, tokenizer)
    yield running
    await running.server.drain()


async def test_min_tokens_holds_eos_back(eos_after_one: RunningServer) -> None:
    """EOS comes after one token; with min_tokens=4 the stream has at least 4 tokens first."""
    async with grpc.aio.insecure_channel(eos_after_one.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        plain = await collect(stub, pb.GenerateRequest(prompt="x", max_tokens=8))
        held = await collect(stub, pb.GenerateRequest(prompt="x", max_tokens=8, min_tokens=4))
    assert len(_ids(plain)) == 2
    assert len(_ids(held)) >= 4
    assert held[-1].WhichOneof("event") == "completion"


async def test_min_tokens_beyond_the_default_budget_is_invalid_argument(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """Without max_tokens, a min_tokens above what the request may generate by default is
    INVALID_ARGUMENT naming min_tokens (it could not be honoured)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub, pb.GenerateRequest(prompt="x", min_tokens=200))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert details.startswith("min_tokens: must be at most")
    assert "set max_tokens" in details


@pytest.mark.parametrize("setting", ["max_kv_tokens", "max_context_tokens"])
async def test_a_prompt_past_a_server_limit_below_the_context_names_the_setting(
    spec: ModelSpec, tokenizer: Tokenizer, setting: str
) -> None:
    """Where a server setting (the KV budget, or max_context_tokens) holds requests below the
    model's context, a prompt too long for it is INVALID_ARGUMENT saying the context length
    is that setting's, so the caller knows which limit it met (the model's is larger)."""
    assert spec.context_length > 200
    running = await start_server(ScriptedModel(spec, {}), tokenizer, **{setting: 200})
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            request = pb.GenerateRequest(prompt_ids=list(range(5, 205)))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stub, request)
    finally:
        await running.server.drain()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    said = f"must be shorter than the context length of 200 (the server's {setting}) tokens"
    assert said in (caught.value.details() or "")
