"""`tokenwire up` (what `make run` runs): server + edge start, print where to go, stop on Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import MODEL
from tokenwire.server.engine import ModelSpec
from tokenwire.server.up import banner

ROOT = Path(__file__).resolve().parent.parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


async def _banner(proc: asyncio.subprocess.Process, within_s: float = 90.0) -> list[str]:
    """The lines `up` prints up to and including its banner's Ctrl-C line; fails at once if
    the output ends first (the process exited), and after within_s if the banner never comes."""
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(within_s):
        while not any("Ctrl-C" in line for line in lines):
            line = await proc.stdout.readline()
            if not line:
                raise AssertionError(f"`up` ended its output before the banner: {lines}")
            lines.append(line.decode())
    return lines


async def test_up_prints_the_urls_serves_and_stops_cleanly_on_ctrl_c() -> None:
    """The banner names the browser URL, grpcurl and the OpenAI base URL; SIGINT exits 0."""
    grpc_port, http_port, metrics_port = _free_ports(3)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire.client.command",
        "up",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        str(metrics_port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    banner: list[str] = []
    try:
        banner = await _banner(proc)
        async with httpx.AsyncClient(timeout=30) as http:
            reply = await http.post(
                f"http://127.0.0.1:{http_port}/v1/completions",
                json={"model": MODEL, "prompt": "import os", "max_tokens": 4},
            )
            scraped = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
        await _interrupt(proc)
    finally:
        await _kill_if_running(proc)
    text = "".join(banner)
    assert f"http://127.0.0.1:{http_port}/" in text
    assert f"127.0.0.1:{grpc_port} tokenwire.v1.GenerationService/Generate" in text
    assert f'base_url="http://127.0.0.1:{http_port}/v1"' in text
    assert reply.status_code == 200
    assert "tokenwire_requests_total" in scraped.text
    assert proc.returncode == 0


async def _interrupt(proc: asyncio.subprocess.Process) -> None:
    """Ctrl-C to `up`, then wait (at most a minute) for it to exit."""
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.communicate(), 60)


async def _kill_if_running(proc: asyncio.subprocess.Process) -> None:
    """Kill `up` where a test failed before it exited."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def _spawn_up(
    grpc_port: int, http_port: int, metrics_port: int, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """`tokenwire up` on these ports with JSON logs (and `env`), stdout and stderr piped
    together."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire.client.command",
        "up",
        *("--grpc-port", str(grpc_port), "--http-port", str(http_port)),
        *("--metrics-port", str(metrics_port)),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TOKENWIRE_LOG_FORMAT": "json", **(env or {})},
    )


async def _start_up(*args: str) -> tuple[asyncio.subprocess.Process, list[str], int]:
    """`tokenwire up` with JSON logs; returns once the banner is out (lines read so far)."""
    grpc_port, http_port, metrics_port = _free_ports(3)
    proc = await _spawn_up(grpc_port, http_port, metrics_port, *args)
    try:
        lines = await _banner(proc)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, lines, http_port


def _records(lines: list[str]) -> list[dict[str, object]]:
    records = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and "event" in record:
                records.append(record)
    return records


async def test_sigterm_lets_an_sse_stream_reach_done_then_stops_edge_then_server() -> None:
    """SIGTERM to `tokenwire up` mid-stream: the SSE stream still gets every token and its
    `done`, the edge stops before the server starts draining, and `up` exits 0."""
    proc, lines, http_port = await _start_up("--drain-grace-s", "30")
    body = {"prompt": "def f():", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    try:
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http,
            aconnect_sse(http, "POST", "/v1/generate", json=body) as source,
        ):
            stream = source.aiter_sse()
            events = [await anext(stream)]
            proc.send_signal(signal.SIGTERM)
            events += [event async for event in stream]
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines += out.decode().splitlines()
    records = _records(lines)
    order = [record["event"] for record in records]
    draining = records[order.index("edge.draining")]
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "length"
    assert sum(e.event == "token" for e in events) == 400
    assert draining["in_flight"] == 1  # the stream was still running when the signal came
    assert order.count("edge.stopped") == 1
    assert order.index("edge.stopped") < order.index("server.draining")
    assert "server.stopped" in order
    assert proc.returncode == 0


async def test_up_takes_its_ports_from_the_variables_serve_and_edge_read() -> None:
    """With no flags, `tokenwire up` listens where TOKENWIRE_PORT, TOKENWIRE_EDGE_PORT and
    TOKENWIRE_METRICS_PORT say, as `serve` and `edge` alone would."""
    grpc_port, http_port, metrics_port = _free_ports(3)
    ports = {
        "TOKENWIRE_PORT": str(grpc_port),
        "TOKENWIRE_EDGE_PORT": str(http_port),
        "TOKENWIRE_METRICS_PORT": str(metrics_port),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire.client.command",
        "up",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TOKENWIRE_LOG_FORMAT": "json", **ports},
    )
    lines: list[str] = []
    try:
        lines = await _banner(proc)
        async with httpx.AsyncClient(timeout=30) as http:
            ready = await http.get(f"http://127.0.0.1:{http_port}/readyz")
            scraped = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
        await _interrupt(proc)
    finally:
        await _kill_if_running(proc)
    listening = [r for r in _records(lines) if r["event"] == "server.listening"]
    assert [r["port"] for r in listening] == [grpc_port]
    assert ready.status_code == 200
    assert scraped.status_code == 200
    assert proc.returncode == 0


async def test_up_serves_the_model_folder_its_model_dir_names() -> None:
    """`tokenwire up --model-dir <folder>` serves that folder: the edge lists its model, not
    the bundled one."""
    folder = ROOT / "models" / "fixtures" / "gpt2"
    proc, _, http_port = await _start_up("--model-dir", str(folder))
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            listed = await http.get(f"http://127.0.0.1:{http_port}/v1/models")
        await _interrupt(proc)
    finally:
        await _kill_if_running(proc)
    assert [m["id"] for m in listed.json()["data"]] == [ModelSpec.from_dir(folder).name]
    assert ModelSpec.from_dir(folder).name != MODEL


async def test_up_whose_edge_cannot_start_stops_the_server_and_exits_2() -> None:
    """With a setting the edge refuses (TOKENWIRE_MAX_BODY_BYTES=1), `tokenwire up` stops the
    server it started and exits 2, as the edge did: no child is left running (the gRPC port is
    free again)."""
    grpc_port, http_port, metrics_port = _free_ports(3)
    proc = await _spawn_up(
        grpc_port, http_port, metrics_port, env={"TOKENWIRE_MAX_BODY_BYTES": "1"}
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 2
    assert b"edge exit 2" in out
    socket.create_server(("127.0.0.1", grpc_port)).close()


async def test_up_refuses_a_drain_grace_beyond_the_longest_duration_itself() -> None:
    """TOKENWIRE_DRAIN_GRACE_S=2000000 (past the 1000000 s every duration setting takes) stops
    `tokenwire up` before it starts a child: status 2 and one line from `up` naming
    drain_grace_s, its range and the variable."""
    grpc_port, http_port, metrics_port = _free_ports(3)
    env = {"TOKENWIRE_DRAIN_GRACE_S": "2000000"}
    proc = await _spawn_up(grpc_port, http_port, metrics_port, env=env)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert out.decode().splitlines() == [
        "tokenwire up: drain_grace_s: must be between 0 and 1000000 seconds, got 2000000.0 "
        "(from TOKENWIRE_DRAIN_GRACE_S)"
    ]


@pytest.mark.parametrize("held", ["grpc", "http", "metrics"])
async def test_up_with_a_port_taken_starts_nothing_and_exits_2(held: str) -> None:
    """With one of its ports held by another program, `tokenwire up` prints one line naming
    the address and exits 2 before starting anything: no banner, no child (the other ports
    stay free)."""
    ports = dict(zip(["grpc", "http", "metrics"], _free_ports(3), strict=True))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        ports[held] = taken.getsockname()[1]
        proc = await _spawn_up(ports["grpc"], ports["http"], ports["metrics"])
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    lines = out.decode().splitlines()
    assert proc.returncode == 2
    assert len(lines) == 1
    assert f"cannot listen on 127.0.0.1:{ports[held]}" in lines[0]
    for name, port in ports.items():
        if name != held:
            socket.create_server(("127.0.0.1", port)).close()


def test_banner_shows_no_server_metrics_address_when_they_are_off() -> None:
    """With --metrics-port 0 (the server's metrics off) the banner names only the edge's
    /metrics, never a :0 address; with a port it names both."""
    off = banner("127.0.0.1", 50051, 8000, 0)
    on = banner("127.0.0.1", 50051, 8000, 9464)
    assert ":0/" not in off
    assert "http://127.0.0.1:8000/metrics (edge)" in off
    assert "http://127.0.0.1:9464/metrics (server)" in on
