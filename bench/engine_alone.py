"""The engine alone, no transport: N greedy streams through Engine in one process (.venv).

Usage: python bench/engine_alone.py MODEL_DIR --streams N [--prompt-tokens 32 --new-tokens 128]
Prints one JSON object shaped like peers.py's: tokens/s, TTFT and inter-token latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from tokenwire.common.stats import percentile
from tokenwire.server.domain import GenerationRequest, SamplingParams, TokenEvent
from tokenwire.server.engine import Engine, EngineConfig, OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer


async def run(engine: Engine, prompts: list[str], new: int) -> tuple[float, list[float], float]:
    async def one(i: int, prompt: str) -> list[float]:
        request = GenerationRequest(
            f"r{i}-{time.monotonic_ns()}",
            prompt,
            max_tokens=new,
            sampling=SamplingParams(temperature=0.0),
            ignore_eos=True,
        )
        return [
            time.perf_counter()
            async for e in engine.submit(request).events()
            if isinstance(e, TokenEvent)
        ]

    started = time.perf_counter()
    streams = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    total = time.perf_counter() - started
    ttft = float(np.median([s[0] - started for s in streams]))
    gaps = [b - a for s in streams for a, b in itertools.pairwise(s)]
    return ttft, gaps, total


async def main(model_dir: Path, streams: int, prompt: int, new: int) -> dict[str, Any]:
    engine = Engine(
        OnnxCausalLM(model_dir, provider="cpu"),
        Tokenizer.from_dir(model_dir),
        EngineConfig(max_batch_size=max(16, streams)),
    )
    engine.start()
    vocab = engine.tokenizer.vocab_size
    rng = np.random.default_rng(0)
    prompts = [
        engine.tokenizer.decode([int(t) for t in rng.integers(10, vocab - 10, prompt)])
        for _ in range(streams)
    ]
    try:
        await run(engine, prompts, 16)
        runs = []
        for _ in range(3):
            cpu0 = time.process_time()
            ttft, gaps, total = await run(engine, prompts, new)
            runs.append((total, ttft, gaps, time.process_time() - cpu0))
    finally:
        engine.shutdown()
    total, ttft, gaps, cpu = sorted(runs, key=lambda r: r[0])[1]
    gaps_ms = [gap * 1000 for gap in gaps]
    return {
        "cpu_ms_per_token": cpu * 1000 / (streams * new),
        "tokens_per_s": streams * new / total,
        "per_stream_tokens_per_s": new / total,
        "ttft_p50_ms": ttft * 1000,
        "ttft_p99_ms": ttft * 1000,
        "itl_p50_ms": _pct(gaps_ms, 50),
        "itl_p99_ms": _pct(gaps_ms, 99),
    }


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank, as tokenwire's own summaries and bench/run.py."""
    value = percentile(values, q)
    return float("nan") if value is None else value


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(main(a.model_dir, a.streams, a.prompt_tokens, a.new_tokens))))
