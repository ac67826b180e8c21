"""The operator types of an ONNX graph's top level, read from its file without the onnx
package: three fields of ONNX's protobuf schema (ModelProto.graph = 7, GraphProto.node = 1,
NodeProto.op_type = 4), described here; every other field is skipped as unknown."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from tokenwire.server.engine.spec import ModelLoadError

_PACKAGE = "tokenwire.onnx_ops"


@functools.cache
def _model_message() -> Any:
    """A message class that reads an ONNX ModelProto's node op types and nothing else."""
    proto = descriptor_pb2.FieldDescriptorProto
    schema = descriptor_pb2.FileDescriptorProto(
        name="tokenwire_onnx_ops.proto", package=_PACKAGE, syntax="proto2"
    )
    node = schema.message_type.add(name="Node")
    node.field.add(name="op_type", number=4, type=proto.TYPE_STRING, label=proto.LABEL_OPTIONAL)
    # Graph.node (repeated Node) = 1; Model.graph (Graph) = 7.
    for message, field, number, of, label in (
        ("Graph", "node", 1, "Node", proto.LABEL_REPEATED),
        ("Model", "graph", 7, "Graph", proto.LABEL_OPTIONAL),
    ):
        schema.message_type.add(name=message).field.add(
            name=field,
            number=number,
            type=proto.TYPE_MESSAGE,
            type_name=f".{_PACKAGE}.{of}",
            label=label,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Model"))


def op_types(path: Path) -> frozenset[str]:
    """The op types of the nodes of the graph in `path` (not those of subgraphs)."""
    model = _model_message()()
    try:
        model.ParseFromString(path.read_bytes())
    except Exception as exc:  # ONNX Runtime has read the file: only a reader's limit fails here
        raise ModelLoadError(f"{path.name} could not be read for its operators: {exc}") from exc
    return frozenset(str(node.op_type) for node in model.graph.node)
