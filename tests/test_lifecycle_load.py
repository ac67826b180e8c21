"""A signal while the model loads: the process stops at once (exit 0) and never serves.

The load is kept waiting by the model folder itself: its config.json is a named pipe that no
one writes, so the server's load blocks reading it, as it would on storage that serves a large
model slowly, for as long as the test needs (no hook in the server)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import ServerProcess
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.process import parse_log_line

STOP_WITHIN_S = 5.0
"""A stop during the load takes milliseconds; waiting for the load would never end here."""


def _loading_model(tmp_path: Path) -> Path:
    """The bundled model, with a config.json whose reading blocks until the process ends."""
    model_dir = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL_DIR, model_dir)
    (model_dir / "config.json").unlink()
    os.mkfifo(model_dir / "config.json")
    return model_dir


@pytest.mark.slow
def test_sigterm_while_the_model_loads_exits_zero_at_once_without_serving(
    tmp_path: Path,
) -> None:
    """SIGTERM between server.listening and model.loaded: the process exits 0 within a few
    seconds, closing its port, with one server.stopped line (reason signal_during_load) and
    no model.loaded or server.started: it never reported SERVING."""
    server = ServerProcess(
        "--metrics-port", "0", env={"TOKENWIRE_MODEL_DIR": str(_loading_model(tmp_path))}
    )
    try:
        time.sleep(0.5)  # the load is under way (and blocked)
        server.terminate()
        signalled = time.monotonic()
        try:
            code = server.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_WITHIN_S} s after SIGTERM during the load")
        took = time.monotonic() - signalled
    finally:
        server.close()
    events = [(r["event"], r.get("reason")) for r in server.records]
    assert code == 0
    assert took < STOP_WITHIN_S
    assert events == [("server.listening", None), ("server.stopped", "signal_during_load")]
    with socket.create_server(("127.0.0.1", server.port)):
        pass  # the port is free again


def _free_ports(n: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    try:
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
def test_ctrl_c_to_up_while_the_model_loads_stops_both_at_once(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) to `tokenwire up` while its server loads the model: up stops the edge
    and the server within a few seconds, both exit 0, and the server never started serving
    (up would otherwise wait out the server's load, or kill it after its drain limit)."""
    grpc_port, http_port, metrics_port = _free_ports(3)
    up = subprocess.Popen(
        [
            *(sys.executable, "-m", "tokenwire.client.command", "up"),
            *("--grpc-port", str(grpc_port), "--http-port", str(http_port)),
            *("--metrics-port", str(metrics_port), "--drain-grace-s", "30"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "TOKENWIRE_LOG_FORMAT": "json",
            "TOKENWIRE_MODEL_DIR": str(_loading_model(tmp_path)),
        },
    )
    assert up.stdout is not None
    lines: list[str] = []
    try:
        seen: set[str] = set()
        while not {"server.listening", "edge.listening"} <= seen:
            line = up.stdout.readline()
            assert line, f"up ended before both listened: {lines[-5:]}"
            lines.append(line)
            seen.add(str(parse_log_line(line).get("event")))
        up.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        try:
            out, _ = up.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("`up` still running 15 s after Ctrl-C during the load")
        took = time.monotonic() - signalled
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)  # a second Ctrl-C: up kills its children
            try:
                up.wait(10)
            except subprocess.TimeoutExpired:
                up.kill()
            up.communicate()
    lines += out.splitlines()
    events = [parse_log_line(line) for line in lines]
    stopped = [r for r in events if r["event"] == "server.stopped"]
    assert up.returncode == 0
    assert took < 15
    assert "tokenwire up: stopped (edge exit 0, server exit 0)" in lines
    assert [r.get("reason") for r in stopped] == ["signal_during_load"]
    assert not [r for r in events if r["event"] in ("model.loaded", "server.started")]
