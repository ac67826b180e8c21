"""A real `redis-server` (the Debian package, `make system-deps`) on a free loopback port, for
the edge's shared resume store. No persistence; killed when the test ends."""

from __future__ import annotations

import queue
import shutil
import socket
import subprocess
import threading

import pytest

READY = "Ready to accept connections"


def free_port() -> int:
    """A port nothing listens on now (redis-server cannot pick one itself: it has no port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """`redis-server` on 127.0.0.1:<free port>; ready once it logs that it accepts connections."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is missing: `make system-deps` installs it (Debian)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._ready: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            ready = self._ready.get(timeout=timeout_s)
        except queue.Empty:
            ready = False
        if not ready:
            self.close()
            raise AssertionError(f"redis-server did not start: {self.lines[-5:]}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if READY in line:
                self._ready.put(True)
        self._ready.put(False)  # it exited

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
