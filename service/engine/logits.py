"""A step's next-token logits, and how they reach the host.

A step's logits are read in two ways: greedy rows need only each row's best id, sampled rows
(and rows asking for logprobs) need the whole distribution. Logits computed on the host are a
numpy array (HostLogits). Logits the model leaves on its device (DeviceLogits: the decode steps
of static_decode.py, on CUDA a replayed graph) answer the argmax where they are, through a
small graph on the same provider (greedy_fp16/fp32.onnx), and come down only when a row needs
them: for a batch of greedy rows a step moves a few bytes to the host, not
rows x vocabulary floats. Either argmax ranks a NaN logit as -inf, as the adjusted scores of
sampling rows do: a model's NaN is chosen by no kind of row.

float16 logits are widened where they were computed (logits_fp32.onnx) when they do come down,
so the host always receives float32 ready for sampling; widening on the host instead costs numpy
about 0.7 ms per step for 16 rows of a 32,000-entry vocabulary.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import structlog

from tokenwire.server.engine.spec import first_line
from tokenwire.server.engine.static_decode import CUDA, Providers, capturing, graph_run
from tokenwire.server.engine.types import FloatArray, IntArray

_HERE = Path(__file__).parent
_CAST_GRAPH = _HERE / "logits_fp32.onnx"
log = structlog.get_logger("tokenwire.engine")


class Logits(Protocol):
    """One step's logits at one position per row: [rows, vocabulary]."""

    def host(self) -> FloatArray:
        """The logits as float32 on the host."""
        ...

    def argmax(self, limit: int) -> IntArray:
        """Each row's highest-scoring id below `limit` (ties: the lowest id; a NaN scores as
        -inf, as the adjusted scores of sampling.py rank it too)."""
        ...


class HostLogits:
    """Logits already on the host."""

    def __init__(self, array: FloatArray) -> None:
        self._array = array

    def host(self) -> FloatArray:
        return self._array

    def argmax(self, limit: int) -> IntArray:
        return best_ids(self._array[:, :limit])


class RowsOf:
    """Some rows of a step's logits, in the order given."""

    def __init__(self, logits: Logits, rows: list[int]) -> None:
        self._logits, self._rows = logits, rows

    def host(self) -> FloatArray:
        return self._logits.host()[self._rows]

    def argmax(self, limit: int) -> IntArray:
        return self._logits.argmax(limit)[self._rows]


class LogitsReader:
    """Reads logits held in OrtValues: their argmax where they are, or all of them on the host.

    With `capture` (a CUDA session replaying graphs), the argmax of each logits buffer (one
    per decode binding, static_decode.py) is itself recorded as a CUDA graph and replayed: a
    few microseconds instead of a session run's launches."""

    def __init__(self, providers: list[str], *, half: bool, capture: bool = False) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._cast = _Graph(_CAST_GRAPH, options, providers) if half else None
        greedy = _HERE / f"greedy_{'fp16' if half else 'fp32'}.onnx"
        self._capture = capture and CUDA in providers
        chosen = capturing(providers) if self._capture else providers
        try:
            self._greedy = _Graph(greedy, options, chosen)
        except Exception:  # a provider that cannot capture this graph: run it uncaptured
            self._capture = False
            self._greedy = _Graph(greedy, options, providers)
        self._argmax: dict[int, _Argmax] = {}

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

    def argmax(self, logits: ort.OrtValue) -> IntArray:
        """[rows, positions] best ids over the whole vocabulary, computed on the logits'
        device (logits at a fixed address, as a decode binding's are)."""
        fixed = self._argmax.get(logits.data_ptr())
        if fixed is None:
            fixed = self._argmax[logits.data_ptr()] = self._bind(logits)
        try:
            self._greedy.session.run_with_iobinding(fixed.binding, fixed.options)
        except Exception as exc:
            if not self._capture:
                raise
            # Capture refused at run time: every argmax runs uncaptured from now on.
            log.warning("engine.argmax_graph_uncaptured", error=first_line(exc))
            self._capture = False
            self._argmax.clear()
            return self.argmax(logits)
        ids: IntArray = fixed.ids.numpy()
        return ids

    def _bind(self, logits: ort.OrtValue) -> _Argmax:
        binding = self._greedy.session.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        rows, positions, _ = logits.shape()
        device = logits.device_name().lower()
        ids = ort.OrtValue.ortvalue_from_shape_and_type([rows, positions], np.int64, device, 0)
        binding.bind_ortvalue_output("ids", ids)
        graph_id = len(self._argmax) + 1 if self._capture else -1
        return _Argmax(binding, ids, graph_run(graph_id))


class DeviceLogits:
    """The [rows, 1, vocabulary] logits of a decode step, still on the model's device."""

    def __init__(self, value: ort.OrtValue, reader: LogitsReader) -> None:
        self._value = value
        self._reader = reader
        self._host: FloatArray | None = None

    def host(self) -> FloatArray:
        if self._host is None:
            self._host = self._reader.to_host(self._value)[:, -1, :]
        return self._host

    def argmax(self, limit: int) -> IntArray:
        if self._host is not None:  # already down: no second trip to the device
            return HostLogits(self._host).argmax(limit)
        best: IntArray = self._reader.argmax(self._value)[:, -1]
        # A row whose best id lies past the limit (padded embedding rows) is decided on the
        # host, among the ids below it.
        past = best >= limit
        if past.any():
            best[past] = best_ids(self.host()[past, :limit])
        return best


def best_ids(scores: FloatArray) -> IntArray:
    """Each row's highest-scoring id (ties: the lowest), a NaN scoring as -inf.

    numpy's argmax returns the first NaN of a row that holds one, so a model that produced a
    NaN logit would have it chosen by plain greedy rows and by no other kind. A row that picked
    a NaN is ranked again without them: finite rows cost one argmax, as before."""
    best: IntArray = scores.argmax(axis=1)
    rows = np.arange(scores.shape[0])
    picked_nan = np.flatnonzero(np.isnan(scores[rows, best]))
    if picked_nan.size:
        clean = np.where(np.isnan(scores[picked_nan]), -np.inf, scores[picked_nan])
        best[picked_nan] = clean.argmax(axis=1)
    return best


@dataclasses.dataclass(frozen=True, slots=True)
class _Argmax:
    """The greedy graph bound to one logits buffer and its own output."""

    binding: Any  # ort.IOBinding (untyped in onnxruntime's stubs)
    ids: ort.OrtValue
    options: ort.RunOptions


class _Graph:
    """A helper graph's session and its one IOBinding."""

    def __init__(
        self,
        path: Path,
        options: ort.SessionOptions,
        providers: Sequence[str] | Providers,
    ) -> None:
        self.session = ort.InferenceSession(os.fspath(path), options, providers=providers)
        self.binding = self.session.io_binding()


def widens(logits_type: str) -> bool:
    """Whether logits of this ONNX type (e.g. 'tensor(float16)') need widening."""
    return logits_type == "tensor(float16)"
