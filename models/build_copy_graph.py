"""Build service/engine/copy_bytes.onnx: one Identity node over a flat uint8 tensor.

The engine runs it with IOBinding to copy a region of a KV-cache buffer that lives on the
model's device (ONNX Runtime offers no slice copy between OrtValues): the input and output are
bound to raw addresses, so a byte range moves host -> device or device -> device inside the
session's own execution provider, with no other library involved.

    python models/build_copy_graph.py        (any environment with the `onnx` package)

The output is byte-stable: rebuilding writes the same file.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

OUT = Path(__file__).resolve().parent.parent / "service" / "engine" / "copy_bytes.onnx"


def build() -> onnx.ModelProto:
    source = helper.make_tensor_value_info("source", TensorProto.UINT8, ["bytes"])
    target = helper.make_tensor_value_info("target", TensorProto.UINT8, ["bytes"])
    node = helper.make_node("Identity", ["source"], ["target"], name="copy")
    graph = helper.make_graph([node], "copy_bytes", [source], [target])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tokenwire"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    OUT.write_bytes(build().SerializeToString())
    print(OUT)
