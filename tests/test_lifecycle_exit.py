"""The last export of traces at exit is bounded: a collector that cannot be reached does not
hold up a stop (the OTLP exporter alone retries it for up to 10 s)."""

from __future__ import annotations

import socket
import time

import grpc
import httpx
import pytest

from tests.conftest import greedy
from tests.procs import EdgeProcess, LoggingProcess, ServerProcess
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

EXIT_WITHIN_S = 4.0
"""The flush's limit (2 s) and the rest of the stop, with room for a busy machine."""


def _closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def _collector() -> dict[str, str]:
    return {"TOKENWIRE_OTLP_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}


def _seconds_to_exit(proc: LoggingProcess) -> tuple[int, float]:
    """SIGTERM; the exit status and the seconds until the process ended."""
    proc.terminate()
    signalled = time.monotonic()
    code = proc.wait(30)
    return code, time.monotonic() - signalled


@pytest.mark.slow
def test_server_with_an_unreachable_collector_exits_within_seconds_of_sigterm() -> None:
    """`serve` exporting to a collector whose port refuses connections, with a Generate
    call's span still batched: after SIGTERM it exits 0 within a few seconds."""
    server = ServerProcess("--metrics-port", "0", env=_collector())
    try:
        server.wait_for("server.started")
        with grpc.insecure_channel(server.target) as channel:
            list(pb_grpc.GenerationServiceStub(channel).Generate(greedy("def f():", max_tokens=2)))
        code, took = _seconds_to_exit(server)
    finally:
        server.close()
    assert code == 0
    assert took < EXIT_WITHIN_S


@pytest.mark.slow
def test_edge_with_an_unreachable_collector_exits_within_seconds_of_sigterm() -> None:
    """`edge` exporting to a collector whose port refuses connections, with an API request's
    span still batched (a refused one: no server answers behind the edge): after SIGTERM it
    exits 0 within a few seconds."""
    edge = EdgeProcess(f"127.0.0.1:{_closed_port()}", "--upstream-timeout-s", "1", env=_collector())
    try:
        httpx.post(f"{edge.url}/v1/generate", json={"prompt": "x"}, timeout=30)  # refused
        code, took = _seconds_to_exit(edge)
    finally:
        edge.close()
    assert code == 0
    assert took < EXIT_WITHIN_S
