"""Start `tokenwire serve` / `tokenwire edge` as real subprocesses on 127.0.0.1:0 and read their
JSON log lines (through tokenwire.server.process, the helper `tokenwire up` uses too)."""

from __future__ import annotations

from typing import Any

from tokenwire.server.process import TokenwireProcess


class LoggingProcess(TokenwireProcess):
    """A `tokenwire` subprocess logging JSON lines, each parsed as it arrives."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(*args, env={"TOKENWIRE_LOG_FORMAT": "json", **(env or {})})


class ServerProcess(LoggingProcess):
    """`tokenwire serve` on an ephemeral port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__("serve", "--port", "0", *args, env=env)
        self.port = self.listening_port("server.listening")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


class EdgeProcess(LoggingProcess):
    """`tokenwire edge` on an ephemeral port, in front of `target`."""

    def __init__(self, target: str, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__("edge", "--port", "0", "--grpc-target", target, *args, env=env)
        self.url = str(self.wait_for("edge.listening")["url"]).rstrip("/")


def rounding_at_start(
    *args: str, warning: str = "model.batch_rounding"
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`tokenwire serve` with these arguments: its model.loaded line, and its `warning` line
    where model.loaded reports a rounding above 0 (else None)."""
    server = ServerProcess("--metrics-port", "0", *args)
    try:
        loaded = server.wait_for("model.loaded")
        said = server.wait_for(warning) if loaded["batch_rounding"] > 0 else None
        return loaded, said
    finally:
        server.stop()
        server.close()
