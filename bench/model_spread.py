"""How peaked the benchmark model's next-token distributions are (bench/.venv).

A sampler's cost depends on how many tokens carry a row's mass (top-p can stop early on a
peaked row), so the sampled rows of `make bench` mean something only on a model whose rows
are peaked as a trained model's. For a few prompts, at each of their last `--positions`
positions, this counts the tokens that carry `--top-p` of the mass at each temperature, and
the most likely token's probability.

Usage: python bench/model_spread.py [HF_DIR] [--positions 8] [--top-p 0.9]
Prints one JSON object: {temperature: {nucleus: [min, median, max], top1_median: p}}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

HF_DIR = Path(__file__).resolve().parent / ".cache" / "bench-56m" / "hf"
PROMPTS = [
    "def fibonacci(n):\n    if n < 2:",
    "import os\nimport sys\n\n\nclass",
    "The quick brown fox jumps over the lazy dog because",
    "    for line in lines:\n        if not line.strip():",
]
TEMPERATURES = (0.7, 1.0)


def spread(hf_dir: Path, positions: int, top_p: float) -> dict[str, Any]:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    rows = []
    for text in PROMPTS:
        ids = torch.tensor([tokenizer.encode(text).ids])
        with torch.no_grad():
            rows.append(model(ids).logits[0, -positions:].double().numpy())
    logits = np.concatenate(rows)
    found: dict[str, Any] = {}
    for temperature in TEMPERATURES:
        scaled = logits / temperature
        probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        ranked = -np.sort(-probs, axis=1)
        nucleus = (ranked.cumsum(axis=1) < top_p).sum(axis=1) + 1
        found[str(temperature)] = {
            "nucleus": [int(nucleus.min()), float(np.median(nucleus)), int(nucleus.max())],
            "top1_median": round(float(np.median(ranked[:, 0])), 3),
        }
    return {"rows": len(logits), "vocab": logits.shape[1], "top_p": top_p, **found}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir", type=Path, nargs="?", default=HF_DIR)
    ap.add_argument("--positions", type=int, default=8)
    ap.add_argument("--top-p", type=float, default=0.9)
    a = ap.parse_args()
    print(json.dumps(spread(a.hf_dir, a.positions, a.top_p)))
