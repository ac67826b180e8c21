"""How a graph reacts to padding in front of a row, measured once at load.

Rows of different lengths share a forward by left-padding the shorter ones (masked columns).
Whether that is invisible depends on how the graph finds positions, which its inputs do not
always say:
- explicit `position_ids` (Llama family), positions from the mask's cumulative sum (BLOOM):
  padding may be added or removed in front of a running row at any step;
- positions counted from the cache width (Gemma family, Nemotron, GPT-OSS exports), ALiBi
  relative to the last column (MPT): padding present from a row's first step only shifts all of
  its positions alike (RoPE and ALiBi see differences), but changing it later moves the row;
- learned absolute positions counted from the cache width: any padding changes the output.

The probe decodes a few pseudo-random tokens three ways and compares the logits with a plain
run: padding from the first step (as cache columns and as masked input tokens), and padding
inserted after the prefill. The scheduler then never does what the graph cannot take.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import numpy as np

from service.engine.types import FloatArray

if TYPE_CHECKING:
    from service.engine.model import CausalLM

_PROMPT, _DECODE, _PAD = 6, 4, 3
# Padding changes only the accumulation order of masked (exactly zero) terms: fp32 noise is
# around 1e-7 of the logit scale, while a shifted position moves logits by far more.
FP32_TOLERANCE = 1e-5
FP16_TOLERANCE = 1e-2


class Padding(enum.Enum):
    """What the scheduler may do with the padding in front of a running row."""

    SHIFTABLE = "shiftable"
    """Padding may change at any step: one batch, rows join and leave freely."""
    FIXED = "fixed"
    """Padding chosen at a row's first step must stay: rows join batches of their own width."""
    NONE = "none"
    """Any padding changes the output: only rows of equal length share a forward."""


def probe_padding(model: CausalLM, tolerance: float = FP32_TOLERANCE) -> Padding:
    """Classify the model by decoding with and without padding (a handful of tiny forwards).

    `tolerance` is relative to the logit scale: padding may only change rounding.
    """
    ids = [int(i) for i in np.random.default_rng(0).integers(0, model.spec.vocab_size, 10)]
    reference = _decode(model, ids)

    def same(other: FloatArray) -> bool:
        scale = max(1.0, float(np.abs(reference).max()))
        return bool(np.abs(other - reference).max() <= tolerance * scale)

    padded_from_start = (
        _decode(model, ids, pad_columns=_PAD),
        _decode(model, ids, pad_tokens=_PAD),
    )
    if not all(same(run) for run in padded_from_start):
        return Padding.NONE
    return Padding.SHIFTABLE if same(_decode(model, ids, shift=_PAD)) else Padding.FIXED


def _decode(
    model: CausalLM, ids: list[int], *, pad_columns: int = 0, pad_tokens: int = 0, shift: int = 0
) -> FloatArray:
    """Prefill ids[:_PROMPT], decode the rest one by one; return every step's logits."""
    cache = model.new_cache(1, pad_columns)
    tokens = [0] * pad_tokens + ids[:_PROMPT]
    positions = [0] * pad_tokens + list(range(_PROMPT))
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
    steps = [logits]
    for position, token in enumerate(ids[_PROMPT : _PROMPT + _DECODE], start=_PROMPT):
        mask = cache.mask_with(1)
        logits, present = model.forward(
            np.asarray([[token]], dtype=np.int64),
            mask,
            np.asarray([[position]], dtype=np.int64),
            cache.tensors,
        )
        cache.advance(present, mask)
        steps.append(logits)
    return np.concatenate(steps).astype(np.float32)
