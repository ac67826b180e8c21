"""`make bench`: tokenwire against the plain ORT loop and ORT GenAI, side by side, one run.

Runs in the service environment (.venv); peers run in bench/.venv (see peers.py). Writes
bench/results/latest.json; bench/report.py turns it into docs/benchmarks.md with plots.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import httpx
import onnxruntime
from httpx_sse import aconnect_sse
from peers import (  # bench/ is on sys.path
    MIXED,
    NO_TOP_K,
    NO_TOP_K_VOCAB,
    SAMPLINGS,
    arrival_offsets,
    output_lengths,
)
from tokenizers import Tokenizer

from tokenwire.common.stats import percentile
from tokenwire.server.cpus import CpuBudget, cpu_budget
from tokenwire.server.engine import EngineConfig
from tokenwire.server.process import TokenwireProcess
from tokenwire.server.tokenizer import Tokenizer as ServerTokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
BENCH_PY = ROOT / "bench" / ".venv" / "bin" / "python"
RESULTS = ROOT / "bench" / "results" / "latest.json"
PROMPT_TOKENS, NEW_TOKENS = 32, 128
TICK = os.sysconf("SC_CLK_TCK")


@functools.cache
def threads() -> CpuBudget:
    """The intra-op threads every system computes with: tokenwire's own default, the physical
    cores this process may run on capped by its CPU quota (`tokenwire serve`'s cpu_budget),
    read once, when first needed."""
    return cpu_budget()


def pct(values: list[float], q: float) -> float:
    """Nearest-rank, the rule the client's --stats and the server's log summary use."""
    value = percentile(values, q)
    return float("nan") if value is None else value


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def make_prompt(tokenizer: Tokenizer, n: int, seed: int = 0) -> str:
    """A text that is exactly n tokens long (stdlib code, shifted by seed)."""
    source = (Path(os.__file__).parent / "argparse.py").read_text()
    ids = tokenizer.encode(source[seed * 97 :]).ids
    for extra in range(8):
        text = tokenizer.decode(ids[: n + extra])
        if len(tokenizer.encode(text).ids) == n:
            return text
    return tokenizer.decode(ids[:n])


class Process(TokenwireProcess):
    """A tokenwire subprocess, ready once its JSON log says so; its log tells its port, and its
    ready event the settings it runs with (`ready`)."""

    def __init__(self, args: list[str], env: dict[str, str], ready_event: str) -> None:
        super().__init__(*args, env={"TOKENWIRE_LOG_FORMAT": "json", **env})
        self.ready = self.wait_for(ready_event, 180)
        listening = "server.listening" if args[0] == "serve" else "edge.listening"
        self.port = self.listening_port(listening)


def start_server(model_dir: Path, metrics: bool = False, chunk: int = 256) -> Process:
    env = {
        "TOKENWIRE_LOG_FORMAT": "json",
        "TOKENWIRE_MAX_BATCH_SIZE": "32",
        "TOKENWIRE_MAX_QUEUE": "256",
        "TOKENWIRE_PREFILL_CHUNK_TOKENS": str(chunk),
        "TOKENWIRE_INTRA_OP_THREADS": str(threads().cpus),
    }
    args = [
        "serve",
        "--port",
        "0",
        "--model-dir",
        str(model_dir),
        "--metrics-port",
        "19464" if metrics else "0",
    ]
    return Process(args, env, "server.started")


async def one_stream(
    stub: pb_grpc.GenerationServiceStub,
    prompt: str,
    new: int,
    at: float | None = None,
    *,
    decoding: str = "greedy",
) -> dict[str, Any]:
    """One stream of `new` tokens: greedy, or sampled with SAMPLINGS[decoding]. Its clock
    starts at `at`, the request's scheduled arrival (time.perf_counter()), where given, else
    when it is sent: a client late to send counts against the stream, as it does for the peers
    that serve the same load (their clocks run from each request's arrival)."""
    settings = SAMPLINGS.get(decoding, {"temperature": 0.0})
    sampling = pb.SamplingParams(
        temperature=settings["temperature"],
        top_k=int(settings.get("top_k", 0)),
        top_p=settings.get("top_p", 1.0),
    )
    request = pb.GenerateRequest(prompt=prompt, max_tokens=new, ignore_eos=True, sampling=sampling)
    sent = time.perf_counter() if at is None else at
    times: list[float] = []
    call: Any = stub.Generate(request, timeout=600)  # an aio call: the stubs type the sync one
    async for message in call:
        if message.WhichOneof("event") == "token":
            times.append(time.perf_counter())
    return {"sent": sent, "times": times}


async def edge_stream(
    http: httpx.AsyncClient, prompt: str, new: int, at: float | None = None
) -> dict[str, Any]:
    """one_stream through the SSE edge (greedy), its clock started likewise."""
    body = {"prompt": prompt, "max_tokens": new, "ignore_eos": True, "temperature": 0}
    sent = time.perf_counter() if at is None else at
    times: list[float] = []
    async with aconnect_sse(http, "POST", "/v1/generate", json=body) as source:
        async for event in source.aiter_sse():
            if event.event == "token":
                times.append(time.perf_counter())
    return {"sent": sent, "times": times}


def stream_row(
    runs: list[list[dict[str, Any]]], cpu: float | None, client_cpu: float | None = None
) -> dict[str, Any]:
    """Throughput: median over repeated runs; latency percentiles: all streams pooled. CPU per
    token, where measured: the server process's (`cpu`) and the load generator's, this
    process (`client_cpu`), apart."""
    rates = sorted(
        sum(len(s["times"]) for s in run)
        / (max(s["times"][-1] for s in run) - min(s["sent"] for s in run))
        for run in runs
    )
    streams = [s for run in runs for s in run]
    tokens = sum(len(s["times"]) for s in streams)
    ttft = [(s["times"][0] - s["sent"]) * 1000 for s in streams]
    gaps = [
        (b - a) * 1000 for s in streams for a, b in zip(s["times"], s["times"][1:], strict=False)
    ]
    per_stream = [len(s["times"]) / (s["times"][-1] - s["sent"]) for s in streams]
    row = {
        "tokens_per_s": rates[len(rates) // 2],
        # Run-to-run spread of identical runs: differences below it are noise.
        "tokens_per_s_spread": (rates[-1] - rates[0]) / rates[len(rates) // 2],
        "spread_over": "runs",
        "per_stream_tokens_per_s": statistics.median(per_stream),
        "repeats": len(runs),
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
        "streams": len(streams),
        "tokens": tokens,
    }
    if cpu is not None:
        row["server_cpu_ms_per_token"] = cpu * 1000 / tokens
    if client_cpu is not None:
        row["client_cpu_ms_per_token"] = client_cpu * 1000 / tokens
    return row


async def run_load(
    open_stream: Any, prompts: list[str], concurrency: int, arrival: str, rate: float | None
) -> list[dict[str, Any]]:
    """One load: open_stream(prompt, max_tokens, arrival) for each request, at its arrival
    time; each request's clock starts at its scheduled arrival (`arrival`, passed on), as the
    peers' clocks do, not when this client gets round to sending it."""
    offsets = arrival_offsets(concurrency, arrival, rate)
    lengths = output_lengths(arrival, len(offsets), NEW_TOKENS)
    started = time.perf_counter()
    if arrival == "burst":
        return list(
            await asyncio.gather(
                *(
                    open_stream(prompts[i % len(prompts)], lengths[i], started)
                    for i in range(concurrency)
                )
            )
        )
    tasks = []
    for i, offset in enumerate(offsets):
        await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
        stream = open_stream(prompts[i % len(prompts)], lengths[i], started + offset)
        tasks.append(asyncio.create_task(stream))
    return list(await asyncio.gather(*tasks))


def repeats_for(concurrency: int, arrival: str) -> int:
    if arrival != "burst":
        return 1
    return 5 if concurrency == 1 else 3


async def costed_load(
    open_stream: Any,
    prompts: list[str],
    concurrency: int,
    arrival: str,
    *,
    rate: float | None,
    pid: int,
) -> tuple[list[dict[str, Any]], float, float]:
    """One load (run_load), with the CPU seconds the server process (pid) and this process,
    the load generator, spent on it."""
    server0, client0 = cpu_seconds(pid), time.process_time()
    run = await run_load(open_stream, prompts, concurrency, arrival, rate)
    return run, cpu_seconds(pid) - server0, time.process_time() - client0


async def measure(
    open_stream: Any,
    prompts: list[str],
    concurrency: int,
    arrival: str,
    *,
    rate: float | None,
    pid: int,
) -> dict[str, Any]:
    runs, server, client = [], 0.0, 0.0
    for _ in range(repeats_for(concurrency, arrival)):
        run, server_cpu, client_cpu = await costed_load(
            open_stream, prompts, concurrency, arrival, rate=rate, pid=pid
        )
        runs.append(run)
        server, client = server + server_cpu, client + client_cpu
    return stream_row(runs, server, client)


async def service_rows(
    server: Process,
    prompts: list[str],
    levels: list[int],
    arrivals: list[str],
    *,
    label: str = "grpc",
    durations: dict[int, float] | None = None,
) -> list[dict[str, Any]]:
    """Burst rows record each level's stream duration; Poisson rows use it (Little's law)."""
    durations = {} if durations is None else durations
    rows = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        # Warm the connection and ORT's memory arena for every batch shape used below.
        await asyncio.gather(*(one_stream(stub, p, 16) for p in prompts[: max(levels)]))
        await one_stream(stub, prompts[0], NEW_TOKENS)
        for arrival in arrivals:
            for c in levels:
                if arrival == "poisson" and c == 1:
                    continue
                rate = c / durations[c] if arrival == "poisson" else None
                row = await measure(
                    functools.partial(one_stream, stub),
                    prompts,
                    c,
                    arrival,
                    rate=rate,
                    pid=server.proc.pid,
                )
                durations[c] = NEW_TOKENS / row["per_stream_tokens_per_s"]
                rows.append(
                    {
                        "system": "tokenwire",
                        "transport": label,
                        "concurrency": c,
                        "arrival": arrival,
                        **row,
                    }
                )
                print(
                    f"  {label:5s} c={c:<3d} {arrival:7s} {row['tokens_per_s']:8.1f} tok/s  "
                    f"ttft p50 {row['ttft_p50_ms']:7.1f} ms",
                    flush=True,
                )
    return rows


async def paired_rows(
    server: Process, prompts: list[str], levels: list[int], rounds: int = 3
) -> list[dict[str, Any]]:
    """Edge and direct gRPC on the same server, alternating, so drift hits both alike."""
    edge = Process(
        ["edge", "--port", "0", "--grpc-target", f"127.0.0.1:{server.port}"],
        {"TOKENWIRE_LOG_FORMAT": "json"},
        "edge.listening",
    )
    rows = []
    try:
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge.port}", timeout=600) as http,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            stub = pb_grpc.GenerationServiceStub(channel)
            await asyncio.gather(*(edge_stream(http, p, 16) for p in prompts[: max(levels)]))
            await one_stream(stub, prompts[0], 16)
            for c in levels:
                via: dict[str, list[list[dict[str, Any]]]] = {"edge": [], "grpc": []}
                for _ in range(rounds * (3 if c == 1 else 1)):
                    via["grpc"].append(
                        await run_load(
                            functools.partial(one_stream, stub),
                            prompts,
                            c,
                            "burst",
                            None,
                        )
                    )
                    via["edge"].append(
                        await run_load(
                            functools.partial(edge_stream, http), prompts, c, "burst", None
                        )
                    )
                for transport, runs in via.items():
                    row = stream_row(runs, None)
                    rows.append(
                        {
                            "system": "tokenwire",
                            "transport": f"{transport}-paired",
                            "concurrency": c,
                            "arrival": "burst",
                            **row,
                        }
                    )
                    print(
                        f"  {transport}-paired c={c:<3d} {row['tokens_per_s']:8.1f} tok/s  "
                        f"ttft p50 {row['ttft_p50_ms']:7.1f} ms",
                        flush=True,
                    )
    finally:
        edge.stop()
    return rows


async def metrics_ab(model_dir: Path, prompts: list[str], rounds: int) -> list[dict[str, Any]]:
    """16 streams on fresh servers with the exporter on/off in ABBA order, cancelling drift."""
    runs: dict[bool, list[list[dict[str, Any]]]] = {True: [], False: []}
    for i in range(rounds):
        for metrics in (True, False) if i % 2 == 0 else (False, True):
            server = start_server(model_dir, metrics=metrics)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                    stub = pb_grpc.GenerationServiceStub(channel)
                    await asyncio.gather(*(one_stream(stub, p, 16) for p in prompts[:16]))
                    for _ in range(3):
                        runs[metrics].append(
                            await run_load(
                                functools.partial(one_stream, stub),
                                prompts,
                                16,
                                "burst",
                                None,
                            )
                        )
            finally:
                server.stop()
    rows = []
    for metrics, label in ((True, "grpc-metrics-on"), (False, "grpc-metrics-off")):
        row = stream_row(runs[metrics], None)
        rows.append(
            {
                "system": "tokenwire",
                "transport": label,
                "concurrency": 16,
                "arrival": "burst",
                **row,
            }
        )
        print(f"  {label} c=16 {row['tokens_per_s']:8.1f} tok/s", flush=True)
    return rows


async def fairness(
    model_dir: Path, prompts: list[str], long_prompt: str, chunk: int
) -> dict[str, Any]:
    """ITL of 4 running streams while a long prompt is prefilled beside them."""
    server = start_server(model_dir, chunk=chunk)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            await one_stream(stub, prompts[0], 4)
            running = [asyncio.create_task(one_stream(stub, p, NEW_TOKENS)) for p in prompts[:4]]
            await asyncio.sleep(0.4)
            arrived = time.perf_counter()
            long = await one_stream(stub, long_prompt, 1)
            prefilled = long["times"][0]
            streams = await asyncio.gather(*running)
    finally:
        server.stop()
    during: list[float] = []
    before: list[float] = []
    for s in streams:
        for a, b in zip(s["times"], s["times"][1:], strict=False):
            (during if b >= arrived and a <= prefilled else before).append((b - a) * 1000)
    return {
        "prefill_chunk_tokens": chunk,
        "long_prompt_tokens": 400,
        "long_prompt_ttft_ms": (prefilled - arrived) * 1000,
        "itl_p50_ms_otherwise": pct(before, 50),
        "itl_max_ms_during_prefill": max(during or [0]),
    }


async def headline(
    server: Process, model: Path, prompts: list[str], rounds: int
) -> list[dict[str, Any]]:
    """The ratio rows, interleaved: loop, GenAI and tokenwire take turns, `rounds` times.

    The machine's speed drifts by more than the differences being measured; taking turns
    exposes every system to the same drift, and each row keeps its median.
    """
    peers: dict[tuple[str, int], list[dict[str, Any]]] = {}
    service: dict[int, tuple[list[list[dict[str, Any]]], list[float], list[float]]] = {
        1: ([], [], []),
        16: ([], [], []),
    }
    # Each round's runs of tokenwire, by concurrency: one row per round, for the paired ratio.
    by_round: dict[int, list[list[list[dict[str, Any]]]]] = {1: [], 16: []}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await asyncio.gather(*(one_stream(stub, p, 16) for p in prompts[:16]))
        for _ in range(rounds):
            for batch in (1, 16):
                for mode, sub_dir in (("raw", "onnx"), ("genai", "genai")):
                    peers.setdefault((mode, batch), []).append(peer(mode, model / sub_dir, batch))
                runs, server_cpu, client_cpu = service[batch]
                by_round[batch].append([])
                for _ in range(3 if batch == 1 else 1):
                    run, server_s, client_s = await costed_load(
                        functools.partial(one_stream, stub),
                        prompts,
                        batch,
                        "burst",
                        rate=None,
                        pid=server.proc.pid,
                    )
                    runs.append(run)
                    by_round[batch][-1].append(run)
                    server_cpu.append(server_s)
                    client_cpu.append(client_s)
    rows = []
    for (_, _), found in sorted(peers.items()):
        median = sorted(found, key=lambda r: r["tokens_per_s"])[len(found) // 2]
        rates = sorted(r["tokens_per_s"] for r in found)
        rows.append(
            {
                **median,
                "repeats": len(found),
                "tokens_per_s_spread": (rates[-1] - rates[0]) / rates[len(rates) // 2],
                "spread_over": "rounds",
                "rounds": [{k: r[k] for k in ("tokens_per_s", "ttft_p50_ms")} for r in found],
            }
        )
    for batch, (runs, server_cpu, client_cpu) in service.items():
        row = stream_row(runs, sum(server_cpu), sum(client_cpu))
        rows.append(
            {
                "system": "tokenwire",
                "transport": "grpc",
                "concurrency": batch,
                "arrival": "burst",
                **row,
                "rounds": [_round(each) for each in by_round[batch]],
            }
        )
        print(
            f"  grpc  c={batch:<3d} burst   {row['tokens_per_s']:8.1f} tok/s  "
            f"ttft p50 {row['ttft_p50_ms']:7.1f} ms (interleaved)",
            flush=True,
        )
    return rows


def _round(runs: list[list[dict[str, Any]]]) -> dict[str, float]:
    """One round's tokens/s and TTFT p50 of tokenwire's runs in it."""
    row = stream_row(runs, None)
    return {"tokens_per_s": row["tokens_per_s"], "ttft_p50_ms": row["ttft_p50_ms"]}


class Graph(NamedTuple):
    """One graph form of the same weights, and the peers that run it."""

    name: str
    sub_dir: str
    peers: tuple[str, ...]
    # GenAI's Engine serving tokenwire's own 16-stream workloads (burst and staggered).
    engine: bool


GRAPHS = [
    Graph("genai-fp32", "genai", ("raw", "genai"), engine=True),
    Graph("genai-int4", "genai-int4", ("raw", "genai"), engine=False),
]
Found = dict[tuple[str, str, int, str, str], list[dict[str, Any]]]
# tokenwire's loads on each graph: 1 stream, a burst of 16, 16 with staggered arrivals.
LOADS: list[dict[str, Any]] = [
    {"concurrency": 1, "arrival": "burst"},
    {"concurrency": 16, "arrival": "burst"},
    {"concurrency": 16, "arrival": "poisson"},
    {"concurrency": 16, "arrival": MIXED},
]


def keep(found: Found, row: dict[str, Any]) -> None:
    """One round's row, with the rows of the same system and load from the other rounds."""
    row.setdefault("decoding", "greedy")
    key = (row["system"], row["transport"], row["concurrency"], row["arrival"], row["decoding"])
    found.setdefault(key, []).append(row)


async def graph_rows(
    model: Path, prompts: list[str], rounds: int, single_rounds: int
) -> list[dict[str, Any]]:
    """tokenwire serving each GenAI graph against ORT GenAI and the plain loop on that graph,
    taking turns: 1 stream, a burst of 16, 16 with staggered (Poisson) arrivals, and the engine
    alone in its own process (no transport). The 16-stream loads run in `rounds` rounds, the
    cheaper 1-stream ones in `single_rounds`."""
    rows: list[dict[str, Any]] = []
    for graph in GRAPHS:
        model_dir = model / graph.sub_dir
        tokenizer = ServerTokenizer.from_dir(model_dir)
        # The ids the server makes of each prompt text, for the peers that take tokenwire's load.
        ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
        found: Found = {}
        server = start_server(model_dir)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                await asyncio.gather(*(one_stream(stub, p, 16) for p in prompts[:16]))
                # One round of every 1-stream system first, not counted: the first round ran
                # slower for tokenwire than every later one in every ratio (0.65x against
                # 0.85-1.0x), whatever the system measured first.
                play = functools.partial(
                    graph_round,
                    graph,
                    model_dir,
                    service=(stub, server.proc.pid),
                    prompts=prompts,
                    ids=ids,
                )
                print(f"  {graph.name}: warm-up round (not counted)", flush=True)
                await play(found={}, full=False, policies={})
                policies = (
                    await static_policies(model_dir, stub, prompts, ids) if graph.engine else {}
                )
                for i in range(single_rounds):
                    await play(found=found, full=i < rounds, policies=policies)
        finally:
            server.stop()
        rows += [median_row(graph.name, runs) for runs in found.values()]
    return rows


async def graph_round(
    graph: Graph,
    model_dir: Path,
    *,
    service: tuple[pb_grpc.GenerationServiceStub, int],
    prompts: list[str],
    ids: list[list[int]],
    found: Found,
    full: bool,
    policies: dict[str, dict[str, Any]],
) -> None:
    """Every system once, in turn; `full` adds the 16-stream loads. The staggered loads' rate
    comes from this round's burst of 16 (Little's law); GenAI's Engine and GenAI's Generator
    as a static-batching server (with the policy `policies` holds for the load) get the same
    arrivals, prompts and lengths as tokenwire, on the graph that has those peers (the
    mixed-length load runs only there)."""
    stub, pid = service
    for batch in (1, 16) if full else (1,):
        for mode in graph.peers:
            keep(found, peer(mode, model_dir, batch))
    alone = engine_alone(model_dir)
    keep(found, {"system": "tokenwire", "transport": "engine-alone", **LOADS[0], **alone})
    loads = [load for load in LOADS if graph.engine or load["arrival"] != MIXED]
    for load in loads if full else loads[:1]:
        c, arrival = load["concurrency"], load["arrival"]
        rate = (
            None
            if arrival == "burst"
            else c
            * found[("tokenwire", "grpc", 16, "burst", "greedy")][-1]["per_stream_tokens_per_s"]
            / NEW_TOKENS
        )
        row = await measure(
            functools.partial(one_stream, stub),
            prompts,
            c,
            arrival,
            rate=rate,
            pid=pid,
        )
        keep(found, {"system": "tokenwire", "transport": "grpc", **load, **row})
        if c == 16 and graph.engine:
            offsets = arrival_offsets(c, arrival, rate)
            lengths = output_lengths(arrival, len(offsets), NEW_TOKENS)
            keep(found, engine_peer(model_dir, offsets, lengths, ids, arrival))
            if arrival != "burst":
                picked = policies[arrival]
                row = static_server_peer(model_dir, offsets, lengths, ids, picked["policy"])
                keep(found, {**row, "arrival": arrival, **picked})
    for decoding in SAMPLINGS if full and graph.engine else ():
        # Sampled decoding, a burst of 16 against GenAI's static batch of 16 sampling alike.
        keep(found, peer("genai", model_dir, 16, decoding=decoding))
        row = await measure(
            functools.partial(one_stream, stub, decoding=decoding),
            prompts,
            16,
            "burst",
            rate=None,
            pid=pid,
        )
        keep(
            found,
            {"system": "tokenwire", "transport": "grpc", **LOADS[1], **row, "decoding": decoding},
        )


async def static_policies(
    model_dir: Path,
    stub: pb_grpc.GenerationServiceStub,
    prompts: list[str],
    ids: list[list[int]],
) -> dict[str, dict[str, Any]]:
    """The static-batching server's dispatch policy for each staggered load, picked once, in
    the warm-up: one run of each policy on the load (its rate from one burst of 16 through
    tokenwire, as a round has it), the faster by tokens/s. Every counted round then runs the
    pick alone, so the row keeps no faster noise of two runs."""
    burst = await run_load(functools.partial(one_stream, stub), prompts, 16, "burst", None)
    rate = 16 * stream_row([burst], None)["per_stream_tokens_per_s"] / NEW_TOKENS
    picks = {}
    for arrival in ("poisson", MIXED):
        offsets = arrival_offsets(16, arrival, rate)
        lengths = output_lengths(arrival, len(offsets), NEW_TOKENS)
        tried = {
            policy: static_server_peer(model_dir, offsets, lengths, ids, policy)["tokens_per_s"]
            for policy in STATIC_POLICIES
        }
        policy = max(tried, key=lambda name: tried[name])
        picks[arrival] = {"policy": policy, "policy_warm_up_tokens_per_s": tried}
        print(f"  static server on {arrival}: policy {policy} (warm-up {tried})", flush=True)
    return picks


def median_row(graph: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median round by tokens/s, with every round's tokens/s and TTFT p50 (for the paired
    ratios, which divide within a round), and the spread of tokens/s over the rounds (highest
    less lowest, over the median; `repeats` counts the rounds). A round's own spread, over the
    runs inside it, is not the row's: the median round's would pass for the spread of all."""
    median = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
    rates = sorted(r["tokens_per_s"] for r in runs)
    print(
        f"  {graph:10s} {median['system']:16s} {median['transport']:12s} "
        f"c={median['concurrency']:<3d} {median['arrival']:12s} "
        f"{median['tokens_per_s']:8.1f} tok/s  ttft p50 {median['ttft_p50_ms']:7.1f} ms",
        flush=True,
    )
    return {
        **median,
        "graph": graph,
        "repeats": len(runs),
        "tokens_per_s_spread": (rates[-1] - rates[0]) / median["tokens_per_s"],
        "spread_over": "rounds",
        "rounds": [{k: r[k] for k in ("tokens_per_s", "ttft_p50_ms")} for r in runs],
    }


def engine_alone(model_dir: Path) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "engine_alone.py"),
            str(model_dir),
            *("--streams", "1", "--threads", str(threads().cpus)),
            *("--prompt-tokens", str(PROMPT_TOKENS), "--new-tokens", str(NEW_TOKENS)),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def transport_ceiling() -> dict[str, Any]:
    """bench/transport.py: tokens/s one server process delivers when the model costs next to
    nothing (engine alone, tokenwire over gRPC, a bare grpc.aio servicer)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "transport.py")],
        check=True,
        capture_output=True,
        text=True,
    )
    found: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    for row in found["rows"]:
        print(
            f"  {row['transport']:12s} c={row['concurrency']:<3d} {row['tokens_per_s']:8.0f} tok/s",
            flush=True,
        )
    return found


def run_peer(
    mode: str, model_dir: Path, *flags: str, workload: str | None = None
) -> dict[str, Any]:
    """One peers.py measurement in bench/.venv, its JSON row; the peer computes with
    tokenwire's thread count (threads())."""
    out = subprocess.run(
        [
            *(str(BENCH_PY), str(ROOT / "bench" / "peers.py"), mode, str(model_dir), *flags),
            *("--threads", str(threads().cpus)),
        ],
        input=workload,
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def top_k_name(top_k: float) -> str:
    """How a row names GenAI's top_k (peers.NO_TOP_K_VOCAB stands for the vocabulary)."""
    return "vocabulary" if top_k == NO_TOP_K_VOCAB else str(int(top_k))


def peer(mode: str, model_dir: Path, batch: int, *, decoding: str = "greedy") -> dict[str, Any]:
    """A static batch of the plain loop or GenAI's Generator; GenAI may sample (SAMPLINGS).
    A sampling without top-k runs GenAI with each of its spellings of it (peers.NO_TOP_K) and
    keeps the faster, whose top_k the row records."""
    settings = SAMPLINGS.get(decoding)
    samplings: list[dict[str, float] | None] = [settings]
    if settings is not None and "top_k" not in settings:
        samplings = [{**settings, "top_k": top_k} for top_k in NO_TOP_K]
    tried = [
        run_peer(
            mode,
            model_dir,
            *("--batch", str(batch), "--prompt-tokens", str(PROMPT_TOKENS)),
            *("--new-tokens", str(NEW_TOKENS)),
            *(("--sampling", json.dumps(sampling)) if sampling else ()),
        )
        | ({"genai_top_k": top_k_name(sampling["top_k"])} if sampling else {})
        for sampling in samplings
    ]
    row = max(tried, key=lambda r: r["tokens_per_s"])
    if len(tried) > 1:
        row["genai_top_k_tokens_per_s"] = {r["genai_top_k"]: r["tokens_per_s"] for r in tried}
    print(
        f"  {mode:5s} b={batch:<3d} {decoding:7s} {row['tokens_per_s']:8.1f} tok/s  "
        f"ttft {row['ttft_p50_ms']:7.1f} ms"
        + (f"  (top_k {row['genai_top_k_tokens_per_s']})" if len(tried) > 1 else ""),
        flush=True,
    )
    return {
        "system": {"raw": "ort-loop", "genai": "ort-genai"}[mode],
        "transport": "in-process",
        "concurrency": batch,
        "arrival": "static-batch",
        "decoding": decoding,
        **row,
    }


def served_workload(offsets: list[float], lengths: list[int], ids: list[list[int]]) -> str:
    """A load for the in-process peers: request i arrives at offsets[i] with prompt ids i and
    asks for lengths[i] tokens."""
    return json.dumps(
        {
            "arrivals": offsets,
            "lengths": lengths,
            "prompts": [ids[i % len(ids)] for i in range(len(offsets))],
        }
    )


def engine_peer(
    model_dir: Path, offsets: list[float], lengths: list[int], ids: list[list[int]], arrival: str
) -> dict[str, Any]:
    """GenAI's Engine (peers.py genai-engine) serving request i at offsets[i] with prompt i."""
    row = run_peer("genai-engine", model_dir, workload=served_workload(offsets, lengths, ids))
    concurrency = 16
    print(
        f"  genai Engine c={concurrency:<3d} {arrival:13s} {row['tokens_per_s']:8.1f} tok/s  "
        f"ttft p50 {row['ttft_p50_ms']:7.1f} ms",
        flush=True,
    )
    return {
        "system": "ort-genai-engine",
        "transport": "in-process",
        "concurrency": concurrency,
        "arrival": arrival,
        **row,
    }


STATIC_POLICIES = ("queued", "full")
"""The static-batching server's dispatch policies (peers.py static_batches)."""


def static_server_peer(
    model_dir: Path, offsets: list[float], lengths: list[int], ids: list[list[int]], policy: str
) -> dict[str, Any]:
    """GenAI's Generator as a static-batching server of at most 16 (peers.py genai-static) on
    the same load, under one of its dispatch policies."""
    batch = 16
    workload = served_workload(offsets, lengths, ids)
    flags = ("--batch", str(batch), "--policy", policy)
    row = run_peer("genai-static", model_dir, *flags, workload=workload)
    print(
        f"  genai static server ({policy}) c={batch:<3d} "
        f"{row['tokens_per_s']:8.1f} tok/s  ttft p50 {row['ttft_p50_ms']:7.1f} ms",
        flush=True,
    )
    return {
        "system": "ort-genai-static-server",
        "transport": "in-process",
        "concurrency": batch,
        **row,
        "policy": policy,
    }


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = subprocess.run(
        [
            str(BENCH_PY),
            "-c",
            "import onnxruntime, onnxruntime_genai; "
            "print(onnxruntime.__version__, onnxruntime_genai.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime_service": onnxruntime.__version__,
        "onnxruntime_peers": versions[0],
        "onnxruntime_genai": versions[1],
        "git_commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def model_facts(onnx_dir: Path) -> dict[str, Any]:
    """The benchmark model as built (bench/build_models.py, its MANIFEST.json): size, context,
    vocabulary, and how many ids its tokenizer names (tokenwire samples over those, GenAI over
    every column of the logits: the two must be equal for sampled rows to compare alike)."""
    config = json.loads((onnx_dir / "config.json").read_text())
    manifest = json.loads((onnx_dir / "MANIFEST.json").read_text())
    return {
        "name": "bench-56m",
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "vocab": config["vocab_size"],
        "tokenizer_vocab": ServerTokenizer.from_dir(onnx_dir).vocab_size,
        "context": config["max_position_embeddings"],
        "params_millions": round(manifest["parameters"] / 1e6, 1),
        "training": f"trained for {manifest['hyperparameters']['steps']} steps on CPython's "
        "sources",
        "corpus_chars": manifest["corpus"]["chars"],
        "dtype": "fp32",
        "provider": "CPUExecutionProvider",
    }


def slot_cache_text(max_batch: int, max_kv_tokens: int, context: int) -> str:
    """The preallocated cache tokenwire's scheduler makes on a graph that writes its cache in
    place (service/engine/scheduler.py: min(max batch, max_kv_tokens // context) slots)."""
    slots = min(max_batch, max(1, max_kv_tokens // context))
    return f"{slots} slots x {context} positions"


def peer_knobs(
    genai_dir: Path, rows: list[dict[str, Any]], server: dict[str, Any], model: dict[str, Any]
) -> dict[str, str]:
    """Every setting each system ran with, as written in the report; `server` is tokenwire's
    server.started log record (the limits it ran with), `model` model_facts."""
    genai = json.loads((genai_dir / "genai_config.json").read_text())
    n = threads().cpus
    options = {**genai["model"]["decoder"].get("session_options", {}), "intra_op_num_threads": n}
    share = genai.get("search", {}).get("past_present_share_buffer")
    engine = next(r["knobs"] for r in rows if r["system"] == "ort-genai-engine")
    picks = {r["arrival"]: r["policy"] for r in rows if r["system"] == "ort-genai-static-server"}
    context, vocab, named = model["context"], model["vocab"], model["tokenizer_vocab"]
    alone = EngineConfig(max_batch_size=16)
    kv = server["max_kv_tokens"]
    search = (
        "search options max_length = min_length = prompt + new tokens (GenAI forbids EOS "
        "until min_length, which is how EOS is ignored), batch_size the rows; "
        f"past_present_share_buffer {json.dumps(share)} (genai_config.json's search section: "
        "one key/value buffer of max_length positions per Generator, written in place); "
        f"it samples over every one of the {vocab} columns of the logits"
    )
    return {
        "ort-genai": "model.decoder.session_options "
        + json.dumps(options, sort_keys=True)
        + f" (genai_config.json's, with intra_op_num_threads {n} set when the session is made, "
        f"og.Config.overlay); greedy search, static batch; {search}; one Generator per batch "
        "shape, made before the clock and reused for every run (Generator.rewind_to(0) between "
        "runs, which gives a fresh Generator's greedy ids and prefills the new prompt), the "
        "clock started before the prompt tokens are appended; the sampled rows set do_sample "
        "and their settings as search options; where a row has no top-k, GenAI runs with "
        "top_k 0 (its nucleus path) and with top_k = the vocabulary size (a partial sort of "
        "the whole row), and the faster is the row (the builder's genai_config.json default, "
        "top_k 50, would cut every row to 50 candidates)",
        "ort-genai-static-server": "GenAI's Generator (same session options and search "
        "options, max_length = min_length = prompt + the group's longest request) behind a "
        "static-batching server on tokenwire's staggered arrivals and prompts: when the "
        "Generator is free it runs the requests that have arrived, at most 16, together to "
        "the end ('queued'), or first waits until 16 have arrived or none are left to come "
        "('full'); the policy is picked once per load in the warm-up round (one run of each, "
        f"the faster by tokens/s) and runs every counted round: {json.dumps(picks)}; "
        "Generators reused as in ort-genai: with equal lengths one per number of rows, made "
        "before the load; with mixed lengths one per (rows, longest request) made when first "
        "needed, inside the requests' clocks (its rows record how many and how long, "
        "generators_made_in_clock and generator_making_ms_in_clock); every request's clock "
        "runs from its arrival",
        "ort-genai-engine": "og.Engine on the fp32 graph; genai_config.json engine "
        + json.dumps(engine["engine"], sort_keys=True)
        + ", model.decoder.session_options "
        + json.dumps(engine["session_options"], sort_keys=True)
        + f", search past_present_share_buffer {json.dumps(share)}"
        + "; the static-batching scheduler (the dynamic one needs a paged-attention graph, "
        "which GenAI's builder writes for CUDA and WebGPU only), which runs at most 4 requests "
        "at a time and takes new ones when all of them have finished; the Engine made before "
        "the load, each request begun at its arrival time, between Engine steps, its clock "
        "started before its Request is made; greedy (TurnOptions do_sample false), min and "
        "max generated tokens both the request's own length (so EOS is ignored until then): "
        f"{NEW_TOKENS} in the burst and poisson loads, in {MIXED} the request's seeded draw "
        f"(16-{2 * NEW_TOKENS - 16}); tokenwire's prompts and arrival times",
        "ort-loop": f"intra_op_num_threads {n}, inter_op_num_threads 1, "
        "ORT_ENABLE_ALL, spinning on; one session.run per token, numpy argmax; without "
        "tokenwire's session.force_spinning_stop, which cost this loop 1-2 % in a side test "
        "(nothing else runs between its steps), so its workers spin between steps and its "
        "CPU per token counts that spinning",
        "tokenwire": f"defaults of `tokenwire serve` (intra_op_threads {n}, the default it "
        "resolves to, set explicitly; inter_op_threads 1, spinning on within a step and "
        "stopped between steps (session.force_spinning_stop), prefill chunk "
        f"{server['prefill_chunk_tokens']}) with TOKENWIRE_MAX_BATCH_SIZE "
        f"{server['max_batch_size']} and TOKENWIRE_MAX_QUEUE {server['max_queue']}; KV cache: "
        f"max_kv_tokens {kv} (prompt + max_tokens of all running requests together; beyond "
        f"it requests queue), a request up to the model's context of {context} positions; on "
        "the GenAI graphs (GroupQueryAttention, which writes its cache in place) one cache "
        f"preallocated at start, "
        f"{slot_cache_text(server['max_batch_size'], kv, context)}; on the Optimum graph a "
        "cache that grows each step; requests ignore EOS (ignore_eos) and ask for their "
        "length as max_tokens; it samples over the ids its tokenizer names, "
        f"{named} of the model's {vocab}; the engine alone (bench/engine_alone.py) with the "
        f"same model settings ({n} intra-op threads) and EngineConfig(max_batch_size=16), "
        f"the rest EngineConfig's defaults (max_kv_tokens {alone.max_kv_tokens}, prefill chunk "
        f"{alone.prefill_chunk_tokens}: "
        f"{slot_cache_text(alone.max_batch_size, alone.max_kv_tokens, context)} on the GenAI "
        "graphs)",
    }


def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    return next(r for r in rows if all(r.get(k) == v for k, v in match.items()))


def per_round(a: dict[str, Any], b: dict[str, Any], key: str = "tokens_per_s") -> list[float]:
    """a's value over b's within each round both ran in: the machine's drift between rounds
    cancels, which it does not in a ratio of medians."""
    return [x[key] / y[key] for x, y in zip(a["rounds"], b["rounds"], strict=False)]


def graph_ratio_rounds(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """The targets measured on the GenAI graphs (same graph for every system in a ratio),
    one value per round."""

    def row(graph: str, decoding: str = "greedy", **match: Any) -> dict[str, Any]:
        return find(rows, graph=graph, decoding=decoding, **match)

    optimum = [r for r in rows if "graph" not in r]
    fp32, int4 = "genai-fp32", "genai-int4"
    one = row(fp32, system="tokenwire", transport="grpc", concurrency=1)
    burst, staggered, mixed = (
        row(fp32, system="tokenwire", transport="grpc", concurrency=16, arrival=arrival)
        for arrival in ("burst", "poisson", MIXED)
    )
    static, static_mixed = (
        row(fp32, system="ort-genai-static-server", arrival=arrival)
        for arrival in ("poisson", MIXED)
    )
    loop1 = row(fp32, system="ort-loop", concurrency=1)
    return {
        "genai_graph_b1_vs_genai_b1": per_round(one, row(fp32, system="ort-genai", concurrency=1)),
        "genai_graph_c16_staggered_vs_genai_static_server": per_round(staggered, static),
        "genai_graph_c16_staggered_ttft_p50_vs_genai_static_server": per_round(
            staggered, static, "ttft_p50_ms"
        ),
        "genai_graph_c16_mixed_vs_genai_static_server": per_round(mixed, static_mixed),
        "genai_graph_c16_mixed_ttft_p50_vs_genai_static_server": per_round(
            mixed, static_mixed, "ttft_p50_ms"
        ),
        "genai_graph_c16_staggered_vs_genai_b16": per_round(
            staggered, row(fp32, system="ort-genai", concurrency=16)
        ),
        "genai_graph_c16_staggered_ttft_p50_vs_idle": per_round(staggered, one, "ttft_p50_ms"),
        "int4_b1_vs_genai_int4_b1": per_round(
            row(int4, system="tokenwire", transport="grpc", concurrency=1),
            row(int4, system="ort-genai", concurrency=1),
        ),
        "engine_alone_vs_loop_b1": per_round(row(fp32, transport="engine-alone"), loop1),
        "grpc_vs_loop_b1": per_round(one, loop1),
        "service_b1_vs_raw_b1": per_round(
            find(optimum, system="tokenwire", transport="grpc", concurrency=1, arrival="burst"),
            find(optimum, system="ort-loop", concurrency=1),
        ),
        "genai_graph_c16_staggered_vs_genai_engine_staggered": per_round(
            staggered, row(fp32, system="ort-genai-engine", arrival="poisson")
        ),
        "genai_graph_c16_mixed_vs_genai_engine_mixed": per_round(
            mixed, row(fp32, system="ort-genai-engine", arrival=MIXED)
        ),
        "genai_graph_c16_burst_vs_genai_engine_burst": per_round(
            burst, row(fp32, system="ort-genai-engine", arrival="burst")
        ),
        "genai_graph_c16_sampled_vs_genai_b16_sampled": per_round(
            row(fp32, "sampled", system="tokenwire", transport="grpc", concurrency=16),
            row(fp32, "sampled", system="ort-genai", concurrency=16),
        ),
        "genai_graph_c16_top_p_vs_genai_b16_top_p": per_round(
            row(fp32, "sampled-top-p", system="tokenwire", transport="grpc", concurrency=16),
            row(fp32, "sampled-top-p", system="ort-genai", concurrency=16),
        ),
    }


def ratios(rows: list[dict[str, Any]], rounds: dict[str, list[float]]) -> dict[str, float]:
    """The paired ratios' medians over rounds, then the ratios of the Optimum-graph rows."""
    optimum = [r for r in rows if "graph" not in r]
    svc1 = find(optimum, system="tokenwire", transport="grpc", concurrency=1, arrival="burst")
    svc16 = find(optimum, system="tokenwire", transport="grpc", concurrency=16, arrival="burst")
    raw1 = find(optimum, system="ort-loop", concurrency=1)
    genai1 = find(optimum, system="ort-genai", concurrency=1)
    genai16 = find(optimum, system="ort-genai", concurrency=16)
    edge1 = find(rows, transport="edge-paired", concurrency=1)
    edge16 = find(rows, transport="edge-paired", concurrency=16)
    grpc1 = find(rows, transport="grpc-paired", concurrency=1)
    grpc16 = find(rows, transport="grpc-paired", concurrency=16)
    off16 = find(rows, transport="grpc-metrics-off", concurrency=16)
    on16 = find(rows, transport="grpc-metrics-on", concurrency=16)
    with_client = svc1["server_cpu_ms_per_token"] + svc1["client_cpu_ms_per_token"]
    return {
        **{name: statistics.median(values) for name, values in rounds.items()},
        "service_b1_vs_genai_b1": svc1["tokens_per_s"] / genai1["tokens_per_s"],
        "service_c16_vs_genai_b16": svc16["tokens_per_s"] / genai16["tokens_per_s"],
        "service_c16_ttft_p50_vs_idle": svc16["ttft_p50_ms"] / svc1["ttft_p50_ms"],
        # The server process alone, and with the load generator (this process) added: the
        # plain loop's process holds both its model and its "client".
        "service_cpu_ms_per_token_c1": svc1["server_cpu_ms_per_token"],
        "service_overhead_cpu_ms_per_token_c1": svc1["server_cpu_ms_per_token"]
        - raw1["cpu_ms_per_token"],
        "service_with_client_cpu_ms_per_token_c1": with_client,
        "service_with_client_overhead_cpu_ms_per_token_c1": with_client - raw1["cpu_ms_per_token"],
        "edge_c16_vs_grpc_c16": edge16["tokens_per_s"] / grpc16["tokens_per_s"],
        "edge_ttft_p50_added_ms": edge1["ttft_p50_ms"] - grpc1["ttft_p50_ms"],
        "metrics_on_vs_off_c16": on16["tokens_per_s"] / off16["tokens_per_s"],
    }


async def main(quick: bool) -> None:
    model = ROOT / "bench" / ".cache" / "bench-56m"
    onnx_dir, genai_dir = model / "onnx", model / "genai"
    tokenizer = Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))
    prompts = [make_prompt(tokenizer, PROMPT_TOKENS, seed) for seed in range(32)]
    long_prompt = make_prompt(tokenizer, 400, 99)
    started = time.time()
    rows: list[dict[str, Any]] = []
    model_info = model_facts(onnx_dir)
    server = start_server(onnx_dir, metrics=True)
    ready = server.ready
    try:
        print("headline: plain loop, GenAI and tokenwire taking turns", flush=True)
        rows += await headline(server, model, prompts, rounds=2 if quick else 3)
        if not quick:
            print("static batch 8", flush=True)
            rows += [peer("raw", onnx_dir, 8), peer("genai", genai_dir, 8)]
            print("tokenwire concurrency sweep", flush=True)
            durations = {
                r["concurrency"]: NEW_TOKENS / r["per_stream_tokens_per_s"]
                for r in rows
                if r["system"] == "tokenwire"
            }
            rows += await service_rows(server, prompts, [4, 8, 32], ["burst"], durations=durations)
            rows += await service_rows(
                server, prompts, [4, 8, 16, 32], ["poisson"], durations=durations
            )
        rows += await paired_rows(server, prompts, [1, 16])
    finally:
        server.stop()
    print(
        "the GenAI graphs, fp32 and int4: tokenwire, the plain loop and GenAI taking turns",
        flush=True,
    )
    rows += await graph_rows(
        model, prompts, rounds=2 if quick else 3, single_rounds=3 if quick else 5
    )
    print("metrics exporter on vs off (alternating fresh servers)", flush=True)
    rows += await metrics_ab(onnx_dir, prompts, rounds=2)
    print("prefill fairness", flush=True)
    fair = [await fairness(onnx_dir, prompts, long_prompt, chunk) for chunk in (256, 64)]
    print("transport ceiling (a stand-in model of 0.2 ms per step)", flush=True)
    ceiling = transport_ceiling()
    result = {
        # 2: rows' spread over their rounds (spread_over), clocks from scheduled arrivals,
        # the model's tokenizer size, the server's limits, the static server's Generators.
        "schema": 2,
        "model": model_info,
        "server": {
            key: ready[key]
            for key in ("max_batch_size", "max_queue", "max_kv_tokens", "prefill_chunk_tokens")
        },
        "workload": {
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "greedy": True,
            "ignore_eos": True,
            **{
                decoding: f"rows with decoding '{decoding}': {json.dumps(settings)}, both systems"
                + (
                    ""
                    if "top_k" in settings
                    else " (GenAI without top-k: top_k 0 and top_k = the vocabulary both run,"
                    " the faster is the row)"
                )
                for decoding, settings in SAMPLINGS.items()
            },
            "mixed_output_lengths": f"load {MIXED}: max_tokens per request uniform in "
            f"[16, {2 * NEW_TOKENS - 16}], seeded (mean {NEW_TOKENS})",
        },
        "machine": machine(),
        "quick": quick,
        "wall_s": round(time.time() - started, 1),
        # One intra-op thread count for every system (tokenwire's cpu_budget), and its source.
        "threads": {"intra_op_threads": threads().cpus, "source": threads().source},
        "peer_knobs": peer_knobs(genai_dir, rows, ready, model_info),
        "rows": rows,
        "fairness": fair,
        "transport": ceiling,
    }
    paired = graph_ratio_rounds(rows)
    result["ratio_rounds"] = paired
    result["ratios"] = ratios(rows, paired)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    asyncio.run(main(ap.parse_args().quick))
