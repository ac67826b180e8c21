"""How many requests a preallocated (in-place) KV cache decodes together, and what it reports.

Each row of such a cache holds a whole request (the longest it may be: the model's context, or
max_context_tokens), so max_kv_tokens holds max_kv_tokens // that many rows."""

from __future__ import annotations

import grpc
import pytest

from tests.conftest import start_server
from tests.fakes import RecordingObserver
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.domain import CompletionEvent, GenerationRequest, InvalidRequest
from tokenwire.server.engine import Engine, EngineConfig, OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

GENAI_LLAMA = BUNDLED_MODEL_DIR.parent / "fixtures-genai" / "llama-fp32"
"""A GroupQueryAttention graph (in-place cache) with a 512-token context."""


@pytest.fixture(scope="module")
def genai() -> OnnxCausalLM:
    return OnnxCausalLM(GENAI_LLAMA, provider="cpu", intra_op_threads=2)


@pytest.fixture(scope="module")
def genai_tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(GENAI_LLAMA)


def _engine(
    model: OnnxCausalLM,
    tokenizer: Tokenizer,
    observer: RecordingObserver | None = None,
    **config: int,
) -> Engine:
    return Engine(model, tokenizer, EngineConfig(max_batch_size=8, **config), observer)


def _request(i: int, max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(f"r{i}", "def f():", max_tokens=max_tokens, ignore_eos=True)


def test_rows_are_the_kv_budget_over_the_models_context(
    genai: OnnxCausalLM, genai_tokenizer: Tokenizer
) -> None:
    """1200 KV tokens hold two rows of the model's 512-token context: two requests decode
    together although max_batch_size is 8."""
    assert _engine(genai, genai_tokenizer, max_kv_tokens=1200).max_rows == 2


async def test_a_shorter_request_context_fits_more_rows_and_they_decode_together(
    genai: OnnxCausalLM, genai_tokenizer: Tokenizer
) -> None:
    """With max_context_tokens 300, the same 1200 KV tokens hold four rows, and four requests
    submitted together decode in the same steps."""
    observer = RecordingObserver()
    engine = _engine(genai, genai_tokenizer, observer, max_kv_tokens=1200, max_context_tokens=300)
    engine.start()
    try:
        handles = [engine.submit(_request(i)) for i in range(4)]
        for handle in handles:
            assert isinstance([e async for e in handle.events()][-1], CompletionEvent)
    finally:
        engine.shutdown()
    assert engine.max_rows == 4
    assert max(step.batch_size for step in observer.steps) == 4


async def test_a_request_longer_than_max_context_tokens_is_refused_naming_max_tokens(
    genai: OnnxCausalLM, genai_tokenizer: Tokenizer
) -> None:
    """max_context_tokens bounds prompt + max_tokens as the model's context would: asking for
    more is INVALID_ARGUMENT naming max_tokens."""
    engine = _engine(genai, genai_tokenizer, max_context_tokens=64)
    engine.start()
    try:
        with pytest.raises(InvalidRequest) as refused:
            engine.submit(_request(0, max_tokens=64))
    finally:
        engine.shutdown()
    assert refused.value.field == "max_tokens"


async def test_kv_usage_of_a_preallocated_cache_is_its_share_of_rows_taken(
    genai: OnnxCausalLM, genai_tokenizer: Tokenizer
) -> None:
    """With two rows, one running request uses half of the cache, whatever its length."""
    observer = RecordingObserver()
    engine = _engine(genai, genai_tokenizer, observer, max_kv_tokens=1200)
    engine.start()
    try:
        handle = engine.submit(_request(0, max_tokens=4))
        assert isinstance([e async for e in handle.events()][-1], CompletionEvent)
    finally:
        engine.shutdown()
    assert max(step.kv_usage for step in observer.steps) == 0.5


async def test_model_info_reports_the_rows_the_cache_holds(
    genai: OnnxCausalLM, genai_tokenizer: Tokenizer
) -> None:
    """GetModelInfo's max_batch_size is the number of requests that decode together: the
    cache's two rows, not the configured 8."""
    running = await start_server(genai, genai_tokenizer, max_batch_size=8, max_kv_tokens=1200)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            info = await pb_grpc.GenerationServiceStub(channel).GetModelInfo(
                pb.GetModelInfoRequest()
            )
    finally:
        await running.server.drain()
    assert info.max_batch_size == 2
