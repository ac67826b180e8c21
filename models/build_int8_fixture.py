"""Build a dynamically quantised int8 copy of the llama fixture: a graph whose rows change
each other (activation scales are computed over the whole batch).

Inside the fixtures environment (onnxruntime's quantisation tools, onnx):
    models/.venv-fixtures/bin/python models/build_int8_fixture.py    (part of `make fixtures`)

Writes models/fixtures-int8/llama-dynamic/: model.onnx quantised by
onnxruntime.quantization.quantize_dynamic (int8 weights, DynamicQuantizeLinear on activations)
from models/fixtures/llama/model.onnx, beside that fixture's config, generation config and
tokenizer files. It has no reference.json: its ids are not the fp32 model's, and what the
tests check is that each request decodes the same ids alone and beside others.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic

MODELS = Path(__file__).resolve().parent
SOURCE = MODELS / "fixtures" / "llama"
OUT = MODELS / "fixtures-int8" / "llama-dynamic"
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    quantize_dynamic(SOURCE / "model.onnx", OUT / "model.onnx", weight_type=QuantType.QInt8)
    for name in FILES:
        shutil.copyfile(SOURCE / name, OUT / name)
    size = sum(p.stat().st_size for p in OUT.iterdir()) // 1024
    print(f"{OUT.relative_to(MODELS.parent)}: {size} KiB")


if __name__ == "__main__":
    main()
