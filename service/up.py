"""`tokenwire up`: the server and the edge as two child processes, stopped together."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TOKENWIRE_LOG_FORMAT": os.environ.get("TOKENWIRE_LOG_FORMAT", "console")}
    # A process group of its own: a terminal's Ctrl-C reaches `up` alone, which then stops the
    # children in order (the edge drains while the server still serves its streams).
    # The children run the `tokenwire` command itself (from tokenwire-client, which this
    # distribution depends on), so `serve` and `edge` start exactly as they do by hand.
    return subprocess.Popen(
        [sys.executable, "-m", "tokenwire.client.command", *args], env=env, process_group=0
    )


class _Signals:
    """The first SIGINT/SIGTERM asks for a drain; a second one asks to stop at once."""

    def __init__(self) -> None:
        self.count = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._seen)

    def _seen(self, signum: int, frame: object) -> None:
        self.count += 1


def _wait_ready(
    url: str, procs: list[subprocess.Popen[bytes]], signals: _Signals, limit_s: float = 120.0
) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and not signals.count:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _command() -> str:
    """How to run `tokenwire` from here: on PATH, else the venv's script, relative if possible."""
    script = Path(sys.executable).parent / "tokenwire"
    if shutil.which("tokenwire") == str(script):
        return "tokenwire"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def banner(host: str, grpc_port: int, http_port: int, metrics_port: int) -> str:
    web = f"http://{host}:{http_port}"
    lines = [
        "",
        "tokenwire is up",
        f"  browser:  {web}/",
        f'  grpcurl:  grpcurl -plaintext -d \'{{"prompt": "def fib(n):", "max_tokens": 32}}\' '
        f"{host}:{grpc_port} tokenwire.v1.GenerationService/Generate",
        f"  cli:      {_command()} generate 'def fib(n):' --target {host}:{grpc_port} --stats",
        f"  curl:     curl -N {web}/v1/generate -H 'Content-Type: application/json' "
        '-d \'{"prompt": "def fib(n):", "max_tokens": 32}\'',
        f'  OpenAI:   OpenAI(base_url="{web}/v1", api_key="none")',
        f"  metrics:  http://{host}:{metrics_port}/metrics (server), {web}/metrics (edge)",
        "  Ctrl-C drains streams and stops both.",
        "",
    ]
    return "\n".join(lines)


def _stop(proc: subprocess.Popen[bytes], limit_s: float, signals: _Signals) -> int:
    """SIGTERM, wait for the drain (a second Ctrl-C or the limit kills), return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    asked = signals.count
    deadline = time.monotonic() + limit_s
    while proc.poll() is None:
        if signals.count > asked or time.monotonic() > deadline:
            proc.kill()
            return proc.wait()
        time.sleep(0.05)
    return proc.returncode


def _grace(flag: float | None) -> float:
    """The drain grace the children will use (flag, else TOKENWIRE_DRAIN_GRACE_S, else 30)."""
    if flag is not None:
        return flag
    try:
        return float(os.environ.get("TOKENWIRE_DRAIN_GRACE_S", "30"))
    except ValueError:
        return 30.0


def run_up(
    host: str, grpc_port: int, http_port: int, metrics_port: int, drain_grace_s: float | None = None
) -> int:
    signals = _Signals()
    grace = ("--drain-grace-s", str(drain_grace_s)) if drain_grace_s is not None else ()
    server = _spawn(
        "serve",
        "--host",
        host,
        "--port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        *grace,
    )
    edge = _spawn(
        "edge",
        "--host",
        host,
        "--port",
        str(http_port),
        "--grpc-target",
        f"{host}:{grpc_port}",
        *grace,
    )
    procs = [server, edge]
    if _wait_ready(f"http://{host}:{http_port}/readyz", procs, signals):
        print(banner(host, grpc_port, http_port, metrics_port), flush=True)
    while not signals.count and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    # The edge first: its streams finish while the server still serves them; then the server.
    limit_s = _grace(drain_grace_s) + 30
    codes = [_stop(edge, limit_s, signals), _stop(server, limit_s, signals)]
    print(f"tokenwire up: stopped (edge exit {codes[0]}, server exit {codes[1]})", flush=True)
    return 0 if signals.count or all(c == 0 for c in codes) else 1
