"""A stream whose server is killed continues on another replica, as one event sequence.

Two real `tokenwire serve` processes on the bundled model; the client streams 400 tokens from
the first, which is killed with SIGKILL once 50 tokens have arrived. The client continues on
the second with the tokens it already had: indices 0..399 exactly once, one Usage, one
Completion, and, for greedy and seeded sampling, the ids an uninterrupted run gives.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import MODEL, start_edge
from tests.procs import ServerProcess
from tokenwire.client import AsyncTokenwireClient
from tokenwire.client.client import Completion, GenerateOptions, StreamEvent, Token, Usage

PROMPT = "def fib(n):"
KILL_AT = 50
OPTIONS = {
    "greedy": GenerateOptions(max_tokens=400, temperature=0.0, ignore_eos=True),
    "seeded": GenerateOptions(max_tokens=400, temperature=0.9, seed=42, ignore_eos=True),
    "unseeded": GenerateOptions(max_tokens=400, temperature=0.9, ignore_eos=True),
}

pytestmark = pytest.mark.slow


@pytest.fixture
def pair() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two server processes; the first is the one the client starts on."""
    first = ServerProcess("--metrics-port", "0")
    second = ServerProcess("--metrics-port", "0")
    first.wait_for("server.started")
    second.wait_for("server.started")
    yield first, second
    first.close()
    second.close()


def _assert_one_sequence(events: list[StreamEvent], tokens: int) -> None:
    indices = [e.index for e in events if isinstance(e, Token)]
    assert indices == list(range(tokens))
    assert [type(e) for e in events[-2:]] == [Usage, Completion]
    assert sum(isinstance(e, Usage | Completion) for e in events) == 2
    usage = events[-2]
    assert isinstance(usage, Usage)
    assert usage.completion_tokens == tokens


async def _stream(
    targets: list[str], options: GenerateOptions, kill: ServerProcess | None
) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    async with AsyncTokenwireClient(targets) as client:
        async for event in client.generate(PROMPT, options):
            events.append(event)
            if kill is not None and isinstance(event, Token) and event.index == KILL_AT:
                kill.proc.kill()
    return events


@pytest.mark.parametrize("mode", sorted(OPTIONS))
async def test_client_continues_on_the_survivor_after_kill_9(
    pair: tuple[ServerProcess, ServerProcess], mode: str
) -> None:
    """Killing the serving replica mid-stream costs the caller nothing but a delay."""
    first, second = pair
    events = await _stream([first.target, second.target], OPTIONS[mode], kill=first)
    second.wait_for("request.finished")
    _assert_one_sequence(events, 400)
    if mode != "unseeded":
        alone = await _stream([second.target], OPTIONS[mode], kill=None)
        assert [e.id for e in events if isinstance(e, Token)] == [
            e.id for e in alone if isinstance(e, Token)
        ]


def test_cli_json_stream_continues_after_kill_9(pair: tuple[ServerProcess, ServerProcess]) -> None:
    """`tokenwire generate --json --target a,b` prints one uninterrupted event per line."""
    first, second = pair
    command = [
        sys.executable,
        "-m",
        "tokenwire.client.command",
        "generate",
        PROMPT,
        "--json",
        "--target",
        f"{first.target},{second.target}",
        "--max-tokens",
        "400",
        "--temperature",
        "0",
        "--ignore-eos",
    ]
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(json.loads(line))
            if len(lines) == KILL_AT:
                first.proc.kill()
        assert proc.wait(60) == 0
    second.wait_for("request.finished")
    tokens = [line["token"] for line in lines if "token" in line]
    assert [t["index"] for t in tokens] == list(range(400))
    assert [next(iter(line)) for line in lines[-2:]] == ["usage", "completion"]


async def test_one_round_robin_target_continues_on_another_address(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    """With one ipv4: target listing both replicas, two concurrent streams land one on each;
    killing one replica mid-stream, both streams still arrive whole."""
    first, second = pair
    async with AsyncTokenwireClient(f"ipv4:{first.target},{second.target}") as client:
        short = GenerateOptions(max_tokens=2, temperature=0.0)
        for _ in range(4):  # round robin reaches both replicas once they are READY
            [_ async for _ in client.generate(PROMPT, short)]

        async def stream(kill: bool) -> list[StreamEvent]:
            events: list[StreamEvent] = []
            async for event in client.generate(PROMPT, OPTIONS["greedy"]):
                events.append(event)
                if kill and isinstance(event, Token) and event.index == KILL_AT:
                    first.proc.kill()
            return events

        both = await asyncio.gather(stream(True), stream(False))
    for events in both:
        _assert_one_sequence(events, 400)


BODY = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}


async def test_edge_native_stream_continues_after_its_server_is_killed(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    """A native SSE stream through an edge whose --grpc-target lists both replicas: the first
    is killed after 50 token events, and the stream still has tokens 0..399, usage, done."""
    first, second = pair
    edge = await start_edge(f"{first.target},{second.target}")
    events = []
    try:
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=60) as http,
            aconnect_sse(http, "POST", "/v1/generate", json=BODY) as source,
        ):
            async for event in source.aiter_sse():
                events.append(event)
                if sum(e.event == "token" for e in events) == KILL_AT and event.event == "token":
                    first.proc.kill()
    finally:
        await edge.edge.stop()
    second.wait_for("request.finished")
    assert [json.loads(e.data)["index"] for e in events if e.event == "token"] == list(range(400))
    assert [e.event for e in events[-2:]] == ["usage", "done"]


async def test_edge_openai_stream_continues_after_its_server_is_killed(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    """An OpenAI completions stream through the edge loses its server after 50 chunks and
    still ends with finish_reason length and no error chunk."""
    first, second = pair
    edge = await start_edge(f"{first.target},{second.target}")
    chunks = []
    try:
        async with (
            httpx.AsyncClient(base_url=edge.url, timeout=60) as http,
            http.stream(
                "POST", "/v1/completions", json={**BODY, "model": MODEL, "stream": True}
            ) as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line.removeprefix("data: ")))
                    if len(chunks) == KILL_AT:
                        first.proc.kill()
    finally:
        await edge.edge.stop()
    second.wait_for("request.finished")
    alone = await _stream([second.target], OPTIONS["greedy"], kill=None)
    assert "error" not in json.dumps(chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] or "" for c in chunks if c["choices"])
    assert text == "".join(e.text for e in alone if isinstance(e, Token))
