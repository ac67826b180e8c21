"""fp16 logits reach the host as float32, widened by ONNX Runtime on the model's provider."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from tokenwire.server.engine.logits import LogitsWidener, widens


def test_fp16_logits_are_widened_exactly() -> None:
    """Every float16 value, +-inf and the largest finite ones included, comes back as the same
    number in float32, in the logits' shape."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 2, 1000)) * 1000).astype(np.float16)
    logits[0, 0, :4] = [np.inf, -np.inf, np.float16(65504), np.float16(-65504)]
    value = ort.OrtValue.ortvalue_from_numpy(logits)
    widened = LogitsWidener(["CPUExecutionProvider"]).to_host(value)
    assert widened.dtype == np.float32
    assert widened.shape == logits.shape
    assert np.array_equal(widened, logits.astype(np.float32))


def test_only_fp16_logits_are_widened() -> None:
    """float32 logits come back as they are; float16 ones are widened."""
    assert widens("tensor(float16)")
    assert not widens("tensor(float)")
