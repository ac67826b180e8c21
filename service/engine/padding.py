"""How a graph reacts to padding in front of a row, measured once at load.

Rows of different lengths share a forward by left-padding the shorter ones (masked columns).
Whether that is invisible depends on how the graph finds positions, which its inputs do not
always say:
- explicit `position_ids` (Llama family), positions from the mask's cumulative sum (BLOOM):
  padding may be added or removed in front of a running row at any step;
- positions counted from the cache width (Gemma family, Nemotron, GPT-OSS exports), ALiBi
  relative to the last column (MPT): padding present from a row's first step only shifts all of
  its positions alike (RoPE and ALiBi see differences), but changing it later moves the row;
- learned absolute positions counted from the cache width: any padding changes the output;
- GroupQueryAttention (ONNX Runtime GenAI's builder): each row's length is the sum of its mask
  and its entries start at column 0, so rows are padded on the right instead.

The probe first decodes two rows of equal length together, compared with each alone (a graph
that mixes rows decodes every row alone); then two rows of different lengths padded on the
right, GroupQueryAttention style; then a few pseudo-random tokens three ways, compared with a
plain run: padding from the first step (as cache columns and as masked input tokens), and
padding inserted after the prefill. The scheduler then never does what the graph cannot take.
What it does take is not always exact: the runs a class allows (rows batched, padded on the
right, padded from the first step, shifted) are judged within a tolerance, but their distance
from the plain run is kept, and the largest is the model's batch rounding. Masked columns in
front of a row change the order its attention sums in, so every left-padded fixture rounds a
padded row 1e-7 to 2e-6 of the logit scale away from the same row alone: small for greedy
tokens, enough to flip a seeded draw that falls near a boundary between two tokens, so the
server reports it (model.batch_rounding).

Rows padded on the right see the batch's mask width, and a graph may read it: GenAI's builder
picks LongRoPE's rotary tables (Phi-3 128k, Phi-3.5) by the mask's width, short factors up to
`original_max_position_embeddings` and long ones beyond, so a short row beside a long one, or a
prompt prefilled in chunks, would be rotated unlike the same row alone. `probe_width_limit`
finds the widest mask a row does not notice: rows past it decode alone (batch.py), or, without
a preallocated cache, the context is capped there (model.py).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tokenwire.server.engine.logits import Logits, RowsOf
from tokenwire.server.engine.slot_buffer import PastTensors
from tokenwire.server.engine.slot_cache import SlotKvCache, SlotPrefill, scratch_pair
from tokenwire.server.engine.types import CacheTensor, FloatArray, IntArray

if TYPE_CHECKING:
    from tokenwire.server.engine.model import CausalLM

_PROMPT, _SHORT, _DECODE, _PAD = 6, 3, 4, 3
# Padding changes only the accumulation order of masked (exactly zero) terms: fp32 noise is
# around 1e-7 of the logit scale, while a shifted position moves logits by far more.
FP32_TOLERANCE = 1e-5
FP16_TOLERANCE = 1e-2
# Rows that change each other move by more than kernels picked per batch size do: activation
# scales over the whole batch (dynamic int8) moved the fixtures' logits by 1e-2 to 1.3e-1 of
# their scale; a one-row kernel that rounds otherwise (MatMulNBits on some CPUs) by about 1e-6.
MIXING_TOLERANCE = 2e-3


class Padding(enum.Enum):
    """What the scheduler may do with the padding in front of a running row."""

    SHIFTABLE = "shiftable"
    """Padding may change at any step: one batch, rows join and leave freely."""
    FIXED = "fixed"
    """Padding chosen at a row's first step must stay: rows join batches of their own width."""
    NONE = "none"
    """Any padding changes the output: only rows of equal length share a forward."""
    RIGHT = "right"
    """Rows start at column 0 and the mask's sum is each row's length (GroupQueryAttention):
    one batch, rows join and leave freely, padded on the right."""
    ALONE = "alone"
    """Rows change each other (activation scales over the whole batch, as dynamically quantised
    int8 graphs compute them): every row decodes in a forward of its own."""


def probe_padding(model: CausalLM, tolerance: float = FP32_TOLERANCE) -> Padding:
    """Classify the model by decoding with and without padding (a handful of tiny forwards).

    `tolerance` is relative to the logit scale: padding may only change rounding.
    """
    return probe(model, tolerance)[0]


