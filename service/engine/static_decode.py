"""Decode steps on fixed addresses, so that a GPU can replay each one as a CUDA graph.

A CUDA graph records the kernels of one step together with the addresses they read and write;
replaying it costs one launch instead of hundreds, which on a small or medium model is most of
a step's time. It replays correctly only if every input and output sits where it was recorded,
with the same shape. Per batch size that holds here: live rows occupy slots 0..rows-1 of the
preallocated cache (slot_cache.py), so the cache regions of `rows` rows never move, and the
step's ids, its attention mask (and positions, where the graph takes them) share one buffer
on the model's device, updated in place with one copy before every step, and its logits get
one more. The mask's width is the attention's length, which costs
time in proportion, so it is not the whole capacity but the next power of two (at least
MIN_WIDTH) above the longest row: a handful of widths per batch size. Each (batch size, width)
is one graph (ONNX Runtime's `gpu_graph_id` run option), captured at its first steps and
replayed after; every other run (prefill, probes) passes -1, which ONNX Runtime never
captures.

On the CPU provider nothing is captured: the same fixed bindings run as plain steps, which is
how the tests check this path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from tokenwire.server.engine.graph import CacheLayout
from tokenwire.server.engine.slot_buffer import BoundTensor
from tokenwire.server.engine.types import IntArray

CUDA = "CUDAExecutionProvider"
_CAPTURE = "enable_cuda_graph"
MIN_WIDTH = 64

Providers = list[str | tuple[str, dict[str, str]]]


def capturing(providers: Sequence[str]) -> Providers:
    """The same providers with CUDA's graph capture switched on."""
    return [(p, {_CAPTURE: "1"}) if p == CUDA else p for p in providers]


def captures_graphs(session: ort.InferenceSession) -> bool:
    """Whether the session's CUDA provider records and replays CUDA graphs."""
    return bool(session.get_provider_options().get(CUDA, {}).get(_CAPTURE) == "1")


def graph_run(graph_id: int) -> ort.RunOptions:
    """Run options recording (then replaying) graph `graph_id`; -1: a run never captured."""
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


def uncaptured_run() -> ort.RunOptions:
    """Run options for a step that must not be recorded (or replayed) as a CUDA graph."""
    return graph_run(-1)


@dataclasses.dataclass(frozen=True, slots=True)
class _Step:
    """Everything one batch size's step is bound to; none of it moves after creation."""

    binding: Any  # ort.IOBinding (untyped in onnxruntime's stubs)
    inputs: ort.OrtValue  # every input, one after the other
    views: dict[str, IntArray]  # each input's part of `staging`
    logits: ort.OrtValue
    staging: IntArray
    options: ort.RunOptions


class StaticDecode:
    """One fixed binding per set of cache regions (in practice: per batch size) and mask
    width."""

    def __init__(
        self,
        session: ort.InferenceSession,
        layout: CacheLayout,
        device: str,
        logits_dtype: type[np.floating[Any]],
        vocab_size: int,
    ) -> None:
        self._session = session
        self._layout = layout
        self._device = device
        self._logits_dtype = logits_dtype
        self._vocab = vocab_size
        self._steps: dict[tuple[tuple[BoundTensor, ...], int], _Step] = {}

    @property
    def graphs(self) -> int:
        """(Batch size, width) pairs bound so far (each one graph on CUDA)."""
        return len(self._steps)

    def run(
        self,
        feed: dict[str, IntArray],
        regions: Sequence[BoundTensor],
        before_run: Callable[[], None] | None,
    ) -> ort.OrtValue:
        """One decode step: feed holds input_ids [rows, 1], the rows' prefix attention_mask (at
        most as wide as the capacity) and position_ids where the graph takes them. Returns
        the logits, on the device, [rows, 1, vocab]."""
        mask = feed["attention_mask"]
        capacity = regions[0].shape[self._layout.tensors[0].seq_axis]
        key = (tuple(regions), _width(mask.shape[1], capacity))
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._bind(*key, sorted(feed), len(self._steps) + 1)
        # Every input in one host array, laid out as on the device: one copy up per step.
        for name, view in step.views.items():
            source = feed[name]
            view[:, : source.shape[1]] = source
            view[:, source.shape[1] :] = 0
        step.inputs.update_inplace(step.staging)
        if before_run is not None:
            before_run()
        self._session.run_with_iobinding(step.binding, step.options)
        return step.logits

    def _bind(
        self, regions: tuple[BoundTensor, ...], mask_width: int, names: list[str], graph_id: int
    ) -> _Step:
        rows = regions[0].shape[0]
        widths = {name: mask_width if name == "attention_mask" else 1 for name in names}
        staging: IntArray = np.zeros(rows * sum(widths.values()), dtype=np.int64)
        # A buffer of its own (a CPU OrtValue would otherwise share the numpy array's memory).
        inputs = ort.OrtValue.ortvalue_from_numpy(np.zeros_like(staging), self._device, 0)
        binding = self._session.io_binding()
        views, offset = {}, 0
        for name, width in widths.items():
            size = rows * width
            views[name] = staging[offset : offset + size].reshape(rows, width)
            pointer = inputs.data_ptr() + offset * staging.itemsize
            binding.bind_input(name, self._device, 0, np.int64, [rows, width], pointer)
            offset += size
        logits = ort.OrtValue.ortvalue_from_shape_and_type(
            [rows, 1, self._vocab], self._logits_dtype, self._device, 0
        )
        binding.bind_ortvalue_output("logits", logits)
        dtype = self._layout.dtype
        for tensor, region in zip(self._layout.tensors, regions, strict=True):
            shape = list(region.shape)
            binding.bind_input(tensor.name, region.device, 0, dtype, shape, region.pointer)
            binding.bind_output(tensor.present, region.device, 0, dtype, shape, region.pointer)
        return _Step(binding, inputs, views, logits, staging, graph_run(graph_id))


def _width(needed: int, capacity: int) -> int:
    """The mask width a step of `needed` columns runs at: a power of two, within the capacity."""
    return min(capacity, max(MIN_WIDTH, 1 << (needed - 1).bit_length()))
