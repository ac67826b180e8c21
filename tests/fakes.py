"""A scripted model for timing and text corner cases: it forces a chosen continuation.

It has the same interface as OnnxCausalLM (shape spec, empty cache, one step), so the real
engine, scheduler, server and clients run unchanged on top of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokenwire.server.engine import ModelSpec, OnnxCausalLM, Padding, RequestRecord, StepRecord
from tokenwire.server.engine.kv_cache import BatchKvCache
from tokenwire.server.engine.logits import HostLogits, Logits
from tokenwire.server.engine.padding import probe_padding
from tokenwire.server.engine.slot_buffer import PastTensors
from tokenwire.server.engine.slot_cache import SlotKvCache
from tokenwire.server.engine.types import CacheTensor, FloatArray, IntArray


class RecordingObserver:
    """Keeps every finished-request record the engine reports, by request id, and every
    step's record."""

    def __init__(self) -> None:
        self.finished: dict[str, RequestRecord] = {}
        self.rejected: list[str] = []
        self.steps: list[StepRecord] = []

    def request_finished(self, record: RequestRecord) -> None:
        self.finished[record.request_id] = record

    def request_rejected(self, reason: str) -> None:
        self.rejected.append(reason)

    def step_finished(self, record: StepRecord) -> None:
        self.steps.append(record)


class ScriptedModel:
    """After the token at position q, the most likely next token is script[q + 1] (else EOS)."""

    provider = "ScriptedProvider"
    padding = Padding.SHIFTABLE
    width_limit: int | None = None
    steps_continuations = False
    decodes_rows_alone = False
    pads_single_rows = False

    def __init__(self, spec: ModelSpec, script: dict[int, int], step_delay_s: float = 0.0) -> None:
        self.spec = spec
        self.script = script
        self.step_delay_s = step_delay_s
        self.eos = min(spec.eos_token_ids)
        self.calls = 0
        self.fail_on_calls: set[int] = set()
        self.fail_on_prompt_token: int | None = None
        """A prefill whose input holds this id fails, as a bad input would in ORT."""
        self.malformed_on_calls: set[int] = set()
        """Calls whose forward returns no cache tensors: the engine fails in its own code (not
        in a forward) once rows of that cache join or leave."""

    @classmethod
    def continuing(
        cls, spec: ModelSpec, prompt_tokens: int, continuation: list[int], step_delay_s: float = 0.0
    ) -> ScriptedModel:
        script = {prompt_tokens + i: token for i, token in enumerate(continuation)}
        return cls(spec, script, step_delay_s)

    def new_cache(self, rows: int, columns: int = 0, *, left_aligned: bool = False) -> BatchKvCache:
        return BatchKvCache.zeros(
            [(0, 1, 0, 1)] * 2, (2, 2), np.float32, rows, columns, left_aligned=left_aligned
        )

    def new_slot_cache(self, slots: int, capacity: int) -> SlotKvCache | None:
        return None

    def forward(
        self,
        input_ids: IntArray,
        attention_mask: IntArray,
        position_ids: IntArray,
        past: PastTensors,
        last: IntArray | None = None,
        *,
        in_place: bool = False,
        decode: bool = False,
        before_run: Callable[[], None] | None = None,
    ) -> tuple[Logits, list[FloatArray]]:
        self.calls += 1
        if before_run is not None:
            before_run()
        if self.calls in self.fail_on_calls:
            raise RuntimeError(f"injected failure on call {self.calls}")
        if input_ids.shape[1] > 1 and self.fail_on_prompt_token in input_ids:
            raise RuntimeError("injected prefill failure")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        rows, new = input_ids.shape
        logits = np.zeros((rows, self.spec.vocab_size), dtype=np.float32)
        for row in range(rows):
            nxt = int(position_ids[row, -1]) + 1
            logits[row, self.script.get(nxt, self.eos)] = 30.0
        grown = np.zeros((rows, 1, new, 1), dtype=np.float32)
        if self.calls in self.malformed_on_calls:
            return HostLogits(logits), []
        return HostLogits(logits), [np.concatenate([p, grown], axis=2) for p in past]