def probe(model: CausalLM, tolerance: float = FP32_TOLERANCE) -> tuple[Padding, float]:
    """The padding class (see probe_padding), and how far a row served beside others lands
    from the same row served alone, relative to the logit scale (the batch rounding): the
    largest distance of the runs the class lets the scheduler make of a row. 0 where a row's
    logits never depend on the batch; above 0 where ONNX Runtime takes another kernel for a
    one-row product than for several (MatMulNBits does on some CPUs), or where masked padding
    columns in front of a row change the order in which its attention sums (left-padded rows,
    on every CPU measured), each of which rounds alike only to within that much."""
    ids = [int(i) for i in np.random.default_rng(0).integers(0, model.spec.vocab_size, 10)]
    reference = _decode(model, ids)
    other = [int(i) for i in np.random.default_rng(2).integers(0, model.spec.vocab_size, 10)]
    together = _decode_rows(model, [ids, other])
    mixing = max(tolerance, MIXING_TOLERANCE)
    pairs = ((together[:, 0], reference), (together[:, 1], _decode(model, other)))
    rounding = max(_distance(got, alone) for got, alone in pairs)
    if rounding > mixing:
        return Padding.ALONE, rounding
    short = _decode(model, ids, prompt=_SHORT)
    right = list(zip(_decode_right_aligned(model, ids), (reference, short), strict=True))
    if all(_close(got, alone, tolerance) for got, alone in right):
        return Padding.RIGHT, max(rounding, *(_distance(got, alone) for got, alone in right))
    # Padding from the first step, as cache columns and as masked input tokens; then padding
    # inserted after the prefill. Each a class allows is a run the scheduler makes: its
    # distance from the plain run is batch rounding too.
    from_start = max(
        _distance(_decode(model, ids, pad_columns=_PAD), reference),
        _distance(_decode(model, ids, pad_tokens=_PAD), reference),
    )
    if from_start > tolerance:
        return Padding.NONE, rounding
    shifted = _distance(_decode(model, ids, shift=_PAD), reference)
    if shifted > tolerance:
        return Padding.FIXED, max(rounding, from_start)
    return Padding.SHIFTABLE, max(rounding, from_start, shifted)


def beside_scratch(
    model: CausalLM,
    cache: SlotKvCache | SlotPrefill,
    input_ids: IntArray,
    attention_mask: IntArray,
    position_ids: IntArray,
    *,
    last: IntArray | None = None,
    decode: bool = False,
    before_run: Callable[[], None] | None = None,
) -> tuple[Logits, Sequence[CacheTensor]]:
    """The forward of one position of the one row of `cache`, computed beside a scratch row
    (slot_cache.scratch_pair): that row's logits, as model.forward gives them."""
    pair = scratch_pair(cache, input_ids, attention_mask, position_ids, last)
    logits, present = model.forward(
        pair.input_ids,
        pair.attention_mask,
        pair.position_ids,
        pair.tensors,
        pair.last,
        in_place=True,
        decode=decode,
        before_run=before_run,
    )
    return RowsOf(logits, [pair.row]), present


def pairs_agree(model: CausalLM) -> bool:
    """Whether a row's logits are exactly the same beside a scratch row (as a single row is
    padded: slot_cache.scratch_pair; the scratch row above it, or below it in the top slot)
    as beside one, two and eight other rows of other lengths (the row last of nine, where a
    kernel that takes rows in tiles has its remainder), the prompts prefilled together
    (padded on the right) and decoded together in place. Where they are, padding single rows
    keeps a request's tokens independent of its neighbours on a CPU that computes a one-row
    product otherwise than a batched one."""
    rows = [
        [int(i) for i in np.random.default_rng(seed).integers(0, model.spec.vocab_size, 16)]
        for seed in range(9)
    ]
    alone = _in_slots(model, rows[:1], [_PROMPT])
    if alone is None:
        return False
    others = [_SHORT, _PROMPT + 2] * 4
    runs = [
        (_in_slots(model, rows[:1], [_PROMPT], top=True), 0),
        (_in_slots(model, rows[:2], [_PROMPT, _SHORT]), 0),
        (_in_slots(model, rows[:3], [_PROMPT, *others[:2]]), 0),
        (_in_slots(model, [*rows[1:], rows[0]], [*others, _PROMPT]), 8),
    ]
    return all(run is not None and _distance(run[:, i], alone[:, 0]) == 0.0 for run, i in runs)


