"""Process lifecycle: start-up logging, SIGTERM drain with streams in flight, exit code 0."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from tests.conftest import collect, greedy
from tests.procs import ServerProcess
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc


@pytest.fixture
def server_process() -> Iterator[ServerProcess]:
    proc = ServerProcess("--drain-grace-s", "30", "--metrics-port", "0")
    try:
        proc.wait_for("server.started")
        yield proc
    finally:
        proc.close()


def test_startup_logs_model_provider_and_threads(server_process: ServerProcess) -> None:
    """The start-up line names the model, the execution provider and the thread settings."""
    started = server_process.wait_for("server.started")
    assert started["provider"] == "CPUExecutionProvider"
    assert started["model"]
    assert "intra_op_threads" in started
    assert started["level"] == "info"


async def test_each_stream_logs_one_summary_with_its_latencies(
    server_process: ServerProcess,
) -> None:
    """A finished stream's request.finished line has its token count, TTFT and inter-token
    latency percentiles (p50 <= p95 <= the whole duration)."""
    async with grpc.aio.insecure_channel(server_process.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await collect(stub, greedy("def f():", max_tokens=20, request_id="summary-1"))
    line = server_process.wait_for("request.finished")
    assert (line["request_id"], line["completion_tokens"]) == ("summary-1", 20)
    assert 0 < line["itl_p50_ms"] <= line["itl_p95_ms"] <= line["duration_ms"]
    assert line["ttft_ms"] > 0


async def test_sigterm_lets_in_flight_streams_finish_then_exits_zero(
    server_process: ServerProcess,
) -> None:
    """After SIGTERM, running streams complete normally, new ones are refused, exit code 0."""
    async with grpc.aio.insecure_channel(server_process.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        calls = [stub.Generate(greedy("def f():", max_tokens=150)) for _ in range(3)]
        for call in calls:  # every stream has started before the signal
            await call.read()
        server_process.terminate()
        server_process.wait_for("server.draining")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(stub, greedy("late", max_tokens=2), timeout=5)
        finished = await asyncio.gather(*(_drain(call) for call in calls))
    code = await asyncio.to_thread(server_process.wait, 60)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    for messages in finished:
        assert messages[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH
        assert messages[-2].usage.completion_tokens == 150
    assert code == 0
    assert server_process.wait_for("server.stopped")


async def _drain(
    call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse],
) -> list[pb.GenerateResponse]:
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


def test_finished_request_is_logged_without_its_prompt(server_process: ServerProcess) -> None:
    """One JSON summary line per request with id, counts, TTFT and reason; no prompt text."""
    with grpc.insecure_channel(server_process.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        list(stub.Generate(greedy("SECRET_PROMPT_TEXT = 1", max_tokens=4, request_id="log-1")))
    line = server_process.wait_for("request.finished")
    assert line["request_id"] == "log-1"
    assert line["completion_tokens"] == 4
    assert line["finish_reason"] == "length"
    assert line["ttft_ms"] > 0
    assert all("SECRET_PROMPT_TEXT" not in str(r) for r in server_process.records)


@pytest.mark.slow
@pytest.mark.parametrize(("verb", "event"), [("serve", "server"), ("edge", "edge")])
def test_a_busy_port_is_one_log_line_and_exit_status_2(verb: str, event: str) -> None:
    """`tokenwire serve` (or `edge`) on a port another process listens on: one JSON line
    naming the address, status 2, nothing on stderr."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "tokenwire.client.command", verb, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                "TOKENWIRE_METRICS_PORT": "0",
                "TOKENWIRE_LOG_FORMAT": "json",
                "PATH": "/usr/bin:/bin",
            },
            check=False,
        )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 2
    assert done.stderr == ""
    assert [(r["event"], r["address"]) for r in records] == [
        (f"{event}.cannot_listen", f"127.0.0.1:{port}")
    ]
