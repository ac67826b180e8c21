"""A preallocated KV cache whose entries never move: GroupQueryAttention writes in place.

One buffer per cache input, [slots, ..., capacity, ...], allocated once. Live rows occupy slots
0..rows-1 (the graph runs on that contiguous view), each left-aligned with its own length; the
graph is bound to the same buffer as past and present (IOBinding), reads each row's length
from the mask's sum and writes the step's entries right after it, so a decode step copies no
cache at all. A row that joins is copied into the next free slot and a row that leaves is
replaced by the last live row: O(one row) either way, whatever the batch holds. Whole prompts
are prefilled straight into the free slots above the live rows (SlotPrefill), so that joining
copies nothing at all; a prompt prefilled in chunks is written into the top slot, held for it
between its chunks, and moves down once when it joins. The buffers
live where the model runs (slot_buffer.py): host memory on the CPU provider, device memory on
CUDA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tokenwire.server.engine.kv_cache import BatchKvCache
from tokenwire.server.engine.slot_buffer import BoundTensor, HostSlotBuffer, SlotBuffer
from tokenwire.server.engine.types import CacheTensor, IntArray, on_host

BufferFactory = Callable[[tuple[int, ...], type[np.floating[Any]]], SlotBuffer]


class SlotKvCache:
    """Live rows in slots 0..rows-1 of preallocated buffers; see the module docstring."""

    in_place = True

    def __init__(
        self,
        shapes: list[tuple[int, ...]],
        axes: tuple[int, ...],
        dtype: type[np.floating[Any]],
        slots: int,
        capacity: int,
        *,
        buffer: BufferFactory = HostSlotBuffer,
    ) -> None:
        self.axes = axes
        self.capacity = capacity
        self.buffers: list[SlotBuffer] = []
        for shape, axis in zip(shapes, axes, strict=True):
            full = list(shape)
            full[0], full[axis] = slots, capacity
            self.buffers.append(buffer(tuple(full), dtype))
        self.lengths: IntArray = np.zeros(slots, dtype=np.int64)
        self.rows = 0
        self.reserved = 0
        """Top slots held by a prompt being prefilled there in chunks (0 or 1)."""
        self._regions: dict[int, list[BoundTensor]] = {}
        self._pairs: dict[int, list[BoundTensor]] = {}

    @property
    def slots(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def columns(self) -> int:
        """The longest live row: the attention mask's width before a step."""
        return int(self.lengths[: self.rows].max()) if self.rows else 0

    @property
    def device(self) -> str:
        return self.buffers[0].device if self.buffers else "cpu"

    @property
    def tensors(self) -> list[BoundTensor]:
        """The live rows of every buffer: contiguous regions the graph reads and writes (the
        same list for the same row count: the buffers never move)."""
        regions = self._regions.get(self.rows)
        if regions is None:
            regions = self._regions[self.rows] = [b.bound(self.rows) for b in self.buffers]
        return regions

    def mask_with(self, new_columns: int, real: Sequence[int] | None = None) -> IntArray:
        """Prefix masks: each row's length plus the new entries."""
        return _prefix_mask(self.lengths[: self.rows], new_columns, real)

    def advance(self, present: Sequence[CacheTensor | BoundTensor], mask: IntArray) -> None:
        """The graph wrote in place; only the lengths move on."""
        self.lengths[: self.rows] = mask.sum(axis=1)

    @property
    def free_slot(self) -> bool:
        """Whether a slot is neither live nor held."""
        return self.rows < self.slots - self.reserved

    def prefill(self, rows: int) -> SlotPrefill | None:
        """The next `rows` free slots, for a prefill written in place; None if they are not
        free."""
        if self.rows + rows > self.slots - self.reserved:
            return None
        return SlotPrefill(self, rows)

    def chunked_prefill(self) -> SlotPrefill | None:
        """The top slot, held for one prompt prefilled there in chunks until it joins (or
        `release`); None if it is held already or live."""
        if self.reserved or not self.free_slot:
            return None
        self.reserved = 1
        return SlotPrefill(self, 1, self.slots - 1)

    def release(self) -> None:
        """Give up the slot held for a prompt prefilled in chunks."""
        self.reserved = 0

    def extend(self, other: BatchKvCache | SlotPrefill) -> None:
        """Take other's (left-aligned) rows into the next free slots: rows prefilled in place
        there already are; others are copied."""
        if isinstance(other, SlotPrefill):
            if other.first != self.rows:
                # The slot held for a prompt prefilled in chunks: its row moves down once.
                for row, length in enumerate(other.lengths.tolist()):
                    self.move_slot(other.first + row, self.rows + row, length)
            if self.reserved and other.first == self.slots - self.reserved:
                self.reserved = 0
            self.lengths[self.rows : self.rows + other.rows] = other.lengths
            self.rows += other.rows
            return
        added, width = other.rows, other.columns
        if self.rows + added > self.slots or width > self.capacity:
            raise ValueError(
                f"{added} rows of {width} entries do not fit {self.slots - self.rows} free slots "
                f"of {self.capacity}"
            )
        for buffer, tensor, axis in zip(self.buffers, other.tensors, self.axes, strict=True):
            buffer.write_rows(self.rows, on_host(tensor), axis)
        self.lengths[self.rows : self.rows + added] = other.mask.sum(axis=1)
        self.rows += added

    def keep(self, rows: list[int], *, trim: bool = True) -> list[int]:
        """Keep the given live rows; each freed slot below the new count takes the last live
        row. Return the old index of the row now in each slot."""
        order = list(range(self.rows))
        kept = set(rows)
        count = len(rows)
        movers = [i for i in range(count, self.rows) if i in kept]
        for hole in (i for i in range(count) if i not in kept):
            source = movers.pop()
            self._move(source, hole)
            order[hole] = source
        self.rows = count
        return order[:count]

    def swap(self, a: int, b: int) -> None:
        """Exchange live rows a and b, through the first free slot (O(one row) each way)."""
        if not self.free_slot:
            raise ValueError("swapping rows needs a free slot")
        spare = self.rows
        self._move(a, spare)
        self._move(b, a)
        self._move(spare, b)

    def _move(self, source: int, target: int) -> None:
        self.move_slot(source, target, int(self.lengths[source]))
        self.lengths[target] = self.lengths[source]

    def pair(self, first: int) -> list[BoundTensor]:
        """Slots first and first + 1 of every buffer (the same list for the same slots)."""
        regions = self._pairs.get(first)
        if regions is None:
            regions = self._pairs[first] = [b.bound(2, first) for b in self.buffers]
        return regions

    def beside(self, slot: int) -> tuple[int, int]:
        """A slot next to `slot` for a scratch row (the one above, or below the top slot), and
        the entries there that must stay: a live row's, or those of a prompt prefilled in the
        held slot; none in a free slot. A scratch row writes its one entry right after them,
        where that row's next forward writes its own before any forward reads it."""
        if self.slots < 2:
            raise ValueError("a scratch row needs a second slot")
        other = slot + 1 if slot + 1 < self.slots else slot - 1
        kept = other < self.rows or other >= self.slots - self.reserved
        length = int(self.lengths[other]) if kept else 0
        if length >= self.capacity:
            raise ValueError(f"slot {other} is full: no entry is free for a scratch row")
        return other, length

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy slot `source`'s first `length` entries of every buffer into slot `target`."""
        for buffer, axis in zip(self.buffers, self.axes, strict=True):
            buffer.move_row(source, target, length, axis)


