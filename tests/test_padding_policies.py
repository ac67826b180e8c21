"""Each padding policy keeps a request's tokens independent of its batch neighbours.

The bundled model takes explicit position_ids (padding may shift). The same weights with
positions counted from the cache width behave like Gemma-family exports (padding must stay
where a row started), and with an absolute-position bias like learned positions counted from
the width (no padding at all).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from tests.fakes import CountedPositionsModel
from tests.invariance import Job, alone, together
from tokenwire.server.engine import CausalLM, Engine, EngineConfig, OnnxCausalLM, Padding, padding
from tokenwire.server.tokenizer import Tokenizer

LONG = "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n" * 6
JOBS = [
    Job("def fib(n):", 14),
    Job("import os", 20),
    Job("class Stack:\n    def __init__(self):\n        self.items = []\n", 9),
    Job("x", 17),
    Job("for i in range(10):\n    print(i)\n", 12),
    Job("# Copyright notice\n# All rights reserved.\n\nimport sys\nimport re\n", 22),
    Job("return", 6),
    Job("async def fetch(url, *, timeout=10):", 18),
    Job(LONG, 10),
]


async def _engine(model: CausalLM, tokenizer: Tokenizer) -> AsyncIterator[Engine]:
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=16, prefill_chunk_tokens=48))
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture
async def counted(onnx_model: OnnxCausalLM, tokenizer: Tokenizer) -> AsyncIterator[Engine]:
    async for engine in _engine(CountedPositionsModel(onnx_model), tokenizer):
        yield engine


@pytest.fixture
async def absolute(onnx_model: OnnxCausalLM, tokenizer: Tokenizer) -> AsyncIterator[Engine]:
    async for engine in _engine(CountedPositionsModel(onnx_model, 2.0), tokenizer):
        yield engine


def test_explicit_positions_allow_shifting(onnx_model: OnnxCausalLM) -> None:
    """The probe finds that padding may change in front of a running row of the bundled model."""
    assert onnx_model.padding is Padding.SHIFTABLE


def test_counted_positions_fix_the_padding(onnx_model: OnnxCausalLM) -> None:
    """With positions counted from the cache width, the probe forbids shifting a running row."""
    assert CountedPositionsModel(onnx_model).padding is Padding.FIXED


def test_absolute_counted_positions_forbid_padding(onnx_model: OnnxCausalLM) -> None:
    """With absolute positions counted from the width, the probe forbids any padding."""
    assert CountedPositionsModel(onnx_model, 2.0).padding is Padding.NONE


async def test_explicit_positions_are_batch_invariant(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """Llama-like positions: every request's greedy ids alone equal its ids in the batch."""
    async for engine in _engine(onnx_model, tokenizer):
        assert await together(engine, JOBS) == await alone(engine, JOBS)


async def test_counted_positions_are_batch_invariant(counted: Engine) -> None:
    """Gemma-like positions: every request's greedy ids alone equal its ids in the batch."""
    assert await together(counted, JOBS) == await alone(counted, JOBS)


async def test_absolute_positions_are_batch_invariant(absolute: Engine) -> None:
    """Learned-position-like graphs: every request's greedy ids alone equal its ids batched."""
    assert await together(absolute, JOBS) == await alone(absolute, JOBS)


async def test_shifting_a_counted_positions_row_changes_its_tokens(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """The policy matters: shifting rows of a Gemma-like graph gives different tokens."""
    model = CountedPositionsModel(onnx_model)
    model.padding = Padding.SHIFTABLE
    async for engine in _engine(model, tokenizer):
        assert await together(engine, JOBS) != await alone(engine, JOBS)


def test_logits_that_turn_nan_only_when_padded_are_not_close() -> None:
    """A padded run whose logits hold NaN where the plain run's do not is infinitely far from
    it (a NaN compared with `>` passes every check, which would class the graph shiftable),
    while NaN in both runs at the same place counts as equal."""
    plain = np.array([[1.0, np.nan, 2.0]], dtype=np.float32)
    assert padding._distance(np.array([[np.nan, np.nan, 2.0]], dtype=np.float32), plain) == np.inf
    assert padding._distance(plain.copy(), plain) == 0.0


def test_masked_vocabulary_entries_leave_the_scale_to_the_finite_logits() -> None:
    """Logits of -inf (entries a graph masks) in both runs count as equal and do not make the
    scale infinite, which would make every difference 0."""
    plain = np.array([[-np.inf, 1.0, 2.0]], dtype=np.float32)
    other = np.array([[-np.inf, 1.0, 3.0]], dtype=np.float32)
    assert padding._distance(other, plain) == pytest.approx(0.5)
