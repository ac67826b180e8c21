"""Cohorts: the rows that decode together in one forward, and where a new row may join.

With a SHIFTABLE graph (and a RIGHT one, whose rows start at column 0) there is one cohort:
joining rows are padded to the common width
(or pad the others), and leaving rows take the all-padding columns with them. With a FIXED
graph a row's padding is chosen at its first step and never changes, so a prefill is padded to
the width of the cohort it will join, a row whose prompt is wider than every cohort starts a
cohort of its own, and cohorts never trim. With NONE only rows of equal length share a cohort,
and with ALONE every row is a cohort of its own; such a graph's positions in one forward change
each other as its rows do, so a prompt is fed whole, never in chunks, and the ids of a
continuation one per forward, in decode steps, as the stream it continues computed them.
Each cohort costs one forward per step; all of them decode in the same scheduler step.

A graph with a width limit (one that reads the attention mask's width, as LongRoPE's tables do)
decodes a row whose mask would be wider than the limit in a forward of its own, exactly as wide
as the row alone; the rows between such rows share forwards whose masks stay within the limit.
A prompt wider than the limit is prefilled in chunks that are all wider than it: its first chunk
goes past the limit, as the whole prompt alone would. A continuation (a stream resumed from its
ids) that takes a narrower prompt past the limit is prefilled up to the limit, then past it, as
the stream computed it.
"""

from __future__ import annotations

import dataclasses

from tokenwire.server.engine.kv_cache import BatchKvCache
from tokenwire.server.engine.padding import Padding
from tokenwire.server.engine.sequence import Sequence
from tokenwire.server.engine.slot_cache import SlotKvCache, SlotPrefill, SlotRange

_ONE_COHORT = (Padding.SHIFTABLE, Padding.RIGHT)
DecodeCache = BatchKvCache | SlotKvCache | SlotRange


@dataclasses.dataclass(eq=False, slots=True)
class Cohort:
    """Rows decoded together: one cache, one row of it per sequence, in order."""

    cache: BatchKvCache | SlotKvCache
    rows: list[Sequence]

    def drop_finished(self, *, trim: bool) -> list[Sequence]:
        """Remove finished rows from the batch; return them."""
        keep = [i for i, s in enumerate(self.rows) if not s.finished]
        if len(keep) == len(self.rows):
            return []
        gone = [s for s in self.rows if s.finished]
        order = self.cache.keep(keep, trim=trim)
        self.rows = [self.rows[i] for i in order]
        return gone