class SlotPrefill:
    """Rows being prefilled in place in the free slots right above a SlotKvCache's live rows,
    or one prompt prefilled in chunks in the top slot, held for it.

    Used as the prefill's cache: the graph writes the prompts' entries straight into those
    slots, rows that finish at their first token are dropped here, and joining the live rows
    only moves the count (SlotKvCache.extend); a row from the top slot moves down once."""

    in_place = True

    def __init__(self, cache: SlotKvCache, rows: int, first: int | None = None) -> None:
        self.cache = cache
        self.first = cache.rows if first is None else first
        self.lengths: IntArray = np.zeros(rows, dtype=np.int64)

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def columns(self) -> int:
        return int(self.lengths.max()) if self.rows else 0

    @property
    def tensors(self) -> list[BoundTensor]:
        return [b.bound(self.rows, self.first) for b in self.cache.buffers]

    def mask_with(self, new_columns: int, real: Sequence[int] | None = None) -> IntArray:
        """Prefix masks: each row's length plus its real new entries."""
        return _prefix_mask(self.lengths, new_columns, real)

    def last_positions(self, new_columns: int, real: Sequence[int] | None = None) -> IntArray:
        """Index, among the step's new positions, of each row's last real token."""
        if real is None:
            return np.full(self.rows, new_columns - 1, dtype=np.int64)
        last: IntArray = np.asarray(real, dtype=np.int64) - 1
        return last

    def advance(self, present: Sequence[CacheTensor | BoundTensor], mask: IntArray) -> None:
        self.lengths = mask.sum(axis=1)
        # The cache knows how much of its slots is written (a scratch row beside them keeps it).
        self.cache.lengths[self.first : self.first + self.rows] = self.lengths

    def keep(self, rows: list[int], *, trim: bool = True) -> list[int]:
        """Keep the given rows (ascending), packed down from the first slot."""
        for target, source in enumerate(rows):
            if source != target:
                length = int(self.lengths[source])
                self.cache.move_slot(self.first + source, self.first + target, length)
        self.lengths = self.lengths[rows]
        return list(rows)


