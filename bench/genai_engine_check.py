"""Do GenAI's Engine and its Generator pick the same greedy ids? (bench/.venv)

Usage: python bench/genai_engine_check.py MODEL_DIR [--prompts 16 --new-tokens 128]
Runs each prompt alone through og.Generator, then all of them at once through og.Engine (as
peers.py's genai-engine mode configures it), and prints one JSON object: how many prompts got
equal ids, and the shortest prefix the two share.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from peers import engine_folder, genai_loop, prompt_ids, serve, shape_of


def compare(model_dir: Path, prompts: int, prompt: int, new: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    ids = prompt_ids(prompts, prompt, shape_of(model_dir)[3])
    model = og.Model(str(model_dir))
    alone = [
        list(genai_loop(og, model, row[None, :], prompt + new)[3].get_sequence(0))[prompt:]
        for row in ids
    ]
    with tempfile.TemporaryDirectory() as folder:
        knobs = engine_folder(model_dir, Path(folder))
        engine = og.Engine(og.Model(folder))
        served = serve(og, engine, [0.0] * prompts, [row.tolist() for row in ids], [new] * prompts)
    shared = [
        next((i for i, (a, b) in enumerate(zip(s.ids, g, strict=True)) if a != b), len(g))
        for s, g in zip(served, alone, strict=True)
    ]
    return {
        "prompts": prompts,
        "engine_equal_generator": sum(s.ids == g for s, g in zip(served, alone, strict=True)),
        "shortest_shared_prefix": min(shared),
        "knobs": knobs,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    print(json.dumps(compare(a.model_dir, a.prompts, a.prompt_tokens, a.new_tokens)))