class CountedPositionsModel:
    """A real ONNX model whose positions come from the cache width, not from position_ids.

    That is how Gemma-family exports (no position_ids input) behave. With `absolute_bias`, each
    absolute position also shifts the logits, like learned positions counted from the width:
    then any padding changes the output.
    """

    def __init__(self, inner: OnnxCausalLM, absolute_bias: float = 0.0) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.provider = inner.provider
        table = np.random.default_rng(0).standard_normal((inner.spec.context_length + 8, 1))
        self._bias = (absolute_bias * table).astype(np.float32)
        self.padding = probe_padding(self)
        self.width_limit = None
        self.steps_continuations = False
        self.decodes_rows_alone = False
        self.pads_single_rows = False

    def new_cache(self, rows: int, columns: int = 0, *, left_aligned: bool = False) -> BatchKvCache:
        return self.inner.new_cache(rows, columns, left_aligned=left_aligned)

    def new_slot_cache(self, slots: int, capacity: int) -> SlotKvCache | None:
        return None

    def forward(
        self,
        input_ids: IntArray,
        attention_mask: IntArray,
        position_ids: IntArray,
        past: PastTensors,
        last: IntArray | None = None,
        *,
        in_place: bool = False,
        decode: bool = False,
        before_run: Callable[[], None] | None = None,
    ) -> tuple[Logits, list[FloatArray]]:
        width = attention_mask.shape[1]
        counted = np.arange(width - input_ids.shape[1], width, dtype=np.int64)
        positions = np.broadcast_to(counted, input_ids.shape)
        logits, present = self.inner.forward(
            input_ids, attention_mask, positions, past, last, before_run=before_run
        )
        return HostLogits(logits.host() + self._bias[width - 1]), present


class CountingModel(OnnxCausalLM):
    """A real model that records the forwards it serves and the slot caches it makes."""

    def __init__(self, model_dir: Path, **options: Any) -> None:
        self.prefills: list[tuple[int, int]] = []
        """(rows, mask width) of each prefill forward, in order."""
        self.decodes: list[tuple[int, int]] = []
        """(rows, mask width) of each decode forward, in order."""
        self.in_place: list[bool] = []
        """Whether each forward wrote its cache in place."""
        self.slot_caches: list[tuple[int, int]] = []
        """(slots, capacity) of each preallocated cache made."""
        self.made: list[SlotKvCache] = []
        """Each preallocated cache made, to look into after the engine has used it."""
        self.positions: list[int] = []
        """How many positions (rows times new tokens) each forward computes, in order."""
        self.fail_on: set[int] = set()
        """Forwards (counted from 1 since the last `forget`) that raise instead of running."""
        super().__init__(model_dir, **options)
        self.forget()  # the load's probes are not served forwards

    def forget(self) -> None:
        records = (self.prefills, self.decodes, self.positions, self.in_place, self.slot_caches)
        for record in (*records, self.made):
            record.clear()

    def new_slot_cache(self, slots: int, capacity: int) -> SlotKvCache | None:
        self.slot_caches.append((slots, capacity))
        cache = super().new_slot_cache(slots, capacity)
        if cache is not None:
            self.made.append(cache)
        return cache

    def forward(
        self, input_ids: IntArray, attention_mask: IntArray, *args: Any, **kwargs: Any
    ) -> tuple[Logits, Sequence[CacheTensor]]:
        rows, width = attention_mask.shape
        (self.decodes if kwargs.get("decode") else self.prefills).append((rows, width))
        self.in_place.append(bool(kwargs.get("in_place")))
        self.positions.append(int(input_ids.size))
        if len(self.prefills) + len(self.decodes) in self.fail_on:
            raise RuntimeError("a forward that fails")
        return super().forward(input_ids, attention_mask, *args, **kwargs)
