"""Where one stream's time goes, token by token, on a GenAI folder (.venv, GenAI in bench/.venv).

One row, a 32-token prompt, 128 new tokens, greedy; the systems take turns, each round in
fresh processes:

- `bare-spin` and `bare-stop`: ONNX Runtime's decode run alone, bound as the engine binds it
  (past and present one buffer per layer, written in place; the step's logits into a fixed
  host array), in a loop with no other thread; the session options are `tokenwire serve`'s
  (service/engine/model.py), with workers that keep spinning between runs (`spin`) and with
  `session.force_spinning_stop` (`stop`, the engine's default); each layer's buffer holds
  prompt + new tokens positions, and 2,048 in `bare-wide` (stop), as a slot sized by a larger
  context does;
- `engine`: the engine alone, its consumer in the same process (engine_alone.py): each run's
  time and the decode thread's time between runs (its Python, and waiting for the GIL);
- `genai`: ONNX Runtime GenAI's Generator at batch 1 (peers.py genai): its inter-token p50.

Usage: python bench/token_costs.py MODEL_DIR [--rounds 3]
Prints one JSON object: for each system, each round's medians in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
PEERS_PYTHON = BENCH / ".venv" / "bin" / "python"
PROMPT, NEW = 32, 128


def bare(model_dir: Path, spinning_stop: bool, capacity: int) -> dict[str, float]:
    """Median time of ONNX Runtime's decode run, bound in place in buffers of `capacity`
    positions, nothing else running."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 0, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if spinning_stop:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    config = json.loads((model_dir / "genai_config.json").read_text())["model"]
    vocab = config["vocab_size"]
    shape = (1, config["decoder"]["num_key_value_heads"], capacity, config["decoder"]["head_size"])
    runs: list[float] = []
    for _ in range(3):  # the first generation warms up
        binding = session.io_binding()
        buffers = []
        for past in pasts:
            buffer = np.zeros(shape, dtype=np.float32)
            buffers.append(buffer)
            present = past.name.replace("past_key_values.", "present.")
            for bind, name in ((binding.bind_input, past.name), (binding.bind_output, present)):
                bind(name, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        binding.bind_cpu_input("input_ids", np.arange(10, 10 + PROMPT, dtype=np.int64)[None])
        binding.bind_cpu_input("attention_mask", np.ones((1, PROMPT), dtype=np.int64))
        binding.bind_output("logits", "cpu")
        session.run_with_iobinding(binding)
        logits = np.empty((1, 1, vocab), dtype=np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, [1, 1, vocab], logits.ctypes.data)
        times = []
        for step in range(1, NEW):
            token = int(logits[0, -1].argmax())
            binding.bind_cpu_input("input_ids", np.array([[token]], dtype=np.int64))
            binding.bind_cpu_input("attention_mask", np.ones((1, PROMPT + step), dtype=np.int64))
            started = time.perf_counter()
            session.run_with_iobinding(binding)
            times.append(time.perf_counter() - started)
        runs = times
    return {"run_ms": float(np.median(runs)) * 1e3}


def engine(model_dir: Path) -> dict[str, float]:
    """The engine alone, one stream: median run, median time between runs, inter-token p50."""
    import onnxruntime as ort
    from engine_alone import main as engine_alone  # bench/ is the script's directory

    runs: list[float] = []
    between: list[float] = []
    last = [0.0]
    run = ort.InferenceSession.run_with_iobinding

    def timed(self: ort.InferenceSession, binding: Any, options: Any = None) -> None:
        started = time.perf_counter()
        if last[0]:
            between.append(started - last[0])
        run(self, binding, options)
        last[0] = time.perf_counter()
        runs.append(last[0] - started)

    ort.InferenceSession.run_with_iobinding = timed
    summary = asyncio.run(engine_alone(model_dir, 1, PROMPT, NEW))
    kept = 3 * (NEW - 1)  # the three measured generations, not the warm-up
    return {
        "run_ms": float(np.median(runs[-kept:])) * 1e3,
        "between_runs_ms": float(np.median(between[-kept:])) * 1e3,
        "itl_p50_ms": float(summary["itl_p50_ms"]),
    }


def genai(model_dir: Path) -> dict[str, float]:
    out = subprocess.run(
        [str(PEERS_PYTHON), str(BENCH / "peers.py"), "genai", str(model_dir), "--batch", "1"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {"itl_p50_ms": float(json.loads(out)["itl_p50_ms"])}


def one(system: str, model_dir: Path) -> dict[str, float]:
    """A system measured in a process of its own."""
    if system == "genai":
        return genai(model_dir)
    out = subprocess.run(
        [sys.executable, __file__, str(model_dir), "--one", system],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


SYSTEMS = ("bare-spin", "bare-stop", "bare-wide", "engine", "genai")
WIDE = 2048


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", choices=SYSTEMS[:4], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        if a.one == "engine":
            measured = engine(a.model_dir)
        else:
            wide = a.one == "bare-wide"
            measured = bare(a.model_dir, a.one != "bare-spin", WIDE if wide else PROMPT + NEW)
        print(json.dumps(measured))
        return
    rounds: dict[str, list[dict[str, float]]] = {s: [] for s in SYSTEMS}
    for _ in range(a.rounds):
        for system in SYSTEMS:
            rounds[system].append(one(system, a.model_dir))
            print(system, rounds[system][-1], file=sys.stderr)
    print(json.dumps({"model_dir": str(a.model_dir), "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