class SlotRange:
    """Live rows first..first+rows-1 of a SlotKvCache as a forward's cache of their own: each
    row past a graph's width limit decodes alone, the rows between them together."""

    in_place = True

    def __init__(self, cache: SlotKvCache, first: int, rows: int) -> None:
        self.cache = cache
        self.first = first
        self.rows = rows

    @property
    def tensors(self) -> list[BoundTensor]:
        return [b.bound(self.rows, self.first) for b in self.cache.buffers]

    def mask_with(self, new_columns: int) -> IntArray:
        """Prefix masks as wide as the range's longest row plus the new entries."""
        lengths = self.cache.lengths[self.first : self.first + self.rows]
        return _prefix_mask(lengths, new_columns, None)

    def advance(self, present: Sequence[CacheTensor | BoundTensor], mask: IntArray) -> None:
        self.cache.lengths[self.first : self.first + self.rows] = mask.sum(axis=1)


def _prefix_mask(lengths: IntArray, new_columns: int, real: Sequence[int] | None) -> IntArray:
    """Each row a prefix of ones: its length plus its real new entries (default: all of them),
    as wide as the longest row plus the new columns."""
    ends = lengths + (new_columns if real is None else np.asarray(real))
    width = (int(lengths.max()) if len(lengths) else 0) + new_columns
    mask: IntArray = (np.arange(width) < ends[:, None]).astype(np.int64)
    return mask


@dataclasses.dataclass(frozen=True, slots=True)
class ScratchPair:
    """A forward of one position of one row, computed as two rows: the row and a scratch row
    in the slot beside it (SlotKvCache.beside), whose outputs are dropped."""

    input_ids: IntArray
    attention_mask: IntArray
    position_ids: IntArray
    tensors: list[BoundTensor]
    last: IntArray | None
    row: int
    """The real row's index among the two."""


def scratch_pair(
    cache: SlotKvCache | SlotPrefill,
    input_ids: IntArray,
    attention_mask: IntArray,
    position_ids: IntArray,
    last: IntArray | None = None,
) -> ScratchPair:
    """The two-row forward that computes the one position of the one row of `cache` (live row
    0, or a prompt prefilled in its slot) as it is computed beside any other row: some CPUs
    compute a one-row product with another kernel than a batched one. The scratch row feeds
    token 0 at the position right after the entries its slot keeps."""
    slots, first = (cache, 0) if isinstance(cache, SlotKvCache) else (cache.cache, cache.first)
    other, length = slots.beside(first)
    row = 0 if other > first else 1
    width = max(attention_mask.shape[1], length + 1)
    mask: IntArray = np.zeros((2, width), dtype=np.int64)
    mask[row, : attention_mask.shape[1]] = attention_mask[0]
    mask[1 - row, : length + 1] = 1
    ids: IntArray = np.zeros((2, 1), dtype=np.int64)
    ids[row] = input_ids[0]
    positions: IntArray = np.full((2, 1), length, dtype=np.int64)
    positions[row] = position_ids[0]
    pair_last = None
    if last is not None:
        pair_last = np.zeros(2, dtype=np.int64)
        pair_last[row] = last[0]
    return ScratchPair(ids, mask, positions, slots.pair(min(first, other)), pair_last, row)
