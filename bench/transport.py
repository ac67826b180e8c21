"""How many tokens/s one server process can deliver over gRPC when the model costs next to
nothing: the transport's ceiling (.venv).

A stand-in model (the CausalLM interface of OnnxCausalLM) spends a fixed time per forward with
the GIL released, as the host thread does while a GPU computes, and always picks the same
token. Everything else is real: engine, scheduler, detokeniser, the gRPC server and its
metrics observer, wired as `tokenwire serve` wires them. At each number of streams (a burst,
every stream asking for the same tokens) three systems run in turn:

- `engine-alone`: the engine with the stand-in, its consumers in this process (no transport);
- `grpc`: tokenwire's server with the stand-in in a process of its own, this process the client;
- `grpc-bare`: a grpc.aio servicer in a process of its own that streams the same token
  messages from a plain loop (no engine): what grpcio itself costs per message here.

Usage: python bench/transport.py [--step-ms 0.2] [--streams 16 64] [--new-tokens 256]
Prints one JSON object: {"step_ms", "new_tokens", "rows": [...]}; rows carry tokens/s and,
for the two servers, the server process's CPU ms per token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.queues import Queue
from typing import Any

import grpc
import numpy as np
from engine_alone import run as engine_run  # bench/ is the script's directory
from run import cpu_seconds, one_stream, run_load, stream_row

from tokenwire.server import __version__
from tokenwire.server.config import BUNDLED_MODEL_DIR, Settings
from tokenwire.server.engine import Engine, EngineObserver, ModelSpec, Padding
from tokenwire.server.engine.kv_cache import BatchKvCache
from tokenwire.server.engine.logits import HostLogits, Logits
from tokenwire.server.engine.slot_buffer import PastTensors
from tokenwire.server.engine.slot_cache import SlotKvCache
from tokenwire.server.engine.types import FloatArray, IntArray
from tokenwire.server.main import engine_config
from tokenwire.server.rpc.server import TokenwireServer
from tokenwire.server.telemetry import configure_logging
from tokenwire.server.telemetry.metrics import ServerMetrics
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

PROMPT = "The transport's ceiling"
ROUNDS = 5
TOKEN_TEXT = " x"


class StandInModel:
    """Spends `step_s` per forward with the GIL released and always picks `token`."""

    provider = "StandIn"
    padding = Padding.SHIFTABLE
    width_limit: int | None = None
    steps_continuations = False
    decodes_rows_alone = False
    pads_single_rows = False

    def __init__(self, spec: ModelSpec, token: int, step_s: float) -> None:
        self.spec = spec
        self._token = token
        self._step_s = step_s
        self._logits: dict[int, FloatArray] = {}

    def new_cache(self, rows: int, columns: int = 0, *, left_aligned: bool = False) -> BatchKvCache:
        return BatchKvCache.zeros(
            [(0, 1, 0, 1)] * 2, (2, 2), np.float32, rows, columns, left_aligned=left_aligned
        )

    def new_slot_cache(self, slots: int, capacity: int) -> SlotKvCache | None:
        return None

    def forward(
        self,
        input_ids: IntArray,
        attention_mask: IntArray,
        position_ids: IntArray,
        past: PastTensors,
        last: IntArray | None = None,
        *,
        in_place: bool = False,
        decode: bool = False,
        before_run: Callable[[], None] | None = None,
    ) -> tuple[Logits, list[FloatArray]]:
        if before_run is not None:
            before_run()
        time.sleep(self._step_s)
        rows, new = input_ids.shape
        logits = self._logits.get(rows)
        if logits is None:
            logits = np.zeros((rows, self.spec.vocab_size), dtype=np.float32)
            logits[:, self._token] = 1.0
            self._logits[rows] = logits
        grown = np.zeros((rows, 1, new, 1), dtype=np.float32)
        return HostLogits(logits), [np.concatenate([p, grown], axis=2) for p in past]


def stand_in_engine(step_s: float, streams: int, observer: EngineObserver | None = None) -> Engine:
    """An engine over the stand-in, with the bundled model's tokenizer and vocabulary."""
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    model = StandInModel(
        ModelSpec.from_dir(BUNDLED_MODEL_DIR), tokenizer.encode(TOKEN_TEXT)[0], step_s
    )
    settings = Settings(max_batch_size=max(16, streams), max_queue=256)
    return Engine(model, tokenizer, engine_config(settings), observer)


