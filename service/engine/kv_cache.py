"""A batch KV cache: one tensor per cache input shared by rows of different lengths.

Two alignments, chosen by how the graph finds each row's entries (see padding.py):
- right-aligned (Optimum graphs with standard attention): every row's entries end at the same
  column; a shorter row is padded on the left and the mask zeroes the padding; a step appends
  one column for all rows.
- left-aligned (GroupQueryAttention graphs, e.g. ONNX Runtime GenAI's builder): every row
  starts at column 0 and the mask holds a prefix of ones, its length the row's length; the
  graph writes each row's new entries right after its own length.

Whether the padding in front of a running right-aligned row may change (a longer row joins:
everyone else is padded further; rows leave: all-padding leading columns are trimmed) depends on
the graph: with explicit positions it changes nothing, with positions counted from the cache
width it moves the row's positions mid-sequence. The scheduler only calls `extend` with equal
widths and `keep(trim=False)` when the padding must stay put.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tokenwire.server.engine.types import AnyArray, CacheTensor, FloatArray, IntArray, on_host


class BatchKvCache:
    """Cache tensors [rows, ..., columns (on each tensor's seq axis), ...] plus the row masks."""

    in_place = False

    def __init__(
        self,
        tensors: Sequence[CacheTensor],
        axes: tuple[int, ...],
        mask: IntArray,
        *,
        left_aligned: bool = False,
    ) -> None:
        self.tensors = list(tensors)
        self.axes = axes
        self.mask = mask
        self.left_aligned = left_aligned

    @classmethod
    def zeros(
        cls,
        shapes: list[tuple[int, ...]],
        axes: tuple[int, ...],
        dtype: type[np.floating[Any]],
        rows: int,
        columns: int,
        *,
        left_aligned: bool = False,
    ) -> BatchKvCache:
        """`columns` masked (padding) columns for `rows` rows; shapes have 0 at batch and seq."""
        tensors: list[CacheTensor] = []
        for shape, axis in zip(shapes, axes, strict=True):
            full = list(shape)
            full[0], full[axis] = rows, columns
            tensors.append(np.zeros(full, dtype=dtype))
        mask = np.zeros((rows, columns), dtype=np.int64)
        return cls(tensors, axes, mask, left_aligned=left_aligned)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    def mask_with(self, new_columns: int, real: Sequence[int] | None = None) -> IntArray:
        """The attention mask for a step that feeds new_columns tokens to every row, of which
        `real[row]` are real (default: all); the rest is padding, on the aligned side's far end."""
        width = self.columns + new_columns
        added: IntArray = np.asarray(
            [new_columns] * self.rows if real is None else real, dtype=np.int64
        )
        if self.left_aligned:
            lengths = self.mask.sum(axis=1) + added
            mask: IntArray = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
            return mask
        block = (np.arange(new_columns)[None, :] >= (new_columns - added)[:, None]).astype(np.int64)
        return np.concatenate([self.mask, block], axis=1)

    def last_positions(self, new_columns: int, real: Sequence[int] | None = None) -> IntArray:
        """Index, among a step's new_columns positions, of each row's last real token."""
        if real is None or not self.left_aligned:
            return np.full(self.rows, new_columns - 1, dtype=np.int64)
        last: IntArray = np.asarray(real, dtype=np.int64) - 1
        return last

    def advance(self, present: Sequence[CacheTensor], mask: IntArray) -> None:
        """Adopt the model's present tensors after a step run with `mask` (host arrays, or
        OrtValues left on the model's device: they stay there until rows join or leave)."""
        self.tensors = list(present)
        self.mask = mask

    def host_tensors(self) -> list[FloatArray]:
        """The tensors as host arrays, fetched from the model's device if they are there
        (rows joining or leaving are arranged on the host)."""
        tensors = [on_host(t) for t in self.tensors]
        self.tensors = list(tensors)
        return tensors

    def extend(self, other: BatchKvCache) -> None:
        """Append other's rows below ours, padding whichever side is narrower."""
        if self.rows == 0:
            self.tensors, self.mask = other.tensors, other.mask
            return
        width = max(self.columns, other.columns)
        pad = _pad_right if self.left_aligned else _pad_left
        pairs = zip(self.host_tensors(), other.host_tensors(), self.axes, strict=True)
        self.tensors = [
            np.concatenate([pad(a, axis, width), pad(b, axis, width)], axis=0)
            for a, b, axis in pairs
        ]
        self.mask = np.concatenate([pad(self.mask, 1, width), pad(other.mask, 1, width)], axis=0)

    def keep(self, rows: list[int], *, trim: bool = True) -> list[int]:
        """Keep only the given rows (in that order); with trim, drop all-padding columns on the
        padded side. Return the rows' old indices in their new order (the given order)."""
        index = np.asarray(rows, dtype=np.intp)
        mask = self.mask[index]
        columns = slice(None)
        if trim:
            used = np.flatnonzero(mask.any(axis=0))
            if not used.size:
                columns = slice(0, 0)
            elif self.left_aligned:
                columns = slice(0, int(used[-1]) + 1)
            else:
                columns = slice(int(used[0]), None)
        self.mask = np.ascontiguousarray(mask[:, columns])
        self.tensors = [
            np.ascontiguousarray(t[index][_on_axis(t.ndim, axis, columns)])
            for t, axis in zip(self.host_tensors(), self.axes, strict=True)
        ]
        return list(rows)

    def pad_left(self, columns: int) -> None:
        """Insert `columns` masked columns in front of every (right-aligned) row."""
        width = self.columns + columns
        self.tensors = [
            _pad_left(t, axis, width)
            for t, axis in zip(self.host_tensors(), self.axes, strict=True)
        ]
        self.mask = _pad_left(self.mask, 1, width)


def _pad_left(array: AnyArray, axis: int, width: int) -> AnyArray:
    return _pad(array, axis, (width - array.shape[axis], 0))


def _pad_right(array: AnyArray, axis: int, width: int) -> AnyArray:
    return _pad(array, axis, (0, width - array.shape[axis]))


def _pad(array: AnyArray, axis: int, amounts: tuple[int, int]) -> AnyArray:
    if amounts == (0, 0):
        return array
    pads = [(0, 0)] * array.ndim
    pads[axis] = amounts
    return np.pad(array, pads)


def _on_axis(ndim: int, axis: int, columns: slice) -> tuple[slice, ...]:
    index = [slice(None)] * ndim
    index[axis] = columns
    return tuple(index)
