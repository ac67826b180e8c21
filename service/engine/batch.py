"""Cohorts: the rows that decode together in one forward, and where a new row may join.

With a SHIFTABLE graph (and a RIGHT one, whose rows start at column 0) there is one cohort:
joining rows are padded to the common width
(or pad the others), and leaving rows take the all-padding columns with them. With a FIXED
graph a row's padding is chosen at its first step and never changes, so a prefill is padded to
the width of the cohort it will join, a row whose prompt is wider than every cohort starts a
cohort of its own, and cohorts never trim. With NONE only rows of equal length share a cohort,
and with ALONE every row is a cohort of its own.
Each cohort costs one forward per step; all of them decode in the same scheduler step.
"""

from __future__ import annotations

import dataclasses

from tokenwire.server.engine.kv_cache import BatchKvCache
from tokenwire.server.engine.padding import Padding
from tokenwire.server.engine.sequence import Sequence
from tokenwire.server.engine.slot_cache import SlotKvCache, SlotPrefill

_ONE_COHORT = (Padding.SHIFTABLE, Padding.RIGHT)


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
        self, padding: Padding, context_length: int, slots: SlotKvCache | None = None
    ) -> None:
        self.padding = padding
        self._context = context_length
        self._slots = slots if padding is Padding.RIGHT else None

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

    def prefill_width(self, cohorts: list[Cohort], size: int, group: list[Sequence]) -> int:
        """Cache width a fresh group's prefill should end at (>= size; extra is padding)."""
        if self.padding is not Padding.FIXED:
            return size
        # Positions may grow with the cache width: the row's last token must stay in context.
        room = self._context - max(s.budget for s in group)
        fitting = [c.cache.columns for c in cohorts if size <= c.cache.columns <= room]
        return min(fitting, default=size)

    def slot_prefill(self, group: list[Sequence], size: int) -> SlotPrefill | None:
        """Free slots to prefill `group` in, when its whole prompts fit this forward."""
        if self._slots is None or any(len(s.context_ids) > size for s in group):
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