class BareServicer(pb_grpc.GenerationServiceServicer):
    """Streams max_tokens token messages from a plain loop, then usage and completion."""

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        for index in range(request.max_tokens):
            message = pb.GenerateResponse()
            token = message.token
            token.text, token.id, token.index = TOKEN_TEXT, 1, index
            yield message
        yield pb.GenerateResponse(usage=pb.Usage(completion_tokens=request.max_tokens))
        yield pb.GenerateResponse(completion=pb.Completion(finish_reason=pb.FINISH_REASON_LENGTH))

    async def _only_streams(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the bare servicer only streams")

    Cancel = GetModelInfo = Tokenize = Detokenize = _only_streams


def serve(kind: str, step_s: float, streams: int, ports: Queue[int]) -> None:
    """A server process: tokenwire's server over the stand-in, or the bare servicer."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # the server logs as in production
    configure_logging("json")

    async def main() -> None:
        if kind == "grpc-bare":
            server = grpc.aio.server()
            pb_grpc.add_GenerationServiceServicer_to_server(BareServicer(), server)
            ports.put(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
        else:
            metrics = ServerMetrics()
            metrics.describe_build(__version__, "stand-in", StandInModel.provider)
            tokenwire = TokenwireServer(Settings(port=0), observer=metrics)
            ports.put(await tokenwire.start())
            engine = stand_in_engine(step_s, streams, metrics)
            engine.warm_up()
            await tokenwire.attach(engine)
        await asyncio.Event().wait()

    asyncio.run(main())


async def served(kind: str, step_s: float, streams: int, new: int) -> dict[str, Any]:
    """tokens/s of `streams` streams of `new` tokens from a server process of `kind`."""
    context = multiprocessing.get_context("spawn")
    ports: Queue[int] = context.Queue()
    process = context.Process(target=serve, args=(kind, step_s, streams, ports), daemon=True)
    process.start()
    try:
        port = ports.get(timeout=120)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            def open_stream(prompt: str, n: int, at: float | None = None) -> Any:
                return one_stream(stub, prompt, n, at)

            await run_load(open_stream, [PROMPT], streams, "burst", None)  # warm-up
            assert process.pid is not None
            cpu0, runs = cpu_seconds(process.pid), []
            for _ in range(ROUNDS):
                runs.append(await run_load(open_stream, [PROMPT], streams, "burst", None))
            cpu = cpu_seconds(process.pid) - cpu0
        return stream_row(runs, cpu)
    finally:
        process.terminate()
        process.join(10)


async def alone(step_s: float, streams: int, new: int) -> dict[str, Any]:
    """tokens/s of the engine with the stand-in, its consumers in this process."""
    engine = stand_in_engine(step_s, streams)
    engine.start()
    try:
        await engine_run(engine, [PROMPT] * streams, 16)
        totals = sorted(
            [(await engine_run(engine, [PROMPT] * streams, new))[2] for _ in range(ROUNDS)]
        )
    finally:
        engine.shutdown()
    return {"tokens_per_s": streams * new / totals[ROUNDS // 2], "repeats": ROUNDS}


async def main(step_ms: float, streams: list[int], new: int) -> dict[str, Any]:
    rows = []
    for n in streams:
        for transport in ("engine-alone", "grpc", "grpc-bare"):
            row = (
                await alone(step_ms / 1000, n, new)
                if transport == "engine-alone"
                else await served(transport, step_ms / 1000, n, new)
            )
            rows.append({"transport": transport, "concurrency": n, **row})
    return {"step_ms": step_ms, "new_tokens": new, "rows": rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--step-ms", type=float, default=0.2)
    ap.add_argument("--streams", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.step_ms, args.streams, args.new_tokens))))
