"""A left-padded batch KV cache: every row's entries end at the same column.

Rows of different lengths share one tensor per layer; a row shorter than the longest is padded
on the left and the attention mask zeroes the padding. Decoding appends one column for all rows,
so rows stay right-aligned, joining rows are left-padded to the common length, and columns that
every row masks out are trimmed when rows leave.
"""

from __future__ import annotations

import numpy as np

from service.engine.model import FloatArray, IntArray


class BatchKvCache:
    """Per-layer key/value tensors [rows, kv_heads, columns, head_dim] plus the row masks."""

    def __init__(self, tensors: list[FloatArray], mask: IntArray) -> None:
        self.tensors = tensors
        self.mask = mask

    @classmethod
    def empty(cls, tensors: list[FloatArray]) -> BatchKvCache:
        """A cache with no columns yet; its row count is that of the given [r, h, 0, d] tensors."""
        return cls(tensors, np.zeros((tensors[0].shape[0], 0), dtype=np.int64))

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
            np.concatenate([_pad_left(a, width), _pad_left(b, width)], axis=0)
            for a, b in zip(self.tensors, other.tensors, strict=True)
        ]
        self.mask = np.concatenate(
            [_pad_left_2d(self.mask, width), _pad_left_2d(other.mask, width)], axis=0
        )

    def keep(self, rows: list[int]) -> None:
        """Keep only the given rows (in that order), then drop all-padding leading columns."""
        index = np.asarray(rows, dtype=np.intp)
        mask = self.mask[index]
        used = mask.any(axis=0)
        first = int(used.argmax()) if used.any() else mask.shape[1]
        self.mask = np.ascontiguousarray(mask[:, first:])
        self.tensors = [np.ascontiguousarray(t[index, :, first:, :]) for t in self.tensors]


def _pad_left(tensor: FloatArray, width: int) -> FloatArray:
    missing = width - tensor.shape[2]
    if missing == 0:
        return tensor
    return np.pad(tensor, ((0, 0), (0, 0), (missing, 0), (0, 0)))


def _pad_left_2d(mask: IntArray, width: int) -> IntArray:
    missing = width - mask.shape[1]
    return mask if missing == 0 else np.pad(mask, ((0, 0), (missing, 0)))
