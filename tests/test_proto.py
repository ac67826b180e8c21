"""The committed generated stubs are exactly what protoc produces from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_have_not_drifted(tmp_path: Path) -> None:
    """Regenerating into a temp dir yields byte-identical files to those committed."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert generated, "protoc produced nothing"
    for rel in generated:
        committed = ROOT / "protos" / rel
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale: make proto"
        )
