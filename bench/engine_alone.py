"""The engine alone, no transport: N greedy streams through Engine in one process (.venv).

Usage: python bench/engine_alone.py MODEL_DIR --streams N [--prompt-tokens 32 --new-tokens 128]
       [--sampling greedy|bench|top-p|temperature] [--threads N]
       (--threads: ONNX Runtime intra-op threads; 0, the default, is `tokenwire serve`'s own
       default, this process's CPU budget)
       (bench: peers.SAMPLED's settings, as the sampled rows use; top-p: peers.TOP_P's,
       temperature and top-p as OpenAI-style clients send them; temperature: temperature 1
       alone, the OpenAI API's default; --sampled is --sampling bench)
Prints one JSON object shaped like peers.py's: tokens/s, TTFT and inter-token latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from peers import SAMPLED, TOP_P, summarise  # bench/ is the script's directory, hence on sys.path

from tokenwire.server.cpus import cpu_budget
from tokenwire.server.domain import GenerationRequest, SamplingParams, TokenEvent
from tokenwire.server.engine import Engine, EngineConfig, OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0)
SAMPLINGS = {
    "greedy": GREEDY,
    "bench": SamplingParams(
        temperature=SAMPLED["temperature"], top_k=int(SAMPLED["top_k"]), top_p=SAMPLED["top_p"]
    ),
    "top-p": SamplingParams(temperature=TOP_P["temperature"], top_p=TOP_P["top_p"]),
    "temperature": SamplingParams(temperature=1.0),
}


async def run(
    engine: Engine,
    prompts: Sequence[str | list[int]],
    new: int,
    sampling: SamplingParams = GREEDY,
) -> tuple[float, list[float], float]:
    """Every prompt (text, or token ids) as one stream at once (greedy unless `sampling`
    says otherwise): the median TTFT, every inter-token gap, the wall time."""

    async def one(i: int, prompt: str | list[int]) -> list[float]:
        text = prompt if isinstance(prompt, str) else ""
        request = GenerationRequest(
            f"r{i}-{time.monotonic_ns()}",
            text,
            prompt_ids=() if isinstance(prompt, str) else tuple(prompt),
            max_tokens=new,
            sampling=sampling,
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


async def main(
    model_dir: Path,
    streams: int,
    prompt: int,
    new: int,
    *,
    sampling: str = "greedy",
    threads: int = 0,
) -> dict[str, Any]:
    engine = Engine(
        # The thread count `tokenwire serve` computes with (ONNX Runtime's own default counts
        # the machine's cores, not this process's budget).
        OnnxCausalLM(model_dir, provider="cpu", intra_op_threads=threads or cpu_budget().cpus),
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
    params = SAMPLINGS[sampling]
    try:
        await run(engine, prompts, 16, params)
        runs = []
        for _ in range(3):
            cpu0 = time.process_time()
            ttft, gaps, total = await run(engine, prompts, new, params)
            runs.append((total, ttft, gaps, time.process_time() - cpu0))
    finally:
        engine.shutdown()
    total, ttft, gaps, cpu = sorted(runs, key=lambda r: r[0])[1]
    summary: dict[str, Any] = summarise(streams, new, ttft, gaps, total=total, cpu=cpu)
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--sampling", choices=sorted(SAMPLINGS), default="greedy")
    ap.add_argument("--sampled", action="store_true", help="the same as --sampling bench")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: CPU budget)")
    a = ap.parse_args()
    sampling = "bench" if a.sampled else a.sampling
    summary = main(
        a.model_dir, a.streams, a.prompt_tokens, a.new_tokens, sampling=sampling, threads=a.threads
    )
    print(json.dumps(asyncio.run(summary)))
