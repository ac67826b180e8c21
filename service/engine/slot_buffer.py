"""Where a preallocated KV cache lives: host memory, or the model's own device.

A slot buffer is one cache tensor, [slots, ..., capacity (on its sequence axis), ...], that the
graph reads and writes in place through IOBinding. On the CPU provider it is a numpy array. On
CUDA it is an OrtValue in device memory, so a decode step moves no cache over PCIe: only the
step's ids and mask go up and its logits come down. Rows join (host -> device, one copy of the
joining rows) and leave (device -> device, one slot) through a one-node ONNX Runtime graph run
on the same provider (copy_bytes.onnx: ONNX Runtime's Python API has no copy between parts of
OrtValues). Both kinds behave the same; tests run the device kind on the CPU provider too.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import numpy as np
import onnxruntime as ort

from tokenwire.server.engine.types import AnyArray, CacheTensor

_COPY_GRAPH = Path(__file__).with_name("copy_bytes.onnx")


@dataclasses.dataclass(frozen=True, slots=True)
class BoundTensor:
    """A tensor given to ONNX Runtime by address: where it lives, where it starts, its shape."""

    device: str
    pointer: int
    shape: tuple[int, ...]


PastTensors: TypeAlias = Sequence[CacheTensor] | Sequence[BoundTensor]
"""A step's cache input: arrays or OrtValues (a copying step) or regions bound by address
(in place)."""


class SlotBuffer(Protocol):
    """One preallocated cache tensor; slot i is row i of axis 0."""

    device: str
    shape: tuple[int, ...]

    def bound(self, rows: int, first: int = 0) -> BoundTensor:
        """Slots first..first+rows-1 as one contiguous tensor."""
        ...

    def write_rows(self, first: int, rows: AnyArray, axis: int) -> None:
        """Put host rows [n, ..., width, ...] (width <= capacity) into slots first..first+n-1,
        left-aligned on `axis`."""
        ...

    def move_row(self, source: int, target: int, length: int, axis: int) -> None:
        """Copy slot `source`'s first `length` entries on `axis` into slot `target`."""
        ...

    def to_host(self) -> AnyArray:
        """A host copy of the whole buffer (for inspection)."""
        ...


class HostSlotBuffer:
    """A slot buffer in host memory: a numpy array the graph is bound to by address."""

    device = "cpu"

    def __init__(self, shape: tuple[int, ...], dtype: type[np.floating[Any]]) -> None:
        self.shape = shape
        self.array: AnyArray = np.zeros(shape, dtype=dtype)
        self._base = self.array.ctypes.data  # read once: numpy's .ctypes is slow
        self._slot_bytes = self.array[0].nbytes

    def bound(self, rows: int, first: int = 0) -> BoundTensor:
        pointer = self._base + first * self._slot_bytes
        return BoundTensor("cpu", pointer, (rows, *self.shape[1:]))

    def write_rows(self, first: int, rows: AnyArray, axis: int) -> None:
        target = _region(self.array.ndim, axis, slice(first, first + len(rows)), rows.shape[axis])
        self.array[target] = rows

    def move_row(self, source: int, target: int, length: int, axis: int) -> None:
        src = _region(self.array.ndim, axis, source, length)
        dst = _region(self.array.ndim, axis, target, length)
        self.array[dst] = self.array[src]

    def to_host(self) -> AnyArray:
        return self.array.copy()


class DeviceSlotBuffer:
    """A slot buffer in the memory of an ONNX Runtime device (e.g. "cuda"), as an OrtValue."""

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: type[np.floating[Any]],
        device: str,
        copier: ByteCopier,
    ) -> None:
        self.shape = shape
        self.device = device
        self._dtype = dtype
        self._copier = copier
        self.value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, 0)
        self._base = self.value.data_ptr()
        self._slot_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        self.nbytes = self._slot_bytes * shape[0]

    def bound(self, rows: int, first: int = 0) -> BoundTensor:
        pointer = self._base + first * self._slot_bytes
        return BoundTensor(self.device, pointer, (rows, *self.shape[1:]))

    def write_rows(self, first: int, rows: AnyArray, axis: int) -> None:
        # Whole slots go up in one copy: rows padded to the capacity on the host first (a
        # row's entries past its length are never read: the mask says where it ends).
        staging = np.zeros((len(rows), *self.shape[1:]), dtype=self._dtype)
        staging[_region(staging.ndim, axis, slice(None), rows.shape[axis])] = rows
        self._copier.copy(
            ("cpu", staging.ctypes.data),
            (self.device, self._base + first * self._slot_bytes),
            staging.nbytes,
        )

    def move_row(self, source: int, target: int, length: int, axis: int) -> None:
        # A slot is contiguous: one device-to-device copy of it, whatever the row's length.
        self._copier.copy(
            (self.device, self._base + source * self._slot_bytes),
            (self.device, self._base + target * self._slot_bytes),
            self._slot_bytes,
        )

    def to_host(self) -> AnyArray:
        host = np.empty(self.shape, dtype=self._dtype)
        self._copier.copy((self.device, self._base), ("cpu", host.ctypes.data), host.nbytes)
        return host


class ByteCopier:
    """Copies byte ranges between addresses with copy_bytes.onnx on the given providers."""

    def __init__(self, providers: list[str]) -> None:
        options = ort.SessionOptions()
        # The one Identity node must run as written (an optimiser may drop it).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(os.fspath(_COPY_GRAPH), options, providers=providers)
        self._binding = self._session.io_binding()

    def copy(self, source: tuple[str, int], target: tuple[str, int], size: int) -> None:
        """Copy `size` bytes from (device, address) to (device, address); returns when done."""
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_input("source", source[0], 0, np.uint8, [size], source[1])
        binding.bind_output("target", target[0], 0, np.uint8, [size], target[1])
        self._session.run_with_iobinding(binding)


def _region(ndim: int, axis: int, rows: int | slice, length: int) -> tuple[int | slice, ...]:
    """Index of `rows` on axis 0 and the first `length` entries on `axis`."""
    index: list[int | slice] = [rows] + [slice(None)] * (ndim - 1)
    index[axis] = slice(0, length)
    return tuple(index)
