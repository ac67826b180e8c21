"""A left-padded batch KV cache: every row's entries end at the same column.

Rows of different lengths share one tensor per cache input; a row shorter than the longest is
padded on the left and the attention mask zeroes the padding. Decoding appends one column for
all rows, so rows stay right-aligned and contiguous.

Whether the padding in front of a running row may change (a longer row joins: everyone else is
padded further; rows leave: all-padding leading columns are trimmed) depends on the graph: with
explicit positions it changes nothing, with positions counted from the cache width it moves the
row's positions mid-sequence. `Padding` (see padding.py) says which; the scheduler only calls
`extend` with equal widths and `keep(trim=False)` when the padding must stay put.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.engine.types import AnyArray, FloatArray, IntArray


class BatchKvCache:
    """Cache tensors [rows, ..., columns (on each tensor's seq axis), ...] plus the row masks."""

    def __init__(self, tensors: list[FloatArray], axes: tuple[int, ...], mask: IntArray) -> None:
        self.tensors = tensors
        self.axes = axes
        self.mask = mask

    @classmethod
    def zeros(
        cls,
        shapes: list[tuple[int, ...]],
        axes: tuple[int, ...],
        dtype: type[np.floating[Any]],
        rows: int,
        columns: int,
    ) -> BatchKvCache:
        """`columns` masked (padding) columns for `rows` rows; shapes have 0 at batch and seq."""
        tensors = []
        for shape, axis in zip(shapes, axes, strict=True):
            full = list(shape)
            full[0], full[axis] = rows, columns
            tensors.append(np.zeros(full, dtype=dtype))
        return cls(tensors, axes, np.zeros((rows, columns), dtype=np.int64))

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    def mask_with(self, new_columns: int) -> IntArray:
        """The attention mask for a step that appends new_columns real entries to every row."""
        ones = np.ones((self.rows, new_columns), dtype=np.int64)
        return np.concatenate([self.mask, ones], axis=1)

    def advance(self, present: list[FloatArray], mask: IntArray) -> None:
        """Adopt the model's present tensors after a step run with `mask`."""
        self.tensors = present
        self.mask = mask

    def extend(self, other: BatchKvCache) -> None:
        """Append other's rows below ours, left-padding whichever side is shorter."""
        if self.rows == 0:
            self.tensors, self.mask = other.tensors, other.mask
            return
        width = max(self.columns, other.columns)
        self.tensors = [
            np.concatenate([_pad_left(a, axis, width), _pad_left(b, axis, width)], axis=0)
            for a, b, axis in zip(self.tensors, other.tensors, self.axes, strict=True)
        ]
        self.mask = np.concatenate(
            [_pad_left(self.mask, 1, width), _pad_left(other.mask, 1, width)], axis=0
        )

    def keep(self, rows: list[int], *, trim: bool = True) -> None:
        """Keep only the given rows (in that order); with trim, drop all-padding leading columns."""
        index = np.asarray(rows, dtype=np.intp)
        mask = self.mask[index]
        first = 0
        if trim:
            used = mask.any(axis=0)
            first = int(used.argmax()) if used.any() else mask.shape[1]
        self.mask = np.ascontiguousarray(mask[:, first:])
        self.tensors = [
            np.ascontiguousarray(t[index][_from_column(t.ndim, axis, first)])
            for t, axis in zip(self.tensors, self.axes, strict=True)
        ]

    def pad_left(self, columns: int) -> None:
        """Insert `columns` masked columns in front of every row."""
        width = self.columns + columns
        self.tensors = [
            _pad_left(t, axis, width) for t, axis in zip(self.tensors, self.axes, strict=True)
        ]
        self.mask = _pad_left(self.mask, 1, width)


def _pad_left(array: AnyArray, axis: int, width: int) -> AnyArray:
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    pads = [(0, 0)] * array.ndim
    pads[axis] = (missing, 0)
    return np.pad(array, pads)


def _from_column(ndim: int, axis: int, first: int) -> tuple[slice, ...]:
    index = [slice(None)] * ndim
    index[axis] = slice(first, None)
    return tuple(index)
