"""A start that fails after the gRPC port is open stops at once: nothing served, nothing to
drain, so no drain notice and no server.draining line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

NOTICE_S = 60
"""A drain notice far longer than the test waits: a failed start must not sit it out."""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("failure", "reason"),
    [("metrics port taken", "metrics_cannot_listen"), ("model refused", "model_refused")],
)
def test_a_failed_start_exits_2_without_the_drain_notice_or_a_draining_line(
    failure: str, reason: str, tmp_path: Path
) -> None:
    """With the metrics port taken, or a model folder the load refuses, `serve` (given a 60 s
    drain notice) exits 2 within seconds; its last line is server.stopped with the reason, and
    it never logs server.draining."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        if failure == "metrics port taken":
            args = ["--metrics-port", str(taken.getsockname()[1])]
        else:
            args = ["--metrics-port", "0", "--model-dir", str(tmp_path)]  # no config.json
        done = subprocess.run(
            [sys.executable, "-m", "tokenwire.client.command", "serve", "--port", "0", *args],
            capture_output=True,
            text=True,
            timeout=15,  # far inside the notice
            env={
                "TOKENWIRE_DRAIN_NOTICE_S": str(NOTICE_S),
                "TOKENWIRE_LOG_FORMAT": "json",
                "PATH": "/usr/bin:/bin",
            },
            check=False,
        )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    events = [r["event"] for r in records]
    assert done.returncode == 2
    assert "server.draining" not in events
    assert (records[-1]["event"], records[-1].get("reason")) == ("server.stopped", reason)
