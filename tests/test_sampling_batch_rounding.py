"""Batch rounding: what the server reports about rows that round otherwise beside others.

A row padded in front (beside a longer prompt, on a left-padded graph) is computed with masked
columns that change the order its attention sums in, so its logits may land a rounding away
from the same row's alone, and a seeded draw that falls that near a boundary between two
tokens flips. The load-time probe measures this with the runs each padding class lets the
scheduler make, and reports it as batch rounding (model.loaded, the model.batch_rounding
warning): it is never 0 while a row served beside others rounds otherwise.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.procs import rounding_at_start
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.domain import GenerationRequest, SamplingParams, TokenEvent
from tokenwire.server.engine import Engine, EngineConfig, OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer

SHORT = "class Foo:\n    def __init__(self"
LONG = "import os\nimport sys\nimport json\nimport re\nclass Foo:\n    def __init__(self"


async def _logprobs(engine: Engine, name: str, prompt: str) -> list[tuple[int, float]]:
    """The greedy ids of six tokens of `prompt` and their logprobs."""
    request = GenerationRequest(
        name,
        prompt,
        max_tokens=6,
        sampling=SamplingParams(temperature=0.0),
        ignore_eos=True,
        logprobs=True,
    )
    return [
        (event.token_id, event.logprob or 0.0)
        async for event in engine.submit(request).events()
        if isinstance(event, TokenEvent)
    ]


async def test_a_row_padded_beside_a_longer_prompt_is_counted_as_batch_rounding(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A short prompt served alone, then together with a longer one (its row padded in
    front): where its logprobs moved, the model's batch rounding is above 0."""
    engine = Engine(onnx_model, tokenizer, EngineConfig(max_batch_size=4))
    engine.start()
    try:
        alone = await _logprobs(engine, "alone", SHORT)
        beside, _ = await asyncio.gather(
            _logprobs(engine, "beside", SHORT), _logprobs(engine, "longer", LONG)
        )
    finally:
        engine.shutdown()
    assert [i for i, _ in alone] == [i for i, _ in beside]
    moved = max(abs(a - b) for (_, a), (_, b) in zip(alone, beside, strict=True))
    assert moved == 0 or onnx_model.batch_rounding > 0, f"logprobs moved by {moved:.1e}"


@pytest.mark.slow
def test_the_bundled_model_warns_of_its_batch_rounding_at_start() -> None:
    """`tokenwire serve` on the bundled model reports the batch rounding its probe measures in
    model.loaded and, where it is above 0 (its left-padded rows round otherwise on every CPU
    measured), logs a model.batch_rounding warning with the same figure."""
    measured = OnnxCausalLM(BUNDLED_MODEL_DIR, provider="cpu").batch_rounding
    loaded, warning = rounding_at_start()
    assert (loaded["batch_rounding"] > 0) == (measured > 0)
    if measured > 0:
        assert warning is not None
        assert (warning["level"], warning["relative"]) == ("warning", loaded["batch_rounding"])
        assert "padding" in warning["reason"]
