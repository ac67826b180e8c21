"""Spawn and watch a `tokenwire` subprocess, reading its JSON log lines as they arrive.

One helper for everything that starts the command as a child: `tokenwire up` (its server and
edge), the tests' real-process fixtures and the benchmark. The child runs `tokenwire` itself
through this Python (`python -m tokenwire.client.command`), so it starts exactly as by hand.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any


def command(*args: str) -> list[str]:
    """The argv that runs `tokenwire <args>` with this interpreter."""
    return [sys.executable, "-m", "tokenwire.client.command", *args]


class TokenwireProcess:
    """A `tokenwire` subprocess. With capture_logs, its stdout and stderr are read on a thread and
    each line kept as a log record (a JSON object, or {"event": "raw", "line": ...}); without,
    it writes to this process's terminal. own_group puts it in a process group of its own, so a
    terminal's Ctrl-C reaches the parent alone."""

    def __init__(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        capture_logs: bool = True,
        own_group: bool = False,
    ) -> None:
        pipe = subprocess.PIPE if capture_logs else None
        self.proc = subprocess.Popen(
            command(*args),
            stdout=pipe,
            stderr=subprocess.STDOUT if capture_logs else None,
            text=True,
            env={**os.environ, **(env or {})},
            process_group=0 if own_group else None,
        )
        self.records: list[dict[str, Any]] = []
        self._lines: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._reader: threading.Thread | None = None
        if capture_logs:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.records.append(record := parse_log_line(line))
            self._lines.put(record)

    def wait_for(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first log record with this event, waiting for it; AssertionError on timeout or
        when the process exits without it."""
        for record in list(self.records):
            if record.get("event") == event:
                return record
        deadline = time.monotonic() + timeout
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

    def listening_port(self, event: str, timeout: float = 60.0) -> int:
        """The port a listening record tells (its `port`, else the port in its `url`)."""
        record = self.wait_for(event, timeout)
        if "port" in record:
            return int(record["port"])
        found = re.search(r":(\d+)(/|$)", str(record.get("url", "")))
        if found is None:
            raise AssertionError(f"{event!r} names no port: {record}")
        return int(found.group(1))

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        """SIGTERM: the child drains and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def stop(self, limit_s: float = 60.0, give_up: Callable[[], bool] = lambda: False) -> int:
        """SIGTERM, wait for the drain; kill after limit_s or as soon as give_up() is true."""
        self.terminate()
        deadline = time.monotonic() + limit_s
        while self.proc.poll() is None:
            if give_up() or time.monotonic() > deadline:
                self.proc.kill()
                break
            time.sleep(0.05)
        return self.wait(limit_s)

    def close(self) -> None:
        """Kill it if still running and release its pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def parse_log_line(line: str) -> dict[str, Any]:
    """A JSON log record, or the raw line for anything else (a traceback, a console log)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        return {"event": "raw", "line": line.rstrip()}
    return record
