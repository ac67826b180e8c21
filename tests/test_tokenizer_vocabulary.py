"""A tokenizer that knows ids the model has no row for: refused at load, or those ids refused
in prompts."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from structlog.testing import capture_logs
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import models

from tests.conftest import RunningServer, collect, start_server
from tests.fakes import ScriptedModel
from tokenwire.server.engine import Engine, ModelLoadError, ModelSpec, OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

BEYOND = "<|beyond|>"


def _with_added_token(tokenizer: Tokenizer) -> Tokenizer:
    """The bundled tokenizer plus one special token, at the first id past the model's rows."""
    inner = HfTokenizer.from_str(tokenizer.inner.to_str())
    inner.add_special_tokens([BEYOND])
    return Tokenizer(inner)


def test_a_tokenizer_whose_own_vocabulary_is_larger_than_the_models_is_refused(
    spec: ModelSpec,
) -> None:
    """A tokenizer.json whose base vocabulary has more ids than the model has rows is a
    ModelLoadError naming tokenizer.json and both sizes."""
    size = spec.vocab_size + 10
    words = HfTokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    with pytest.raises(ModelLoadError) as caught:
        Engine(ScriptedModel(spec, {}), Tokenizer(words))
    message = str(caught.value)
    assert "tokenizer.json" in message
    assert str(size) in message
    assert str(spec.vocab_size) in message


def test_added_tokens_beyond_the_models_vocabulary_are_logged_at_load(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """An engine whose tokenizer adds tokens past the model's rows starts, with one warning
    that lists those ids."""
    with capture_logs() as logs:
        Engine(ScriptedModel(spec, {}), _with_added_token(tokenizer))
    [warning] = [e for e in logs if e["event"] == "model.tokenizer_ids_beyond_vocab"]
    assert warning["log_level"] == "warning"
    assert warning["ids"] == [spec.vocab_size]


@pytest.fixture
async def extended(onnx_model: OnnxCausalLM, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    running = await start_server(onnx_model, _with_added_token(tokenizer))
    yield running
    await running.server.drain()


async def test_a_prompt_holding_a_token_the_model_lacks_is_invalid_argument(
    extended: RunningServer,
) -> None:
    """A prompt whose text encodes to an added token beyond the model's vocabulary is
    INVALID_ARGUMENT naming prompt, the token's text and its id (never a failed prefill)."""
    vocab_size = extended.engine.model.spec.vocab_size
    async with grpc.aio.insecure_channel(extended.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(stub, pb.GenerateRequest(prompt=f"def f(): {BEYOND}", max_tokens=2))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert details.startswith("prompt: ")
    assert BEYOND in details
    assert f"id {vocab_size}" in details


async def test_prompts_without_such_a_token_are_served(extended: RunningServer) -> None:
    """The same server streams a prompt that holds none of those tokens to its end."""
    async with grpc.aio.insecure_channel(extended.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        messages = await collect(stub, pb.GenerateRequest(prompt="def f():", max_tokens=4))
    assert messages[-1].WhichOneof("event") == "completion"


async def test_the_ids_above_a_gap_in_the_tokenizers_ids_can_be_chosen(
    onnx_model: OnnxCausalLM, spec: ModelSpec
) -> None:
    """A tokenizer whose ids leave a gap (fewer tokens than its highest id + 1, as tokenizers
    ported from tiktoken have) does not hide the ids above the gap from the model: greedy
    decoding with a +100 bias on the highest id picks that id every step."""
    top = spec.vocab_size - 1
    holed = {f"w{i}": i for i in range(spec.vocab_size) if not 100 <= i < 110}
    words = Tokenizer(HfTokenizer(models.WordLevel(holed, unk_token="w0")))
    running = await start_server(onnx_model, words)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            asked = pb.GenerateRequest(prompt_ids=[1, 2, 3], max_tokens=3, ignore_eos=True)
            asked.sampling.temperature = 0.0
            asked.sampling.logit_bias[top] = 100.0
            messages = await collect(stub, asked)
    finally:
        await running.server.drain()
    ids = [m.token.id for m in messages if m.WhichOneof("event") == "token"]
    assert ids == [top] * 3


def test_a_tokenizer_that_adds_the_warm_up_texts_token_beyond_the_vocabulary_still_loads(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """The warm-up's own text encoding to an added token past the model's rows (a word the
    tokenizer adds) neither fails the warm-up nor stops the load: the warm-up feeds only ids
    the model has rows for."""
    inner = HfTokenizer.from_str(tokenizer.inner.to_str())
    inner.add_tokens(["warm_up"])
    extended = Tokenizer(inner)
    assert onnx_model.spec.vocab_size in extended.encode("def warm_up():\n    return")
    Engine(onnx_model, extended).warm_up()


def test_a_tokenizer_naming_far_fewer_ids_than_the_model_has_rows_is_logged(
    spec: ModelSpec,
) -> None:
    """A tokenizer that names a tenth of the model's rows (most likely another model's) is
    one warning at load with both sizes: tokens are chosen among the ids it names."""
    size = spec.vocab_size // 10
    words = HfTokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    with capture_logs() as logs:
        Engine(ScriptedModel(spec, {}), Tokenizer(words))
    [warning] = [e for e in logs if e["event"] == "model.tokenizer_smaller_than_vocab"]
    assert warning["log_level"] == "warning"
    assert (warning["vocab_size"], warning["tokenizer_size"]) == (spec.vocab_size, size)


def test_the_bundled_tokenizer_naming_every_row_logs_no_size_warning(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """A tokenizer that names every row of the model logs no size warning."""
    with capture_logs() as logs:
        Engine(ScriptedModel(spec, {}), tokenizer)
    assert not [e for e in logs if e["event"] == "model.tokenizer_smaller_than_vocab"]