def _in_slots(
    model: CausalLM, rows: list[list[int]], lengths: list[int], *, top: bool = False
) -> FloatArray | None:
    """Prompts of these lengths (one per row) prefilled together in place, then _DECODE steps
    of all rows together (a single row beside a scratch row: in the slot above it, or, `top`,
    below it, the row in the top slot); the logits [step, row, vocab], or None where the model
    has no preallocated cache."""
    size = max(lengths)
    slots = model.new_slot_cache(len(rows) + 1, size + _DECODE + 1)
    if slots is None:
        return None
    prefill = SlotPrefill(slots, len(rows), slots.slots - 1 if top else None)
    mask = prefill.mask_with(size, lengths)
    logits, _ = model.forward(
        np.asarray([r[:n] + [0] * (size - n) for r, n in zip(rows, lengths, strict=True)]),
        mask,
        np.asarray([list(range(n)) + [0] * (size - n) for n in lengths]),
        prefill.tensors,
        prefill.last_positions(size, lengths),
        in_place=True,
    )
    prefill.advance([], mask)
    if not top:
        slots.extend(prefill)
    rows_in: SlotKvCache | SlotPrefill = prefill if top else slots
    steps = [logits.host()]
    for step in range(_DECODE):
        ids = np.asarray([[r[n + step]] for r, n in zip(rows, lengths, strict=True)])
        positions = np.asarray([[n + step] for n in lengths])
        mask = rows_in.mask_with(1)
        if len(rows) == 1:
            out, _ = beside_scratch(model, rows_in, ids, mask, positions, decode=True)
        else:
            out, _ = model.forward(ids, mask, positions, slots.tensors, in_place=True, decode=True)
        rows_in.advance([], mask)
        steps.append(np.array(out.host()))  # a decode step's logits land in a reused buffer
    return np.stack(steps).astype(np.float32)


def probe_width_limit(
    model: CausalLM, widths: int, tolerance: float = FP32_TOLERANCE
) -> int | None:
    """For a graph padded on the right: None if a row's logits are the same under every mask
    width up to `widths`, else the widest mask that leaves them as they are (found by
    bisection: a handful of one-row steps, the widest holding `widths` cache entries). The
    row's cache is one slot of the model's preallocated kind where it has one (no larger than
    one slot of the cache it will serve from, where the graph writes in place), else host
    arrays padded to each width."""
    ids = [int(i) for i in np.random.default_rng(1).integers(0, model.spec.vocab_size, _PROMPT)]
    length = len(ids)
    slot = model.new_slot_cache(1, widths)
    step = _in_slot(model, ids, slot) if slot is not None else _padded_on_host(model, ids)
    alone = step(length)

    def noticed(width: int) -> bool:
        return not _close(step(width), alone, tolerance)

    if widths <= length or not noticed(widths):
        return None
    same, differs = length, widths
    while differs - same > 1:
        middle = (same + differs) // 2
        if noticed(middle):
            differs = middle
        else:
            same = middle
    return same


def _step_at(
    model: CausalLM, ids: list[int], past: PastTensors, width: int, *, in_place: bool
) -> FloatArray:
    """The next token's logits after ids[:-1], the row's mask padded to `width` on the right."""
    length = len(ids)
    logits, _ = model.forward(
        np.asarray([[ids[-1]]], dtype=np.int64),
        (np.arange(width) < length).astype(np.int64)[None, :],
        np.asarray([[length - 1]], dtype=np.int64),
        past,
        in_place=in_place,
    )
    return logits.host().astype(np.float32)


def _in_slot(model: CausalLM, ids: list[int], slot: SlotKvCache) -> Callable[[int], FloatArray]:
    """Steps on ids[:-1] prefilled in place into the one slot (every step writes the same
    entry: the last token's, at the row's length)."""
    prefill = SlotPrefill(slot, 1)
    prompt = np.asarray([ids[:-1]], dtype=np.int64)
    mask = prefill.mask_with(prompt.shape[1])
    positions = np.arange(prompt.shape[1])[None, :]
    model.forward(prompt, mask, positions, prefill.tensors, in_place=True)
    prefill.advance([], mask)
    slot.extend(prefill)
    return lambda width: _step_at(model, ids, slot.tensors, width, in_place=True)


def _padded_on_host(model: CausalLM, ids: list[int]) -> Callable[[int], FloatArray]:
    """Steps on ids[:-1] prefilled into host arrays, padded with zero entries to each width."""
    cache = model.new_cache(1, left_aligned=True)
    prompt = np.asarray([ids[:-1]], dtype=np.int64)
    mask = cache.mask_with(prompt.shape[1])
    _, present = model.forward(prompt, mask, np.arange(prompt.shape[1])[None, :], cache.tensors)
    cache.advance(present, mask)
    past = cache.host_tensors()

    def step(width: int) -> FloatArray:
        wide = [
            np.concatenate([t, np.zeros_like(t, shape=_widened(t.shape, axis, width))], axis)
            for t, axis in zip(past, cache.axes, strict=True)
        ]
        return _step_at(model, ids, wide, width, in_place=False)

    return step


def _close(other: FloatArray, expected: FloatArray, within: float) -> bool:
    """Equal but for `within` of the expected logits' scale (at least 1)."""
    return _distance(other, expected) <= within


