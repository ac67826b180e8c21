"""`tokenwire up`: the server and the edge as two child processes, stopped together."""

from __future__ import annotations

import dataclasses
import http.client
import shutil
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Literal

from tokenwire.common import defaults
from tokenwire.common.settings import host_family, host_port, require, require_seconds, setting
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.process import TokenwireProcess

LogFormat = Literal["json", "console"]


@dataclasses.dataclass(frozen=True, slots=True)
class UpSettings:
    """What `tokenwire up` reads: the same variables `serve` and `edge` read for these values."""

    host: str = setting(defaults.HOST, "bind address of the server and the edge")
    grpc_port: int = setting(defaults.GRPC_PORT, "gRPC port of the server", env="TOKENWIRE_PORT")
    http_port: int = setting(defaults.HTTP_PORT, "HTTP port of the edge", env="TOKENWIRE_EDGE_PORT")
    metrics_port: int = setting(defaults.METRICS_PORT, "the server's `/metrics` port; 0 = off")
    drain_grace_s: float = setting(
        defaults.DRAIN_GRACE_S, "drain grace of the edge, then of the server"
    )
    model_dir: Path = setting(
        BUNDLED_MODEL_DIR, "model directory the server serves", shown="`models/tiny-py`"
    )
    # Console by default: `up` is for a terminal (serve and edge alone default to JSON).
    log_format: LogFormat = setting("console", "log format of both: `json` or `console`")

    def __post_init__(self) -> None:
        # `up` tells the edge where the server is and checks the edge's port: both fixed.
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            require(1 <= port <= 65535, name, "between 1 and 65535", port)
        require(
            0 <= self.metrics_port <= 65535,
            "metrics_port",
            "between 0 and 65535 (0 = off)",
            self.metrics_port,
        )
        same = self.http_port == self.grpc_port
        require(not same, "http_port", "different from grpc_port", self.http_port)
        require(
            self.metrics_port not in (self.grpc_port, self.http_port),
            "metrics_port",
            "different from grpc_port and http_port",
            self.metrics_port,
        )
        require_seconds(self.drain_grace_s, "drain_grace_s")
        require(
            self.log_format in ("json", "console"), "log_format", "json or console", self.log_format
        )


def _spawn(*args: str) -> TokenwireProcess:
    # A process group of its own: a terminal's Ctrl-C reaches `up` alone, which then stops the
    # children in order (the edge drains while the server still serves its streams).
    return TokenwireProcess(*args, capture_logs=False, own_group=True)


class _Signals:
    """The first SIGINT/SIGTERM asks for a drain; a second one asks to stop at once."""

    def __init__(self) -> None:
        self.count = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._seen)

    def _seen(self, signum: int, frame: object) -> None:
        self.count += 1


def _wait_ready(
    url: str, procs: list[TokenwireProcess], signals: _Signals, limit_s: float = 120.0
) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and not signals.count:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        # Not up yet, or not HTTP (another program, or the gRPC server, on that port).
        except (OSError, http.client.HTTPException):
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
    web = f"http://{host_port(host, http_port)}"
    grpc_address = host_port(host, grpc_port)
    # Port 0 turns the server's metrics off: no address to show for them.
    metrics_url = f"http://{host_port(host, metrics_port)}/metrics"
    server_metrics = f"{metrics_url} (server), " if metrics_port else ""
    lines = [
        "",
        "tokenwire is up",
        f"  browser:  {web}/",
        f'  grpcurl:  grpcurl -plaintext -d \'{{"prompt": "def fib(n):", "max_tokens": 32}}\' '
        f"{grpc_address} tokenwire.v1.GenerationService/Generate",
        f"  cli:      {_command()} generate 'def fib(n):' --target {grpc_address} --stats",
        f"  curl:     curl -N {web}/v1/generate -H 'Content-Type: application/json' "
        '-d \'{"prompt": "def fib(n):", "max_tokens": 32}\'',
        f'  OpenAI:   OpenAI(base_url="{web}/v1", api_key="none")',
        f"  metrics:  {server_metrics}{web}/metrics (edge)",
        "  Ctrl-C drains streams and stops both.",
        "",
    ]
    return "\n".join(lines)


def taken_port(settings: UpSettings) -> str | None:
    """One line naming the first of `up`'s ports that cannot be bound on its host (another
    program listens there), or None. Checked before anything starts: a child that found its
    port taken would exit, but another tokenwire answering there would pass for it."""
    ports = (
        (settings.grpc_port, "the server's gRPC port (--grpc-port, TOKENWIRE_PORT)"),
        (settings.http_port, "the edge's HTTP port (--http-port, TOKENWIRE_EDGE_PORT)"),
        (settings.metrics_port, "the metrics port (--metrics-port, TOKENWIRE_METRICS_PORT)"),
    )
    for port, what in ports:
        if not port:
            continue
        try:
            socket.create_server((settings.host, port), family=host_family(settings.host)).close()
        except OSError as exc:
            where = host_port(settings.host, port)
            return f"tokenwire up: cannot listen on {where}, {what}: {exc.strerror}"
    return None


def run_up(settings: UpSettings) -> int:
    """Start the server and the edge, print where to go, stop both on Ctrl-C. Exit status 2
    when a port is taken (before anything starts) or a child could not start (exit 2)."""
    taken = taken_port(settings)
    if taken is not None:
        print(taken, file=sys.stderr, flush=True)
        return 2
    signals = _Signals()
    host = settings.host
    grace = ("--drain-grace-s", str(settings.drain_grace_s), "--log-format", settings.log_format)
    server = _spawn(
        "serve",
        "--host",
        host,
        "--port",
        str(settings.grpc_port),
        "--metrics-port",
        str(settings.metrics_port),
        "--model-dir",
        str(settings.model_dir),
        *grace,
    )
    edge = _spawn(
        "edge",
        "--host",
        host,
        "--port",
        str(settings.http_port),
        "--grpc-target",
        host_port(host, settings.grpc_port),
        *grace,
    )
    procs = [server, edge]
    try:
        if _wait_ready(f"http://{host_port(host, settings.http_port)}/readyz", procs, signals):
            ports = (settings.grpc_port, settings.http_port, settings.metrics_port)
            print(banner(host, *ports), flush=True)
        while not signals.count and all(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        # The edge first: its streams finish while the server still serves them; then the
        # server. A second Ctrl-C (or the limit) kills instead of waiting. The children have
        # process groups of their own: nothing else stops them if `up` goes.
        limit_s = settings.drain_grace_s + 30
        asked = signals.count
        codes = [p.stop(limit_s, lambda: signals.count > asked) for p in (edge, server)]
    print(f"tokenwire up: stopped (edge exit {codes[0]}, server exit {codes[1]})", flush=True)
    if signals.count or all(c == 0 for c in codes):
        return 0
    return 2 if 2 in codes else 1
