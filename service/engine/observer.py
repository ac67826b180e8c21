"""What the engine tells the outside world about its work, as plain records.

The engine calls an EngineObserver from its decode thread; exporters (metrics, logs) implement
it elsewhere and must return quickly.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Protocol, TypeVar

import structlog

from tokenwire.server.domain import FinishReason

log = structlog.get_logger("tokenwire.engine")
Record = TypeVar("Record")


@dataclasses.dataclass(frozen=True, slots=True)
class RequestRecord:
    """Timestamps (time.monotonic seconds) and counts of one finished request."""

    request_id: str
    prompt_tokens: int
    """Context positions prefilled: the prompt, and a continued stream's delivered tokens."""
    completion_tokens: int
    arrived_at: float
    scheduled_at: float | None
    first_token_at: float | None
    finished_at: float
    token_times: tuple[float, ...]
    finish_reason: FinishReason | None
    """None when the request failed inside the engine."""

    @property
    def outcome(self) -> str:
        """finish_reason's value, or "error"."""
        return "error" if self.finish_reason is None else self.finish_reason.value

    @property
    def queue_time(self) -> float | None:
        """Arrival to the first prefill forward; None for a request that ended before one."""
        return None if self.scheduled_at is None else self.scheduled_at - self.arrived_at

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived_at

    @property
    def inter_token_latencies(self) -> list[float]:
        times = self.token_times
        return [b - a for a, b in itertools.pairwise(times)]


@dataclasses.dataclass(frozen=True, slots=True)
class StepRecord:
    """One scheduler iteration: how many rows decoded and prompt tokens prefilled."""

    batch_size: int
    prefill_tokens: int
    duration: float
    running: int
    waiting: int
    kv_usage: float = 0.0
    """Share of the KV-cache token budget reserved by running requests (prompt + max_tokens)."""
    stepped: bool = True
    """False for a record of the engine's state alone, where no step completed (one failed, the
    loop ended, or the step only ended requests and ran no forward): its duration is no step's."""


class EngineObserver(Protocol):
    def request_finished(self, record: RequestRecord) -> None: ...

    def request_rejected(self, reason: str) -> None: ...

    def step_finished(self, record: StepRecord) -> None: ...


class NullObserver:
    """Observes nothing."""

    def request_finished(self, record: RequestRecord) -> None:
        return None

    def request_rejected(self, reason: str) -> None:
        return None

    def step_finished(self, record: StepRecord) -> None:
        return None


class GuardedObserver:
    """An observer whose failures stay its own: an exporter that raises never fails a request
    or the decode loop (it would otherwise end every request of every step); each method's
    first failure is logged."""

    def __init__(self, inner: EngineObserver) -> None:
        self._inner = inner
        self._failed: set[str] = set()

    def request_finished(self, record: RequestRecord) -> None:
        self._call("request_finished", self._inner.request_finished, record)

    def request_rejected(self, reason: str) -> None:
        self._call("request_rejected", self._inner.request_rejected, reason)

    def step_finished(self, record: StepRecord) -> None:
        self._call("step_finished", self._inner.step_finished, record)

    def _call(self, name: str, method: Callable[[Record], None], record: Record) -> None:
        try:
            method(record)
        except Exception as exc:
            if name not in self._failed:
                self._failed.add(name)
                log.exception("engine.observer_failed", method=name, error=str(exc))
