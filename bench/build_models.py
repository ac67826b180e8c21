"""Build (and cache) the benchmark model in both forms, inside bench/.venv.

The model is trained briefly (TRAINING: 80 steps on CPython's sources, about two minutes on
2 cores): its next-token distributions are then peaked as a trained model's are (at temperature
0.7 the tokens that carry 90 % of the mass number a few dozen, where a random-initialised
model's spread over most of the 32,000). Greedy speed does not depend on the weights; sampled
speed does, for every sampler that takes a shortcut when few tokens carry the mass.

The tokenizer is trained on the whole standard library (corpus_bytes 12 MB; 4 MB gave only
20,489 BPE tokens), so it names every one of the model's 32,000 ids: tokenwire samples over
the ids its tokenizer knows, GenAI over every column of the logits, and the two must be the
same width for the sampled rows to compare like with like. build() checks it.

bench/.cache/bench-56m/onnx   Optimum layout, served by tokenwire and the raw loop
bench/.cache/bench-56m/hf     the same weights as a Hugging Face directory
bench/.cache/bench-56m/genai  ONNX Runtime GenAI format (its model builder, fp32, cpu)
bench/.cache/bench-56m/genai-int4  the same, int4 weights (MatMulNBits)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
TRAINING = {"steps": 80, "batch": 8, "seq": 128, "corpus_bytes": 12_000_000}
SIZES = {
    "bench-56m": [
        "--layers",
        "8",
        "--hidden",
        "512",
        "--heads",
        "8",
        "--kv-heads",
        "8",
        "--intermediate",
        "1376",
        "--vocab",
        "32000",
        "--context",
        "512",
    ],
    "bench-small": [
        "--layers",
        "4",
        "--hidden",
        "256",
        "--heads",
        "8",
        "--kv-heads",
        "4",
        "--intermediate",
        "688",
        "--vocab",
        "4096",
        "--context",
        "512",
    ],
}


def build(name: str) -> Path:
    base = CACHE / name
    onnx_dir, hf_dir, genai_dir = base / "onnx", base / "hf", base / "genai"
    int4_dir = base / "genai-int4"
    if stale(onnx_dir / "MANIFEST.json") or not covers_vocab(onnx_dir):
        shutil.rmtree(base)
    steps = [
        (
            "optimum-layout ONNX + HF weights",
            onnx_dir / "model.onnx",
            [
                sys.executable,
                str(ROOT / "models" / "build_tiny.py"),
                "--out",
                str(onnx_dir),
                *(f"--{key.replace('_', '-')}={value}" for key, value in TRAINING.items()),
                "--save-hf",
                str(hf_dir),
                "--skip-checks",
                "--name",
                name,
                *SIZES[name],
            ],
        ),
        (
            "ONNX Runtime GenAI model",
            genai_dir / "genai_config.json",
            genai_builder(hf_dir, genai_dir, "fp32", "cpu", base / "hf-cache"),
        ),
        (
            "ONNX Runtime GenAI model, int4",
            int4_dir / "genai_config.json",
            genai_builder(hf_dir, int4_dir, "int4", "cpu", base / "hf-cache"),
        ),
    ]
    with tqdm(total=len(steps), desc=f"building {name}", unit="step") as bar:
        for label, marker, command in steps:
            bar.set_postfix_str(label)
            if not marker.exists():
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            bar.update(1)
    if not covers_vocab(onnx_dir):
        raise SystemExit(
            f"{onnx_dir}: the tokenizer has {tokenizer_size(onnx_dir)} tokens, the model "
            f"{json.loads((onnx_dir / 'config.json').read_text())['vocab_size']} ids: tokenwire "
            "would sample over fewer ids than GenAI (raise TRAINING's corpus_bytes)"
        )
    for folder in (genai_dir, int4_dir):
        tune_genai(folder)
    return base


def tokenizer_size(onnx_dir: Path) -> int:
    """How many ids the cached tokenizer names (its vocabulary and added tokens)."""
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(str(onnx_dir / "tokenizer.json")).get_vocab_size())


def covers_vocab(onnx_dir: Path) -> bool:
    """Whether a cached model's tokenizer names every id of its vocabulary (true where nothing
    is cached yet): a smaller one makes tokenwire sample over fewer ids than GenAI."""
    config = onnx_dir / "config.json"
    if not config.exists() or not (onnx_dir / "tokenizer.json").exists():
        return True
    return tokenizer_size(onnx_dir) == int(json.loads(config.read_text())["vocab_size"])


def stale(manifest: Path) -> bool:
    """Whether a cached model was built with other training settings than TRAINING (its
    MANIFEST.json records them); every form of it is then rebuilt."""
    if not manifest.exists():
        return False
    built = json.loads(manifest.read_text())["hyperparameters"]
    return any(built.get(key) != value for key, value in TRAINING.items())


def genai_builder(hf_dir: Path, out: Path, precision: str, provider: str, cache: Path) -> list[str]:
    """The command line of ONNX Runtime GenAI's model builder for one folder."""
    return [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        *("-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", provider, "-c", str(cache)),
    ]


def tune_genai(genai_dir: Path) -> dict[str, int]:
    """Run GenAI at its best here: its builder leaves intra-op threads unset, which on this
    machine halves its speed. It gets the count every system in the benchmark computes with,
    tokenwire's CPU budget (one thread per physical core this process may use); a cached
    folder with another count has that one field rewritten, nothing rebuilt. (The benchmark's
    peers also set it when they make the session, whatever the file says.)"""
    path = genai_dir / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    threads = tokenwire_threads()
    if options.get("intra_op_num_threads") != threads:
        options["intra_op_num_threads"] = threads
        path.write_text(json.dumps(config, indent=4) + "\n")
    return {"intra_op_num_threads": threads}


def tokenwire_threads() -> int:
    """`tokenwire serve`'s default intra-op threads (service/cpus.py cpu_budget), read from its
    source file: this environment has no tokenwire installed, and the module needs only the
    standard library."""
    spec = importlib.util.spec_from_file_location("tokenwire_cpus", ROOT / "service" / "cpus.py")
    if spec is None or spec.loader is None:
        raise SystemExit("service/cpus.py not found")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return int(module.cpu_budget().cpus)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("name", choices=sorted(SIZES))
    print(build(ap.parse_args().name))
