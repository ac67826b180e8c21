"""Logits reach the host as float32, whatever precision the graph computes them in.

A graph with float16 logits (fp16 GenAI folders, typically on CUDA) has them widened where they
were computed, by a one-node Cast graph (logits_fp32.onnx) run on the model's own provider: the
host then receives float32 ready for sampling. Widening on the host instead costs numpy about
0.7 ms per step for 16 rows of a 32,000-entry vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from tokenwire.server.engine.types import FloatArray

_CAST_GRAPH = Path(__file__).with_name("logits_fp32.onnx")


class LogitsWidener:
    """float16 logits (an OrtValue on any device) -> float32 numpy on the host."""

    def __init__(self, providers: list[str]) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(os.fspath(_CAST_GRAPH), options, providers=providers)
        self._binding = self._session.io_binding()

    def to_host(self, logits: ort.OrtValue) -> FloatArray:
        binding = self._binding
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_output("logits_fp32", "cpu")
        self._session.run_with_iobinding(binding)
        widened: FloatArray = binding.get_outputs()[0].numpy()
        return widened


def widens(logits_type: str) -> bool:
    """Whether logits of this ONNX type (e.g. 'tensor(float16)') need widening."""
    return logits_type == "tensor(float16)"
