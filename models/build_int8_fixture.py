"""Build int8 copies of the llama fixture whose activations are quantised: graphs whose rows
change each other when they share a forward.

Inside the fixtures environment (onnxruntime's quantisation tools, onnx):
    models/.venv-fixtures/bin/python models/build_int8_fixture.py    (part of `make fixtures`)

Writes, from models/fixtures/llama/model.onnx, beside that fixture's config, generation config
and tokenizer files:
- models/fixtures-int8/llama-dynamic/: quantised by onnxruntime.quantization.quantize_dynamic
  (int8 weights, DynamicQuantizeLinear on activations: scales over the whole batch);
- models/fixtures-int8/llama-qdq/: quantised by quantize_static in the QDQ format (int8
  weights, uint8 activations with fixed scales calibrated on 8 seeded random prompts), where
  the rounding that padding brings to a row can cross a quantisation step.
Neither has a reference.json: their ids are not the fp32 model's, and what the tests check is
that each request decodes the same ids alone and beside others.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

MODELS = Path(__file__).resolve().parent
SOURCE = MODELS / "fixtures" / "llama"
OUT = MODELS / "fixtures-int8"
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
CALIBRATION_PROMPTS, CALIBRATION_SEED = 8, 0


class _Prompts(CalibrationDataReader):  # type: ignore[misc]
    """Seeded random prompts of 2 to 19 ids, each a prefill with an empty cache."""

    def __init__(self, model: Path) -> None:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        inputs = session.get_inputs()
        vocab = int(session.get_outputs()[0].shape[-1])
        rng = np.random.default_rng(CALIBRATION_SEED)
        self._feeds = []
        for _ in range(CALIBRATION_PROMPTS):
            length = int(rng.integers(2, 20))
            feed = {
                "input_ids": rng.integers(0, vocab, (1, length)).astype(np.int64),
                "attention_mask": np.ones((1, length), np.int64),
            }
            for arg in inputs:
                if arg.name == "position_ids":
                    feed[arg.name] = np.arange(length, dtype=np.int64)[None]
                elif arg.name.startswith("past_key_values."):
                    shape = [
                        1 if d == "batch_size" else d if isinstance(d, int) else 0
                        for d in arg.shape
                    ]
                    feed[arg.name] = np.zeros(shape, np.float32)
            self._feeds.append(feed)
        self._next = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)


def _write(name: str, quantize: Callable[[Path, Path], object]) -> None:
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    quantize(SOURCE / "model.onnx", out / "model.onnx")
    for file in FILES:
        shutil.copyfile(SOURCE / file, out / file)
    size = sum(p.stat().st_size for p in out.iterdir()) // 1024
    print(f"{out.relative_to(MODELS.parent)}: {size} KiB")


def main() -> None:
    _write(
        "llama-dynamic",
        lambda source, target: quantize_dynamic(source, target, weight_type=QuantType.QInt8),
    )
    _write(
        "llama-qdq",
        lambda source, target: quantize_static(
            source,
            target,
            _Prompts(source),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        ),
    )


if __name__ == "__main__":
    main()
