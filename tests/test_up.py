"""`tokenwire up` (what `make run` runs): server + edge start, print where to go, stop on Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

import httpx


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


async def test_up_prints_the_urls_serves_and_stops_cleanly_on_ctrl_c() -> None:
    """The banner names the browser URL, grpcurl and the OpenAI base URL; SIGINT exits 0."""
    grpc_port, http_port, metrics_port = _free_ports(3)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenwire_cli.main",
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
    assert proc.stdout is not None
    banner = []
    try:
        async with asyncio.timeout(90):
            while not any("Ctrl-C" in line for line in banner):
                banner.append((await proc.stdout.readline()).decode())
        async with httpx.AsyncClient(timeout=30) as http:
            reply = await http.post(
                f"http://127.0.0.1:{http_port}/v1/completions",
                json={"model": "m", "prompt": "import os", "max_tokens": 4},
            )
            scraped = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = "".join(banner)
    assert f"http://127.0.0.1:{http_port}/" in text
    assert f"127.0.0.1:{grpc_port} tokenwire.v1.GenerationService/Generate" in text
    assert f'base_url="http://127.0.0.1:{http_port}/v1"' in text
    assert reply.status_code == 200
    assert "tokenwire_requests_total" in scraped.text
    assert proc.returncode == 0
