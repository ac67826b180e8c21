"""Which of some operator types an ONNX graph file uses, read without the onnx package and
without loading the file: a node's op type is stored as protobuf field 4 of NodeProto, a
length-delimited string, so its bytes are the tag 0x22, the name's length and the name. One
pass over the mapped file finds them in the graph, its subgraphs and its functions alike."""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterable
from pathlib import Path

_OP_TYPE_TAG = b"\x22"  # field 4, wire type 2 (length-delimited)


def op_types_among(path: Path, names: Iterable[str]) -> frozenset[str]:
    """The op types in `names` (each under 128 bytes) that nodes in the file at `path` use."""
    encoded = {bytes([len(name)]) + name.encode(): name for name in names}
    pattern = re.compile(_OP_TYPE_TAG + b"(" + b"|".join(map(re.escape, encoded)) + b")")
    with path.open("rb") as file:
        if file.seek(0, 2) == 0:
            return frozenset()
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return frozenset(encoded[match.group(1)] for match in pattern.finditer(mapped))
