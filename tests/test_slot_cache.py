"""The preallocated in-place KV cache: rows join and leave by copying one row, never more.

Every behaviour holds for both buffer kinds: numpy arrays (CPU provider) and OrtValues on the
model's device, copied through ONNX Runtime (CUDA; here run on the CPU provider).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pytest

from tokenwire.server.engine.kv_cache import BatchKvCache
from tokenwire.server.engine.slot_buffer import ByteCopier, DeviceSlotBuffer, HostSlotBuffer
from tokenwire.server.engine.slot_cache import (
    BufferFactory,
    ScratchPair,
    SlotKvCache,
    SlotPrefill,
    SlotRange,
    scratch_pair,
)

SHAPES = [(0, 1, 0, 2), (0, 1, 0, 2)]
AXES = (2, 2)


def _prefilled(lengths: list[int], fill: float) -> BatchKvCache:
    """Left-aligned rows whose entries are fill + row number, masked by their lengths."""
    width = max(lengths)
    cache = BatchKvCache.zeros(SHAPES, AXES, np.float32, len(lengths), 0, left_aligned=True)
    cache.tensors = [
        np.stack(
            [np.full((1, width, 2), fill + row, dtype=np.float32) for row in range(len(lengths))]
        )
        for _ in SHAPES
    ]
    cache.mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    return cache


def _row(cache: SlotKvCache, slot: int) -> float:
    return float(cache.buffers[0].to_host()[slot, 0, 0, 0])


NewCache = Callable[..., SlotKvCache]
BUFFERS: dict[str, Callable[[], BufferFactory]] = {
    "host": lambda: HostSlotBuffer,
    "device": lambda: functools.partial(
        DeviceSlotBuffer, device="cpu", copier=ByteCopier(["CPUExecutionProvider"])
    ),
}


@pytest.fixture(params=sorted(BUFFERS))
def new_cache(request: pytest.FixtureRequest) -> NewCache:
    """SlotKvCache with one buffer kind; tests take it instead of the class."""
    factory = BUFFERS[request.param]()
    return functools.partial(SlotKvCache, buffer=factory)


def test_joining_rows_land_in_the_next_free_slots(new_cache: NewCache) -> None:
    """Two prefilled rows join behind one already there, with their lengths."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=4, capacity=8)
    cache.extend(_prefilled([3], 10.0))
    cache.extend(_prefilled([2, 5], 20.0))
    assert cache.rows == 3
    assert [_row(cache, i) for i in range(3)] == [10.0, 20.0, 21.0]
    assert cache.lengths[:3].tolist() == [3, 2, 5]
    assert cache.columns == 5


def test_a_leaving_row_is_replaced_by_the_last_row_only(new_cache: NewCache) -> None:
    """Dropping row 0 of 4 moves row 3 into slot 0; rows 1 and 2 stay where they were."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=4, capacity=8)
    cache.extend(_prefilled([1, 2, 3, 4], 0.0))
    order = cache.keep([1, 2, 3])
    assert order == [3, 1, 2]
    assert [_row(cache, i) for i in range(3)] == [3.0, 1.0, 2.0]
    assert cache.lengths[:3].tolist() == [4, 2, 3]


def test_freed_slots_are_reused(new_cache: NewCache) -> None:
    """After rows leave, new rows fill the freed slots and old entries are not visible."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=2, capacity=8)
    cache.extend(_prefilled([4, 4], 0.0))
    cache.keep([])
    cache.extend(_prefilled([2, 3], 50.0))
    assert (cache.rows, [_row(cache, i) for i in range(2)]) == (2, [50.0, 51.0])
    assert cache.mask_with(1).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_the_mask_is_each_rows_length_plus_the_new_entries(new_cache: NewCache) -> None:
    """A decode step's mask is a prefix of ones per row, as wide as the longest row + 1."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=3, capacity=8)
    cache.extend(_prefilled([1, 3], 0.0))
    mask = cache.mask_with(1)
    cache.advance(cache.tensors, mask)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert cache.lengths[:2].tolist() == [2, 4]


def test_rows_beyond_the_budget_are_refused(new_cache: NewCache) -> None:
    """More rows than slots (or a row longer than a slot) is an error, never an overwrite."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=1, capacity=4)
    cache.extend(_prefilled([2], 0.0))
    with pytest.raises(ValueError, match="do not fit"):
        cache.extend(_prefilled([2], 1.0))
    cache.keep([])
    with pytest.raises(ValueError, match="do not fit"):
        cache.extend(_prefilled([5], 1.0))