class Placement:
    """Chooses prefill widths and cohorts so that no running row's padding changes wrongly."""

    def __init__(
        self,
        padding: Padding,
        context_length: int,
        slots: SlotKvCache | None = None,
        *,
        width_limit: int | None = None,
        steps_continuations: bool = False,
        rows_alone: bool = False,
    ) -> None:
        self.padding = padding
        self._steps = steps_continuations
        self._context = context_length
        self._slots = slots if padding is Padding.RIGHT else None
        # Without the preallocated cache the model serves no context past its width limit.
        self._width = width_limit if self._slots is not None else None
        self._rows_alone = rows_alone and self._slots is not None
        """Each decode row runs alone in the preallocated cache, and prompts prefill alone."""

    @property
    def max_rows(self) -> int | None:
        """Rows the preallocated cache holds, when there is one."""
        return None if self._slots is None else self._slots.slots

    @property
    def trims(self) -> bool:
        return self.padding in _ONE_COHORT

    @property
    def left_aligned(self) -> bool:
        return self.padding is Padding.RIGHT

    def groups_mixed_lengths(self) -> bool:
        """May prompts of different lengths share one prefill forward?"""
        return self.padding not in (Padding.NONE, Padding.ALONE)

    def shares_forwards(self) -> bool:
        """May rows share a forward at all?"""
        return self.padding is not Padding.ALONE

    def feeds_in_decode(self, seq: Sequence) -> bool:
        """Does this request's continuation go in one id per forward? Where one forward's
        positions change each other (ALONE), or where a position computed in a prefill rounds
        unlike the same position computed in a decode step (steps_continuations), the ids
        go in as the stream it continues computed them: in decode steps, beside the running
        rows (which neither holds the prefill queue nor costs them a forward)."""
        stepped = self._steps or self.padding is Padding.ALONE
        return stepped and len(seq.context_ids) > len(seq.prompt_ids)

    def shares_prefill(self, seq: Sequence) -> bool:
        """May this prompt share a prefill forward with others? (Not one with a continuation
        the model takes one id per forward: see feeds_in_decode.)"""
        if seq.prefill_end < len(seq.context_ids) or self._rows_alone:
            return False
        return self._width is None or len(seq.context_ids) <= self._width

    def prefill_chunk(self, seq: Sequence, chunk: int) -> int:
        """Positions the next prefill forward of `seq` alone feeds: up to `chunk`, but a first
        chunk past the width limit where the prompt is wider than it, and no chunk across
        the limit where only a continuation takes the context past it. Where rows change
        each other (ALONE), so do the positions of one forward: the prompt goes in whole.
        A prefill ends at `seq.prefill_end` (the prompt, where the continuation's ids go in
        in decode steps)."""
        if self.padding is Padding.ALONE:
            return seq.prefill_end - seq.prefilled
        return min(self._chunk_within(seq, chunk), seq.prefill_end - seq.prefilled)

    def _chunk_within(self, seq: Sequence, chunk: int) -> int:
        left = len(seq.context_ids) - seq.prefilled
        width = self._width
        if width is not None and len(seq.context_ids) > width:
            if len(seq.prompt_ids) > width:
                if seq.prefilled == 0:
                    return min(left, max(chunk, width + 1))
            elif seq.prefilled < width:
                # A continuation that goes past the limit: its stream computed the positions
                # within the limit in forwards within it, and so does this prefill.
                return min(chunk, width - seq.prefilled)
        return min(left, chunk)

    def decode_runs(self, cohort: Cohort) -> list[tuple[list[Sequence], DecodeCache]]:
        """The forwards of a cohort's decode step: one, unless rows would see a mask wider than
        the width limit; each of those then runs alone, and the rows between them together
        (all of them in one forward where a free slot lets the wide rows move to the end).
        Where rows run alone (rows_alone), one forward per row."""
        cache = cohort.cache
        if self._rows_alone and isinstance(cache, SlotKvCache) and len(cohort.rows) > 1:
            return [([row], SlotRange(cache, i, 1)) for i, row in enumerate(cohort.rows)]
        if self._width is None or not isinstance(cache, SlotKvCache):
            return [(cohort.rows, cache)]
        wide = (cache.lengths[: cache.rows] >= self._width).tolist()
        if not any(wide):
            return [(cohort.rows, cache)]
        if cache.free_slot:
            _narrow_first(cohort, cache, wide)
        runs: list[tuple[list[Sequence], DecodeCache]] = []
        start = 0
        for row in [*(i for i, w in enumerate(wide) if w), cache.rows]:
            if start < row:
                runs.append((cohort.rows[start:row], SlotRange(cache, start, row - start)))
            if row < cache.rows:
                runs.append(([cohort.rows[row]], SlotRange(cache, row, 1)))
            start = row + 1
        return runs

    def prefill_width(self, cohorts: list[Cohort], size: int, group: list[Sequence]) -> int:
        """Cache width a fresh group's prefill should end at (>= size; extra is padding)."""
        if self.padding is not Padding.FIXED:
            return size
        # Positions may grow with the cache width: the row's last token must stay in context.
        room = self._context - max(s.budget for s in group)
        fitting = [c.cache.columns for c in cohorts if size <= c.cache.columns <= room]
        return min(fitting, default=size)

    def chunk_slot(self) -> SlotPrefill | None:
        """The slot to prefill one prompt in, chunk by chunk, where there is a preallocated
        cache: the top one, held until the row joins."""
        return None if self._slots is None else self._slots.chunked_prefill()

    def release_chunk_slot(self, prefilling: list[Sequence]) -> None:
        """Free the top slot if no prompt being prefilled holds it any more (it was cancelled,
        failed, or ended at its first token)."""
        slots = self._slots
        if slots is None or not slots.reserved:
            return
        if not any(isinstance(s.cache, SlotPrefill) for s in prefilling):
            slots.release()

    def clear(self) -> None:
        """Every row is gone (the engine failed them all): the preallocated cache is empty."""
        if self._slots is not None:
            self._slots.keep([])
            self._slots.release()

    def slot_prefill(self, group: list[Sequence], size: int) -> SlotPrefill | None:
        """Free slots to prefill `group` in, when its whole prompts fit this forward."""
        if self._slots is None or any(s.prefill_end > size for s in group):
            return None
        return self._slots.prefill(len(group))

    def join(
        self, cohorts: list[Cohort], rows: list[Sequence], cache: BatchKvCache | SlotPrefill
    ) -> None:
        """Put freshly prefilled rows into a cohort that takes them unchanged, or a new one."""
        if self._slots is not None and not cohorts:
            cohorts.append(Cohort(self._slots, []))
        if isinstance(cache, SlotPrefill):
            cache.cache.extend(cache)
            next(c for c in cohorts if c.cache is cache.cache).rows.extend(rows)
            return
        for cohort in cohorts if self.shares_forwards() else ():
            if self.padding in _ONE_COHORT or cohort.cache.columns == cache.columns:
                cohort.cache.extend(cache)
                cohort.rows.extend(rows)
                return
        cohorts.append(Cohort(cache, list(rows)))


def _narrow_first(cohort: Cohort, cache: SlotKvCache, wide: list[bool]) -> None:
    """Swap rows (cache slots, cohort order and `wide` alike, through a free slot) so that the
    rows that are not wide fill the first slots. A row swaps when it grows past the limit, or
    when a row that left gave its slot to a wide one."""
    i, j = 0, len(wide) - 1
    while True:
        while i < j and not wide[i]:
            i += 1
        while i < j and wide[j]:
            j -= 1
        if i >= j:
            return
        cache.swap(i, j)
        cohort.rows[i], cohort.rows[j] = cohort.rows[j], cohort.rows[i]
        wide[i], wide[j] = False, True
