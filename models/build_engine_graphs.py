"""Build the engine's two one-node helper graphs in service/engine/:

- copy_bytes.onnx: Identity over a flat uint8 tensor. The engine runs it with IOBinding to copy
  a region of a KV-cache buffer that lives on the model's device (ONNX Runtime offers no slice
  copy between OrtValues): input and output are bound to raw addresses, so a byte range moves
  host -> device or device -> device inside the session's own execution provider.
- logits_fp32.onnx: Cast float16 -> float32 over [batch, positions, vocabulary]. A graph with
  fp16 logits has them widened where they were computed, so the host receives float32 (numpy
  converts fp16 about 30 times slower than a copy).

    python models/build_engine_graphs.py        (any environment with the `onnx` package)

The output is byte-stable: rebuilding writes the same files.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

OUT = Path(__file__).resolve().parent.parent / "service" / "engine"


def _model(
    node: onnx.NodeProto,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    name: str,
) -> onnx.ModelProto:
    graph = helper.make_graph([node], name, inputs, outputs)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tokenwire"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def copy_bytes() -> onnx.ModelProto:
    source = helper.make_tensor_value_info("source", TensorProto.UINT8, ["bytes"])
    target = helper.make_tensor_value_info("target", TensorProto.UINT8, ["bytes"])
    node = helper.make_node("Identity", ["source"], ["target"], name="copy")
    return _model(node, [source], [target], "copy_bytes")


def logits_fp32() -> onnx.ModelProto:
    dims = ["batch", "positions", "vocabulary"]
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT16, dims)
    widened = helper.make_tensor_value_info("logits_fp32", TensorProto.FLOAT, dims)
    node = helper.make_node("Cast", ["logits"], ["logits_fp32"], name="widen", to=TensorProto.FLOAT)
    return _model(node, [logits], [widened], "logits_fp32")


if __name__ == "__main__":
    for name, build in (("copy_bytes", copy_bytes), ("logits_fp32", logits_fp32)):
        path = OUT / f"{name}.onnx"
        path.write_bytes(build().SerializeToString())
        print(path)
