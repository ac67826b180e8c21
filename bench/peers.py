"""Peer measurements, run inside bench/.venv: the plain ORT decode loop and ORT GenAI.

Usage: python bench/peers.py raw|genai MODEL_DIR --batch N [--prompt-tokens 32 --new-tokens 128]
Prints one JSON object: tokens/s, per-stream tokens/s, TTFT and inter-token latencies.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def nearest_rank(values: np.ndarray, q: float) -> float:
    """The percentile rule of tokenwire.common.stats (this venv has no tokenwire): nearest rank,
    which numpy calls inverted_cdf; tests/test_stats.py checks that the two agree."""
    return float(np.percentile(values, q, method="inverted_cdf"))


def prompt_ids(batch: int, length: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(10, vocab - 10, size=(batch, length), dtype=np.int64)


def summarise(
    batch: int, new: int, ttft: float, gaps: list[float], *, total: float, cpu: float
) -> dict[str, float]:
    gaps_ms = np.asarray(gaps) * 1000
    return {
        "cpu_ms_per_token": cpu * 1000 / (batch * new),
        "tokens_per_s": batch * new / total,
        "per_stream_tokens_per_s": new / total,
        "ttft_p50_ms": ttft * 1000,
        "ttft_p99_ms": ttft * 1000,
        "itl_p50_ms": nearest_rank(gaps_ms, 50),
        "itl_p99_ms": nearest_rank(gaps_ms, 99),
    }


def timed(generate: Any, batch: int, new: int, repeats: int = 1) -> dict[str, float]:
    """Warm up once, then keep the median of `repeats` timed runs (by total time)."""
    generate()
    runs = []
    for _ in range(repeats):
        cpu0 = time.process_time()
        ttft, gaps, total = generate()
        runs.append((total, ttft, gaps, time.process_time() - cpu0))
    total, ttft, gaps, cpu = sorted(runs, key=lambda r: r[0])[repeats // 2]
    return summarise(batch, new, ttft, gaps, total=total, cpu=cpu)


def run_raw(model_dir: Path, batch: int, prompt: int, new: int) -> dict[str, float]:
    """The loop every Optimum-export user writes: prefill, then one session.run per token."""
    import onnxruntime as ort

    layers, kvh, head_dim, vocab = shape_of(model_dir)
    # The same session options tokenwire uses by default (service/engine/model.py).
    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    outputs = ["logits"] + [n.replace("past_key_values", "present") for n in names]
    ids = prompt_ids(batch, prompt, vocab)
    has_positions = "position_ids" in {i.name for i in session.get_inputs()}

    def step(
        tokens: np.ndarray, past: list[np.ndarray], total: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {
            "input_ids": tokens,
            "attention_mask": np.ones((batch, total), dtype=np.int64),
        }
        if has_positions:
            feed["position_ids"] = np.tile(
                np.arange(total - tokens.shape[1], total, dtype=np.int64), (batch, 1)
            )
        feed.update(zip(names, past, strict=True))
        out = session.run(outputs, feed)
        return out[0][:, -1, :], out[1:]

    empty = [np.zeros((batch, kvh, 0, head_dim), dtype=np.float32) for _ in names]

    def generate() -> tuple[float, list[float], float]:
        started = time.perf_counter()
        logits, past = step(ids, empty, prompt)
        token = logits.argmax(-1)[:, None]
        ttft = time.perf_counter() - started
        last, gaps = time.perf_counter(), []
        for i in range(1, new):
            logits, past = step(token, past, prompt + i)
            token = logits.argmax(-1)[:, None]
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        return ttft, gaps, time.perf_counter() - started

    return timed(generate, batch, new)


def shape_of(model_dir: Path) -> tuple[int, int, int, int]:
    """Layers, KV heads, head dim and vocabulary of an Optimum or a GenAI model folder."""
    if (model_dir / "config.json").exists():
        config = json.loads((model_dir / "config.json").read_text())
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return (
            config["num_hidden_layers"],
            config["num_key_value_heads"],
            head_dim,
            config["vocab_size"],
        )
    model = json.loads((model_dir / "genai_config.json").read_text())["model"]
    decoder = model["decoder"]
    return (
        decoder["num_hidden_layers"],
        decoder["num_key_value_heads"],
        decoder["head_size"],
        model["vocab_size"],
    )


def run_genai(model_dir: Path, batch: int, prompt: int, new: int) -> dict[str, float]:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    config = json.loads((model_dir / "genai_config.json").read_text())
    vocab = config["model"]["vocab_size"]
    ids = prompt_ids(batch, prompt, vocab)

    def generate() -> tuple[float, list[float], float]:
        ttft, gaps, total, _ = genai_loop(og, model, ids, prompt + new)
        return ttft, gaps, total

    return timed(generate, batch, new)


def genai_loop(
    og: Any, model: Any, ids: np.ndarray, length: int
) -> tuple[float, list[float], float, Any]:
    """One greedy GenAI generation of the rows of ids up to `length` tokens (EOS ignored):
    TTFT, the inter-token gaps, the wall time, and the generator (for its sequences)."""
    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=length, min_length=length, do_sample=False, batch_size=len(ids)
    )
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(ids)
    generator.generate_next_token()
    ttft = time.perf_counter() - started
    last, gaps = time.perf_counter(), []
    while not generator.is_done():
        generator.generate_next_token()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return ttft, gaps, time.perf_counter() - started, generator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["raw", "genai"])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    run = run_raw if args.mode == "raw" else run_genai
    print(json.dumps(run(args.model_dir, args.batch, args.prompt_tokens, args.new_tokens)))


if __name__ == "__main__":
    main()
