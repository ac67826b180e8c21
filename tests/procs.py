"""Start `tokenwire serve` / `tokenwire edge` as real subprocesses on 127.0.0.1:0 and read their
JSON log lines."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any


class LoggingProcess:
    """A `tokenwire` subprocess; stdout lines are parsed as JSON log records as they arrive."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "tokenwire.client.command", *args]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TOKENWIRE_LOG_FORMAT": "json", **(env or {})},
        )
        self.records: list[dict[str, Any]] = []
        self._lines: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = {"event": "raw", "line": line.rstrip()}
            self.records.append(record)
            self._lines.put(record)

    def wait_for(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """Block until a log record with this event arrives (or fail after timeout)."""
        deadline = time.monotonic() + timeout
        for record in self.records:
            if record.get("event") == event:
                return record
        while time.monotonic() < deadline:
            try:
                record = self._lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self._lines.empty():
                    break
                continue
            if record.get("event") == event:
                return record
        raise AssertionError(f"no {event!r} log line; got {self.records[-5:]}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class ServerProcess(LoggingProcess):
    """`tokenwire serve` on an ephemeral port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__("serve", "--port", "0", *args, env=env)
        self.port = int(self.wait_for("server.listening")["port"])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


class EdgeProcess(LoggingProcess):
    """`tokenwire edge` on an ephemeral port, in front of `target`."""

    def __init__(self, target: str, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__("edge", "--port", "0", "--grpc-target", target, *args, env=env)
        self.url = str(self.wait_for("edge.listening")["url"]).rstrip("/")
