"""Build the engine's small helper graphs in service/engine/:

- copy_bytes.onnx: Identity over a flat uint8 tensor. The engine runs it with IOBinding to copy
  a region of a KV-cache buffer that lives on the model's device (ONNX Runtime offers no slice
  copy between OrtValues): input and output are bound to raw addresses, so a byte range moves
  host -> device or device -> device inside the session's own execution provider.
- logits_fp32.onnx: Cast float16 -> float32 over [batch, positions, vocabulary]. A graph with
  fp16 logits has them widened where they were computed, so the host receives float32 (numpy
  converts fp16 about 30 times slower than a copy).
- greedy_fp16.onnx, greedy_fp32.onnx: each row's highest-scoring id of logits [batch,
  positions, vocabulary], at every position, ties to the lowest id (numpy's argmax rule; fp16 is
  widened first, so the result equals the host's argmax of the widened logits). A NaN scores as
  -inf (IsNaN, Where), as on the host (logits.best_ids): ArgMax's treatment of NaN is the
  provider's, and plain greedy rows must not pick a NaN that sampled rows rank last. Greedy rows get
  their next id where the logits were computed, and the logits themselves stay there unless a
  row needs them. The graph has no inputs but the logits, so that it can be replayed as a CUDA
  graph too (a vocabulary limit would be a host-side input).

    python models/build_engine_graphs.py        (any environment with the `onnx` package)

The output is byte-stable: rebuilding writes the same files.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import TensorProto, helper

OUT = Path(__file__).resolve().parent.parent / "service" / "engine"


def _model(
    nodes: onnx.NodeProto | list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    name: str,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes if isinstance(nodes, list) else [nodes], name, inputs, outputs)
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


def greedy(dtype: int) -> onnx.ModelProto:
    dims = ["batch", "positions", "vocabulary"]
    logits = helper.make_tensor_value_info("logits", dtype, dims)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "positions"])
    nodes, scores = [], "logits"
    if dtype != TensorProto.FLOAT:
        nodes.append(
            helper.make_node("Cast", ["logits"], ["wide"], name="widen", to=TensorProto.FLOAT)
        )
        scores = "wide"
    lowest = helper.make_tensor("lowest", TensorProto.FLOAT, [], [-math.inf])
    nodes += [
        helper.make_node("IsNaN", [scores], ["nan"], name="find_nan"),
        helper.make_node("Constant", [], ["minus_inf"], name="minus_inf", value=lowest),
        helper.make_node("Where", ["nan", "minus_inf", scores], ["ranked"], name="nan_lowest"),
        helper.make_node("ArgMax", ["ranked"], ["ids"], name="best", axis=2, keepdims=0),
    ]
    return _model(nodes, [logits], [ids], "greedy")


def greedy_fp16() -> onnx.ModelProto:
    return greedy(TensorProto.FLOAT16)


def greedy_fp32() -> onnx.ModelProto:
    return greedy(TensorProto.FLOAT)


GRAPHS = {
    "copy_bytes": copy_bytes,
    "logits_fp32": logits_fp32,
    "greedy_fp16": greedy_fp16,
    "greedy_fp32": greedy_fp32,
}

if __name__ == "__main__":
    for name, build in GRAPHS.items():
        path = OUT / f"{name}.onnx"
        path.write_bytes(build().SerializeToString())
        print(path)