def _write_prefill(prefill: SlotPrefill, lengths: list[int], fill: float) -> None:
    """Stand in for the graph: row i of the prefill holds fill + i, for lengths[i] entries."""
    rows = _prefilled(lengths, fill)
    for buffer, tensor, axis in zip(prefill.cache.buffers, rows.tensors, AXES, strict=True):
        buffer.write_rows(prefill.first, tensor, axis)
    prefill.advance([], prefill.mask_with(max(lengths), lengths))


def test_rows_prefilled_in_free_slots_join_without_a_copy(new_cache: NewCache) -> None:
    """A prefill written in the slots above the live rows joins by moving the row count."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=4, capacity=8)
    cache.extend(_prefilled([3], 10.0))
    prefill = cache.prefill(2)
    assert prefill is not None
    assert prefill.first == 1
    _write_prefill(prefill, [2, 5], 20.0)
    cache.extend(prefill)
    assert cache.rows == 3
    assert [_row(cache, i) for i in range(3)] == [10.0, 20.0, 21.0]
    assert cache.lengths[:3].tolist() == [3, 2, 5]


def test_a_prefilled_row_that_ends_at_once_is_dropped_before_joining(new_cache: NewCache) -> None:
    """Keeping rows 0 and 2 of a prefill packs row 2 into the second slot; row 1 never joins."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=4, capacity=8)
    prefill = cache.prefill(3)
    assert prefill is not None
    _write_prefill(prefill, [1, 2, 3], 30.0)
    assert prefill.keep([0, 2]) == [0, 2]
    cache.extend(prefill)
    assert (cache.rows, [_row(cache, i) for i in range(2)]) == (2, [30.0, 32.0])
    assert cache.lengths[:2].tolist() == [1, 3]


def test_a_prefill_needs_free_slots(new_cache: NewCache) -> None:
    """With fewer free slots than rows there is no in-place prefill (None, not an overwrite)."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=2, capacity=8)
    cache.extend(_prefilled([1], 0.0))
    assert cache.prefill(2) is None
    assert cache.prefill(1) is not None


def test_two_rows_swap_through_the_first_free_slot(new_cache: NewCache) -> None:
    """Swapping rows 0 and 2 of 3 exchanges their entries and lengths; row 1 stays."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=4, capacity=8)
    cache.extend(_prefilled([1, 2, 3], 0.0))
    cache.swap(0, 2)
    assert [_row(cache, i) for i in range(3)] == [2.0, 1.0, 0.0]
    assert cache.lengths[:3].tolist() == [3, 2, 1]


def test_a_swap_needs_a_free_slot(new_cache: NewCache) -> None:
    """With every slot live a swap is refused, never done by overwriting a row."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=2, capacity=8)
    cache.extend(_prefilled([1, 2], 0.0))
    with pytest.raises(ValueError, match="free slot"):
        cache.swap(0, 1)


def test_a_range_of_live_rows_decodes_as_a_cache_of_its_own(new_cache: NewCache) -> None:
    """A SlotRange over rows 1..2 masks only their lengths and advances only them."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=4, capacity=8)
    cache.extend(_prefilled([1, 3, 2], 0.0))
    part = SlotRange(cache, 1, 2)
    mask = part.mask_with(1)
    part.advance(part.tensors, mask)
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert cache.lengths[:3].tolist() == [1, 4, 3]
    assert [t.shape[0] for t in part.tensors] == [2, 2]


