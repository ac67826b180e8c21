"""A second SIGTERM/SIGINT cuts a drain short, for the server as for the edge: the drain notice
and the grace end at once, and streams still running end cancelled."""

from __future__ import annotations

import asyncio
import signal

import grpc
from structlog.testing import capture_logs

from tests.conftest import RunningServer, eventually, greedy
from tests.fakes import ScriptedModel
from tests.procs import EdgeProcess, LoggingProcess, ServerProcess
from tokenwire.server.config import Settings
from tokenwire.server.engine import Engine, ModelSpec
from tokenwire.server.main import engine_config
from tokenwire.server.rpc.server import TokenwireServer
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

NOTICE = {"TOKENWIRE_DRAIN_NOTICE_S": "60"}


def _signal_twice(proc: LoggingProcess, draining: str) -> int:
    """SIGTERM, and once `draining` is logged a second SIGTERM; the exit status (at most 20 s
    later)."""
    proc.terminate()
    proc.wait_for(draining, 10)
    proc.proc.send_signal(signal.SIGTERM)
    return proc.wait(20)


def test_a_second_sigterm_cuts_the_servers_drain_notice_short() -> None:
    """With a 60 s drain notice, a second SIGTERM during it ends the server's drain at once: it
    logs server.drain_cut_short (once, and no drain_timeout: no grace ran out) and exits 0
    within seconds."""
    proc = ServerProcess("--metrics-port", "0", env=NOTICE)
    try:
        proc.wait_for("server.started")
        code = _signal_twice(proc, "server.draining")
    finally:
        proc.close()
    events = [r.get("event") for r in proc.records]
    assert code == 0
    assert events.count("server.drain_cut_short") == 1
    assert "server.drain_timeout" not in events


async def test_a_second_sigterm_cuts_the_edges_drain_notice_short(paced: RunningServer) -> None:
    """With a 60 s drain notice, a second SIGTERM during it ends the edge's drain at once: it
    logs edge.drain_cut_short and exits 0 within seconds."""
    proc = await asyncio.to_thread(EdgeProcess, paced.target, env=NOTICE)
    try:
        code = await asyncio.to_thread(_signal_twice, proc, "edge.draining")
    finally:
        proc.close()
    assert code == 0
    assert [r for r in proc.records if r.get("event") == "edge.drain_cut_short"]


async def test_hurry_during_the_grace_ends_the_servers_streams_cancelled_at_once(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """Setting the server's hurry event (what a second signal does) while its drain waits out
    a 60 s grace for a running stream ends that stream with a CANCELLED completion at once,
    and the drain returns, logging server.drain_cut_short (not drain_timeout: no grace ran
    out)."""
    token = tokenizer.encode(" x")[0]
    model = ScriptedModel(spec, dict.fromkeys(range(spec.context_length), token), 0.01)
    settings = Settings(port=0, drain_grace_s=60.0)
    engine = Engine(model, tokenizer, engine_config(settings))
    server = TokenwireServer(settings)
    port = await server.start()
    await server.attach(engine)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        call = stub.Generate(greedy("def f():", max_tokens=400))
        await call.read()
        with capture_logs() as logs:
            drain = asyncio.create_task(server.drain())
            assert await eventually(lambda: not engine.accepting)
            server.hurry.set()
            messages = []
            while (message := await asyncio.wait_for(call.read(), 5)) is not grpc.aio.EOF:
                messages.append(message)
            await asyncio.wait_for(drain, 5)
    events = [line["event"] for line in logs]
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_CANCELLED
    assert len(messages) < 300
    assert events.count("server.drain_cut_short") == 1
    assert "server.drain_timeout" not in events