def _distance(other: FloatArray, expected: FloatArray) -> float:
    """The largest difference, relative to the expected logits' finite scale (at least 1).
    Equal entries (infinities included) and NaN in both count 0; NaN or an infinity in one
    only is an infinite distance: a graph that breaks only when padded is not close."""
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    with np.errstate(invalid="ignore"):
        diff = np.abs(other - expected)
    same = (other == expected) | (np.isnan(other) & np.isnan(expected))
    diff = np.where(same, 0.0, diff)
    if not np.isfinite(diff).all():
        return float("inf")
    return float(diff.max()) / scale


def _widened(shape: tuple[int, ...], axis: int, width: int) -> tuple[int, ...]:
    """The shape of the zero columns that pad a past tensor to width - 1 entries."""
    extra = list(shape)
    extra[axis] = width - 1 - shape[axis]
    return tuple(extra)


def _decode_right_aligned(model: CausalLM, ids: list[int]) -> tuple[FloatArray, FloatArray]:
    """Two rows, prompts of _PROMPT and _SHORT ids padded on the right, then the same decode
    tokens; return each row's logits per step."""
    cache = model.new_cache(2, left_aligned=True)
    real = [_PROMPT, _SHORT]
    tokens = [ids[:n] + [0] * (_PROMPT - n) for n in real]
    positions = [list(range(n)) + [0] * (_PROMPT - n) for n in real]
    mask = cache.mask_with(_PROMPT, real)
    logits, present = model.forward(
        np.asarray(tokens, dtype=np.int64),
        mask,
        np.asarray(positions, dtype=np.int64),
        cache.tensors,
        cache.last_positions(_PROMPT, real),
    )
    cache.advance(present, mask)
    steps = [logits.host()]
    for step, token in enumerate(ids[_PROMPT : _PROMPT + _DECODE]):
        mask = cache.mask_with(1)
        logits, present = model.forward(
            np.asarray([[token], [token]], dtype=np.int64),
            mask,
            np.asarray([[n + step] for n in real], dtype=np.int64),
            cache.tensors,
        )
        cache.advance(present, mask)
        steps.append(logits.host())
    stacked = np.stack(steps).astype(np.float32)
    return stacked[:, 0], stacked[:, 1]


def _decode_rows(model: CausalLM, rows: list[list[int]]) -> FloatArray:
    """Rows of equal length decoded together as _decode does one: logits [step, row, vocab]."""
    cache = model.new_cache(len(rows))
    tokens = np.asarray([r[:_PROMPT] for r in rows], dtype=np.int64)
    positions = np.tile(np.arange(_PROMPT, dtype=np.int64), (len(rows), 1))
    mask = cache.mask_with(_PROMPT)
    logits, present = model.forward(tokens, mask, positions, cache.tensors)
    cache.advance(present, mask)
    steps = [logits.host()]
    for position in range(_PROMPT, _PROMPT + _DECODE):
        mask = cache.mask_with(1)
        logits, present = model.forward(
            np.asarray([[r[position]] for r in rows], dtype=np.int64),
            mask,
            np.full((len(rows), 1), position, dtype=np.int64),
            cache.tensors,
        )
        cache.advance(present, mask)
        steps.append(logits.host())
    return np.stack(steps).astype(np.float32)


def _decode(
    model: CausalLM,
    ids: list[int],
    *,
    prompt: int = _PROMPT,
    pad_columns: int = 0,
    pad_tokens: int = 0,
    shift: int = 0,
) -> FloatArray:
    """Prefill ids[:prompt], then decode ids[_PROMPT:] one by one; return every step's logits."""
    cache = model.new_cache(1, pad_columns)
    tokens = [0] * pad_tokens + ids[:prompt]
    positions = [0] * pad_tokens + list(range(prompt))
    mask = cache.mask_with(len(tokens))
    mask[0, pad_columns : pad_columns + pad_tokens] = 0
    logits, present = model.forward(
        np.asarray([tokens], dtype=np.int64),
        mask,
        np.asarray([positions], dtype=np.int64),
        cache.tensors,
    )
    cache.advance(present, mask)
    if shift:
        cache.pad_left(shift)
    steps = [logits.host()]
    for position, token in enumerate(ids[_PROMPT : _PROMPT + _DECODE], start=prompt):
        mask = cache.mask_with(1)
        logits, present = model.forward(
            np.asarray([[token]], dtype=np.int64),
            mask,
            np.asarray([[position]], dtype=np.int64),
            cache.tensors,
        )
        cache.advance(present, mask)
        steps.append(logits.host())
    return np.concatenate(steps).astype(np.float32)
