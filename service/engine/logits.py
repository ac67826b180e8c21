"""A step's next-token logits, and how they reach the host.

A step's logits are read in two ways: greedy rows need only each row's best id, sampled rows
(and rows asking for logprobs) need the whole distribution. Logits computed on the host are a
numpy array (HostLogits). Logits the model leaves on its device (DeviceLogits: the decode steps
of static_decode.py, on CUDA a replayed graph) answer the argmax where they are, through a
small graph on the same provider (greedy_fp16/fp32.onnx), and come down only when a row needs
them: for a batch of greedy rows a step moves a few bytes to the host, not
rows x vocabulary floats.

float16 logits are widened where they were computed (logits_fp32.onnx) when they do come down,
so the host always receives float32 ready for sampling; widening on the host instead costs numpy
about 0.7 ms per step for 16 rows of a 32,000-entry vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from tokenwire.server.engine.types import FloatArray, IntArray

_HERE = Path(__file__).parent
_CAST_GRAPH = _HERE / "logits_fp32.onnx"


class Logits(Protocol):
    """One step's logits at one position per row: [rows, vocabulary]."""

    def host(self) -> FloatArray:
        """The logits as float32 on the host."""
        ...

    def argmax(self, limit: int) -> IntArray:
        """Each row's highest-scoring id below `limit` (ties: the lowest id)."""
        ...


class HostLogits:
    """Logits already on the host."""

    def __init__(self, array: FloatArray) -> None:
        self._array = array

    def host(self) -> FloatArray:
        return self._array

    def argmax(self, limit: int) -> IntArray:
        best: IntArray = self._array[:, :limit].argmax(axis=1)
        return best


class LogitsReader:
    """Reads logits held in OrtValues (any device): their argmax there, or all of them."""

    def __init__(self, providers: list[str], *, half: bool) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._half = half
        self._cast = _Graph(_CAST_GRAPH, options, providers) if half else None
        greedy = _HERE / f"greedy_{'fp16' if half else 'fp32'}.onnx"
        self._greedy = _Graph(greedy, options, providers)

    def to_host(self, logits: ort.OrtValue) -> FloatArray:
        """float32 logits on the host (float16 ones widened on their device first)."""
        if self._cast is None:
            host: FloatArray = logits.numpy()
            return host
        binding = self._cast.binding
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_output("logits_fp32", "cpu")
        self._cast.session.run_with_iobinding(binding)
        widened: FloatArray = binding.get_outputs()[0].numpy()
        return widened

    def argmax(self, logits: ort.OrtValue, limit: int) -> IntArray:
        """[rows, positions] best ids below `limit`, computed on the logits' device."""
        binding = self._greedy.binding
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_cpu_input("limit", np.asarray([limit], dtype=np.int64))
        binding.bind_output("ids", "cpu")
        self._greedy.session.run_with_iobinding(binding)
        ids: IntArray = binding.get_outputs()[0].numpy()
        return ids


class DeviceLogits:
    """The [rows, 1, vocabulary] logits of a decode step, still where the model put them."""

    def __init__(self, value: ort.OrtValue, reader: LogitsReader) -> None:
        self._value = value
        self._reader = reader
        self._host: FloatArray | None = None

    def host(self) -> FloatArray:
        if self._host is None:
            self._host = self._reader.to_host(self._value)[:, -1, :]
        return self._host

    def argmax(self, limit: int) -> IntArray:
        # Logits in host memory (the CPU provider) are read there: numpy's argmax is faster
        # than a session run. Logits already brought down need no second trip either.
        if self._host is not None or self._value.device_name().lower() == "cpu":
            return HostLogits(self.host()).argmax(limit)
        best: IntArray = self._reader.argmax(self._value, limit)[:, -1]
        return best


class _Graph:
    """A helper graph's session and its one IOBinding."""

    def __init__(self, path: Path, options: ort.SessionOptions, providers: list[str]) -> None:
        self.session = ort.InferenceSession(os.fspath(path), options, providers=providers)
        self.binding = self.session.io_binding()


def widens(logits_type: str) -> bool:
    """Whether logits of this ONNX type (e.g. 'tensor(float16)') need widening."""
    return logits_type == "tensor(float16)"
