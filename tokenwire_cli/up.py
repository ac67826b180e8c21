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
    return subprocess.Popen([sys.executable, "-m", "tokenwire_cli.main", *args], env=env)


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], limit_s: float = 120.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
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


def run_up(host: str, grpc_port: int, http_port: int, metrics_port: int) -> int:
    server = _spawn(
        "serve", "--host", host, "--port", str(grpc_port), "--metrics-port", str(metrics_port)
    )
    edge = _spawn(
        "edge", "--host", host, "--port", str(http_port), "--grpc-target", f"{host}:{grpc_port}"
    )
    procs = [server, edge]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if _wait_ready(f"http://{host}:{http_port}/readyz", procs):
        print(banner(host, grpc_port, http_port, metrics_port), flush=True)
    while not stopping and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = [p.wait(60) for p in procs]
    return 0 if stopping or all(c == 0 for c in codes) else 1
