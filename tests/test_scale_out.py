"""Scale-out on loopback: three server processes behind one round_robin client target."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import eventually, start_edge
from tests.procs import ServerProcess
from tokenwire.client import AsyncTokenwireClient, Completion, GenerateOptions, Unavailable

OPTIONS = GenerateOptions(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture
def trio() -> Iterator[list[ServerProcess]]:
    servers = [ServerProcess("--metrics-port", "0", "--drain-grace-s", "30") for _ in range(3)]
    try:
        for s in servers:
            s.wait_for("server.started")
        yield servers
    finally:
        for s in servers:
            s.close()


def _target(servers: list[ServerProcess]) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)


def _served(server: ServerProcess) -> int:
    return sum(1 for r in server.records if r.get("event") == "request.finished")


async def _run(
    client: AsyncTokenwireClient, options: GenerateOptions, *, failover: bool = True
) -> list[object]:
    return [event async for event in client.generate("def f():", options, failover=failover)]


async def _run_noting_start(
    client: AsyncTokenwireClient,
    options: GenerateOptions,
    started: list[None],
    *,
    failover: bool = True,
) -> list[object]:
    """`_run`, adding to `started` when the first event arrives (the stream is under way)."""
    events: list[object] = []
    async for event in client.generate("def f():", options, failover=failover):
        if not events:
            started.append(None)
        events.append(event)
    return events


async def _connected(client: AsyncTokenwireClient, servers: list[ServerProcess]) -> None:
    """Round robin only picks READY subchannels: wait until every replica has served one."""
    for _ in range(100):
        if all(_served(s) > 0 for s in servers):
            return
        await _run(client, OPTIONS)
        await asyncio.sleep(0.02)
    raise AssertionError(f"not every replica got a request: {[_served(s) for s in servers]}")


async def test_round_robin_spreads_streams_over_all_replicas(trio: list[ServerProcess]) -> None:
    """30 streams through one ipv4: target land on all three servers."""
    async with AsyncTokenwireClient(_target(trio)) as client:
        await _connected(client, trio)
        before = [_served(s) for s in trio]
        results = await asyncio.gather(*(_run(client, OPTIONS) for _ in range(30)))
    assert all(isinstance(r[-1], Completion) for r in results)

    def counts_now() -> list[int]:
        return [_served(s) - b for s, b in zip(trio, before, strict=True)]

    # A server logs request.finished a little after the stream's end reached the client.
    assert await eventually(lambda: sum(counts_now()) >= 30, within_s=10), counts_now()
    counts = counts_now()
    assert sum(counts) == 30
    assert min(counts) >= 5, counts


async def test_rollout_drains_one_replica_without_client_errors(trio: list[ServerProcess]) -> None:
    """SIGTERM one server mid-stream: its streams finish, new streams succeed elsewhere, exit 0."""
    long = GenerateOptions(max_tokens=200, temperature=0.0, ignore_eos=True)
    async with AsyncTokenwireClient(_target(trio)) as client:
        await _connected(client, trio)
        started: list[None] = []
        running = [asyncio.create_task(_run_noting_start(client, long, started)) for _ in range(6)]
        assert await eventually(lambda: len(started) == 6, within_s=30)
        leaving = trio[0]
        leaving.terminate()
        leaving.wait_for("server.draining")
        later = await asyncio.gather(*(_run(client, OPTIONS) for _ in range(12)))
        finished = await asyncio.gather(*running)
    code = await asyncio.to_thread(leaving.wait, 60)
    assert all(isinstance(r[-1], Completion) and r[-1].finish_reason == "length" for r in finished)
    assert all(isinstance(r[-1], Completion) for r in later)
    assert code == 0
    events = [r.get("event") for r in leaving.records]
    after_drain = events[events.index("server.draining") :]
    assert "request.finished" in after_drain  # it really had streams in flight
    refused = [r for r in leaving.records if r.get("event") == "request.rejected"]
    assert all("not accepting" in str(r.get("reason")) for r in refused)


async def test_kill_nine_gives_prompt_unavailable_and_survivors_serve(
    trio: list[ServerProcess],
) -> None:
    """kill -9 mid-stream, failover turned off: affected streams raise Unavailable quickly; new
    requests succeed. (With failover on, the default, they continue: see test_failover.py.)"""
    long = GenerateOptions(max_tokens=400, temperature=0.0, ignore_eos=True)
    outcomes: list[tuple[str, float]] = []
    killed_at = 0.0

    started: list[None] = []

    async def stream(client: AsyncTokenwireClient) -> None:
        try:
            await _run_noting_start(client, long, started, failover=False)
            outcomes.append(("completed", 0.0))
        except Unavailable:
            outcomes.append(("unavailable", time.monotonic() - killed_at))

    async with AsyncTokenwireClient(_target(trio)) as client:
        await _connected(client, trio)
        tasks = [asyncio.create_task(stream(client)) for _ in range(6)]
        assert await eventually(lambda: len(started) == 6, within_s=30)
        killed_at = time.monotonic()
        os.kill(trio[0].proc.pid, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        after = await asyncio.gather(*(_run(client, OPTIONS) for _ in range(6)))
    kinds = Counter(kind for kind, _ in outcomes)
    assert kinds["unavailable"] >= 1, outcomes
    assert all(delay < 5.0 for kind, delay in outcomes if kind == "unavailable")
    assert all(isinstance(r[-1], Completion) for r in after)


async def test_edge_reports_a_dead_upstream_as_an_error_event(trio: list[ServerProcess]) -> None:
    """An SSE stream whose server is killed ends with an `error` event (UNAVAILABLE)."""
    victim = trio[1]
    edge = await start_edge(f"127.0.0.1:{victim.port}")
    events: list[tuple[str, str]] = []
    body = {"prompt": "def f():", "max_tokens": 400, "ignore_eos": True}
    try:
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
            http.stream("POST", "/v1/generate", json=body) as response,
        ):
            name = ""
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    events.append((name, line.split(":", 1)[1].strip()))
                    if len(events) == 3:
                        os.kill(victim.proc.pid, signal.SIGKILL)
    finally:
        await edge.edge.stop()
    assert events[0][0] == "token"
    assert events[-1][0] == "error"
    assert json.loads(events[-1][1])["code"] == "UNAVAILABLE"
