"""What drawing one step's tokens costs the host, by sampling settings (.venv).

Draws the tokens of 16 rows over a 32,000-token vocabulary (the benchmark model's) with
tokenwire's sampler (service/engine/sampling.py `sample`), from float32 logits drawn from a
normal distribution: `peaked` rows (standard deviation 4: at temperature 0.8 a few dozen
tokens carry 95 % of the mass, as in a trained model's rows), `ordered` ones (the same values,
larger ones at lower ids with noise of deviation 1, as a vocabulary numbered by frequency
places a model's likely tokens) and `flat` ones (1.5: thousands carry it, as in a
random-initialised model's). Each setting is timed over `--repeats` rounds
of 10 draws; the fastest and slowest round are printed.

Usage: python bench/sampling_costs.py [--rows 16] [--vocab 32000] [--repeats 5]
Prints one JSON object: {setting: {spread: [fastest ms, slowest ms]}}.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
from peers import SAMPLED, TOP_P  # bench/ is the script's directory

from tokenwire.server.domain import SamplingParams
from tokenwire.server.engine.sampling import Sampler, sample

SETTINGS: dict[str, dict[str, Any]] = {
    "temperature 1 (OpenAI's default)": {"temperature": 1.0},
    "temperature 0.8": {"temperature": 0.8},
    "top-p (peers.TOP_P)": dict(TOP_P),
    "min-p 0.05": {"temperature": 0.8, "min_p": 0.05},
    "top-k and top-p (peers.SAMPLED)": dict(SAMPLED),
}
SPREADS = {"peaked": 4.0, "ordered": 4.0, "flat": 1.5}


def costs(rows: int, vocab: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    rng = np.random.default_rng(0)
    found: dict[str, dict[str, list[float]]] = {}
    for spread_name, spread in SPREADS.items():
        logits = (rng.standard_normal((rows, vocab)) * spread).astype(np.float32)
        if spread_name == "ordered":
            logits = -np.sort(-logits, axis=1) + rng.standard_normal((rows, vocab)).astype(
                np.float32
            )
        for name, settings in SETTINGS.items():
            params = SamplingParams(**{**settings, "top_k": int(settings.get("top_k", 0))}, seed=3)
            samplers = [Sampler(params)] * rows
            indices = list(range(rows))
            sample(logits, samplers, indices)  # warm up
            rounds = []
            for _ in range(repeats):
                started = time.perf_counter()
                for _ in range(10):
                    sample(logits, samplers, indices)
                rounds.append((time.perf_counter() - started) / 10 * 1000)
            found.setdefault(name, {})[spread_name] = [round(min(rounds), 3), round(max(rounds), 3)]
    return found


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(json.dumps(costs(a.rows, a.vocab, a.repeats), indent=1))