def test_a_prompt_prefilled_in_chunks_holds_the_top_slot_and_moves_down_to_join(
    new_cache: NewCache,
) -> None:
    """A chunked prefill is written into the top slot, which other prefills leave alone while
    it is held; joining moves its row down behind the live rows and frees the slot."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=4, capacity=8)
    cache.extend(_prefilled([3], 10.0))
    chunk = cache.chunked_prefill()
    assert chunk is not None
    assert chunk.first == 3
    assert cache.prefill(3) is None
    _write_prefill(chunk, [5], 40.0)
    cache.extend(chunk)
    assert (cache.rows, cache.reserved) == (2, 0)
    assert [_row(cache, i) for i in range(2)] == [10.0, 40.0]
    assert cache.lengths[:2].tolist() == [3, 5]


def test_the_held_top_slot_is_given_up_by_release(new_cache: NewCache) -> None:
    """While the top slot is held no second chunked prefill gets it, nor a swap; release frees
    it for both."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=3, capacity=8)
    cache.extend(_prefilled([1, 2], 0.0))
    assert cache.chunked_prefill() is not None
    assert cache.chunked_prefill() is None
    assert not cache.free_slot
    cache.release()
    assert cache.free_slot
    assert cache.chunked_prefill() is not None


def _pair(cache: SlotKvCache, prefill: SlotPrefill | None = None) -> ScratchPair:
    """The scratch pair for token 7 at position 9 of the one row of `prefill`, or of the
    cache's one live row."""
    of = cache if prefill is None else prefill
    return scratch_pair(
        of,
        np.asarray([[7]], dtype=np.int64),
        of.mask_with(1),
        np.asarray([[9]], dtype=np.int64),
        np.asarray([0], dtype=np.int64),
    )


def test_a_lone_rows_scratch_row_takes_the_free_slot_above_from_its_first_entry(
    new_cache: NewCache,
) -> None:
    """One live row of 3 entries computes its next position beside a scratch row in the free
    slot above: two slots bound from the row's, the row first with its own mask, id and
    position, the scratch row token 0 at entry 0."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=4, capacity=8)
    cache.extend(_prefilled([3], 10.0))
    cache.lengths[1] = 6  # a row that left: its slot keeps nothing
    pair = _pair(cache)
    assert pair.row == 0
    assert pair.attention_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert (pair.input_ids.tolist(), pair.position_ids.tolist()) == ([[7], [0]], [[9], [0]])
    assert pair.last is not None
    assert pair.last.tolist() == [0, 0]
    assert pair.tensors == [b.bound(2, 0) for b in cache.buffers]


def test_a_scratch_row_in_the_held_slot_writes_after_the_prompt_prefilled_there(
    new_cache: NewCache,
) -> None:
    """Where the slot beside the row is held for a prompt prefilled in chunks (5 entries so
    far), the scratch row writes after them, where the next chunk writes first."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=2, capacity=8)
    cache.extend(_prefilled([3], 10.0))
    chunk = cache.chunked_prefill()
    assert chunk is not None
    _write_prefill(chunk, [5], 40.0)
    pair = _pair(cache)
    assert pair.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert pair.position_ids.tolist() == [[9], [5]]


def test_a_row_in_the_top_slot_pairs_with_the_live_row_below(new_cache: NewCache) -> None:
    """A prompt prefilled in the top slot pairs with the slot below it, a live row of 4
    entries: two slots bound from that one, the real row second, the scratch row after the
    live row's entries (its next decode writes there first)."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=3, capacity=8)
    cache.extend(_prefilled([2, 4], 10.0))
    chunk = cache.chunked_prefill()
    assert chunk is not None
    assert chunk.first == 2
    pair = _pair(cache, chunk)
    assert pair.row == 1
    assert pair.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert pair.position_ids.tolist() == [[4], [9]]
    assert pair.tensors == [b.bound(2, 1) for b in cache.buffers]


def test_a_single_slot_has_no_room_for_a_scratch_row(new_cache: NewCache) -> None:
    """A cache of one slot refuses a scratch pair (the engine runs such a cache's one row
    alone), never binding memory past its buffer."""
    cache = new_cache(SHAPES, AXES, np.float32, slots=1, capacity=8)
    cache.extend(_prefilled([3], 10.0))
    with pytest.raises(ValueError, match="second slot"):
        _pair(cache)
