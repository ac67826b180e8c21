"""Where 16 simultaneous requests spend their time: cProfile of the engine, no transport.

Run in the service environment: .venv/bin/python bench/profile_burst.py [--concurrency 16]
Prints the share of wall time inside ONNX Runtime (session.run) versus the engine's Python.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenwire.server.domain import GenerationRequest, SamplingParams, TokenEvent
from tokenwire.server.engine import Engine, EngineConfig, OnnxCausalLM
from tokenwire.server.engine.kv_cache import BatchKvCache
from tokenwire.server.engine.logits import Logits
from tokenwire.server.engine.slot_buffer import PastTensors
from tokenwire.server.engine.slot_cache import SlotKvCache
from tokenwire.server.engine.types import CacheTensor, IntArray
from tokenwire.server.tokenizer import Tokenizer

MODEL = Path(__file__).resolve().parent / ".cache" / "bench-56m" / "onnx"


async def burst(engine: Engine, prompt: str, concurrency: int) -> list[float]:
    sent = time.perf_counter()

    async def one(i: int) -> float:
        request = GenerationRequest(
            f"p{i}-{time.monotonic_ns()}",
            prompt,
            max_tokens=128,
            sampling=SamplingParams(temperature=0.0),
            ignore_eos=True,
        )
        first = 0.0
        async for event in engine.submit(request).events():
            if isinstance(event, TokenEvent) and not first:
                first = time.perf_counter() - sent
        return first

    return list(await asyncio.gather(*(one(i) for i in range(concurrency))))


class TimedModel:
    """Wraps the model: how long each forward takes, split into prefill and decode."""

    def __init__(self, model: OnnxCausalLM) -> None:
        self.model = model
        self.spec = model.spec
        self.provider = model.provider
        self.padding = model.padding
        self.width_limit = model.width_limit
        self.steps_continuations = model.steps_continuations
        self.decodes_rows_alone = model.decodes_rows_alone
        self.pads_single_rows = model.pads_single_rows
        self.prefill: list[float] = []
        self.decode: list[float] = []

    def new_cache(self, rows: int, columns: int = 0, *, left_aligned: bool = False) -> BatchKvCache:
        return self.model.new_cache(rows, columns, left_aligned=left_aligned)

    def new_slot_cache(self, slots: int, capacity: int) -> SlotKvCache | None:
        return self.model.new_slot_cache(slots, capacity)

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
    ) -> tuple[Logits, Sequence[CacheTensor]]:
        started = time.perf_counter()
        out = self.model.forward(
            input_ids,
            attention_mask,
            position_ids,
            past,
            last,
            in_place=in_place,
            decode=decode,
            before_run=before_run,
        )
        (self.prefill if input_ids.shape[1] > 1 else self.decode).append(
            time.perf_counter() - started
        )
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    timed = TimedModel(OnnxCausalLM(MODEL, provider="cpu"))
    tokenizer = Tokenizer.from_dir(MODEL)
    engine = Engine(timed, tokenizer, EngineConfig(max_batch_size=32))
    engine.warm_up()
    engine.start()
    prompt = tokenizer.decode(tokenizer.encode(Path(asyncio.__file__).read_text())[:32])
    for c in (1, args.concurrency):
        asyncio.run(burst(engine, prompt, c))  # warm the arena for these shapes
        timed.prefill.clear()
        timed.decode.clear()
        started = time.perf_counter()
        ttfts = sorted(asyncio.run(burst(engine, prompt, c)))
        wall = time.perf_counter() - started
        inside = sum(timed.prefill) + sum(timed.decode)
        ttft_ms = ttfts[len(ttfts) // 2] * 1000
        decode_ms = 1000 * sum(timed.decode) / max(1, len(timed.decode))
        print(
            f"{c:2d} streams: wall {wall * 1000:6.0f} ms, TTFT p50 {ttft_ms:5.0f} ms; "
            f"ONNX Runtime {inside / wall:5.1%} of wall "
            f"({len(timed.prefill)} prefill forwards, {sum(timed.prefill) * 1000:.0f} ms; "
            f"{len(timed.decode)} decode forwards, mean {decode_ms:.1f} ms)"
        )
    engine.shutdown()


if __name__ == "__main__":
    main()
