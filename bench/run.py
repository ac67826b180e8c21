"""`make bench`: tokenwire against the plain ORT loop and ORT GenAI, side by side, one run.

Runs in the service environment (.venv); peers run in bench/.venv (see peers.py). Writes
bench/results/latest.json; bench/report.py turns it into docs/benchmarks.md with plots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import onnxruntime
from httpx_sse import aconnect_sse
from tokenizers import Tokenizer

from tokenwire.common.stats import percentile
from tokenwire.server.process import TokenwireProcess
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
BENCH_PY = ROOT / "bench" / ".venv" / "bin" / "python"
RESULTS = ROOT / "bench" / "results" / "latest.json"
PROMPT_TOKENS, NEW_TOKENS = 32, 128
TICK = os.sysconf("SC_CLK_TCK")


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
    """A tokenwire subprocess, ready once its JSON log says so; its log tells its port."""

    def __init__(self, args: list[str], env: dict[str, str], ready_event: str) -> None:
        super().__init__(*args, env={"TOKENWIRE_LOG_FORMAT": "json", **env})
        self.wait_for(ready_event, 180)
        listening = "server.listening" if args[0] == "serve" else "edge.listening"
        self.port = self.listening_port(listening)


def start_server(model_dir: Path, metrics: bool = False, chunk: int = 256) -> Process:
    env = {
        "TOKENWIRE_LOG_FORMAT": "json",
        "TOKENWIRE_MAX_BATCH_SIZE": "32",
        "TOKENWIRE_MAX_QUEUE": "256",
        "TOKENWIRE_PREFILL_CHUNK_TOKENS": str(chunk),
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


async def one_stream(stub: pb_grpc.GenerationServiceStub, prompt: str, new: int) -> dict[str, Any]:
    request = pb.GenerateRequest(
        prompt=prompt, max_tokens=new, ignore_eos=True, sampling=pb.SamplingParams(temperature=0.0)
    )
    sent = time.perf_counter()
    times: list[float] = []
    call: Any = stub.Generate(request, timeout=600)  # an aio call: the stubs type the sync one
    async for message in call:
        if message.WhichOneof("event") == "token":
            times.append(time.perf_counter())
    return {"sent": sent, "times": times}


async def edge_stream(http: httpx.AsyncClient, prompt: str, new: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": new, "ignore_eos": True, "temperature": 0}
    sent = time.perf_counter()
    times: list[float] = []
    async with aconnect_sse(http, "POST", "/v1/generate", json=body) as source:
        async for event in source.aiter_sse():
            if event.event == "token":
                times.append(time.perf_counter())
    return {"sent": sent, "times": times}


def stream_row(runs: list[list[dict[str, Any]]], cpu: float | None) -> dict[str, Any]:
    """Throughput: median over repeated runs; latency percentiles: all streams pooled."""
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
    return row


async def run_load(
    open_stream: Any, prompts: list[str], concurrency: int, arrival: str, rate: float | None
) -> list[dict[str, Any]]:
    rng = random.Random(concurrency)
    if arrival == "burst":
        return list(
            await asyncio.gather(
                *(open_stream(prompts[i % len(prompts)]) for i in range(concurrency))
            )
        )
    tasks = []
    for i in range(2 * concurrency):  # Poisson arrivals keeping about `concurrency` in flight
        tasks.append(asyncio.create_task(open_stream(prompts[i % len(prompts)])))
        await asyncio.sleep(rng.expovariate(rate or 1.0))
    return list(await asyncio.gather(*tasks))


def repeats_for(concurrency: int, arrival: str) -> int:
    if arrival == "poisson":
        return 1
    return 5 if concurrency == 1 else 3


async def measure(
    open_stream: Any,
    prompts: list[str],
    concurrency: int,
    arrival: str,
    *,
    rate: float | None,
    pid: int | None,
) -> dict[str, Any]:
    runs, cpu = [], 0.0
    for _ in range(repeats_for(concurrency, arrival)):
        cpu0 = cpu_seconds(pid) if pid else 0.0
        runs.append(await run_load(open_stream, prompts, concurrency, arrival, rate))
        cpu += (cpu_seconds(pid) - cpu0) if pid else 0.0
    return stream_row(runs, cpu if pid else None)


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
                    lambda p, stub=stub: one_stream(stub, p, NEW_TOKENS),
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
                            lambda p, stub=stub: one_stream(stub, p, NEW_TOKENS),
                            prompts,
                            c,
                            "burst",
                            None,
                        )
                    )
                    via["edge"].append(
                        await run_load(
                            lambda p: edge_stream(http, p, NEW_TOKENS), prompts, c, "burst", None
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
                                lambda p, stub=stub: one_stream(stub, p, NEW_TOKENS),
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
    service: dict[int, tuple[list[list[dict[str, Any]]], list[float]]] = {1: ([], []), 16: ([], [])}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await asyncio.gather(*(one_stream(stub, p, 16) for p in prompts[:16]))
        for _ in range(rounds):
            for batch in (1, 16):
                for mode, sub_dir in (("raw", "onnx"), ("genai", "genai")):
                    peers.setdefault((mode, batch), []).append(peer(mode, model / sub_dir, batch))
                runs, cpu = service[batch]
                for _ in range(3 if batch == 1 else 1):
                    cpu0 = cpu_seconds(server.proc.pid)
                    runs.append(
                        await run_load(
                            lambda p, stub=stub: one_stream(stub, p, NEW_TOKENS),
                            prompts,
                            batch,
                            "burst",
                            None,
                        )
                    )
                    cpu.append(cpu_seconds(server.proc.pid) - cpu0)
    rows = []
    for (_, _), found in sorted(peers.items()):
        median = sorted(found, key=lambda r: r["tokens_per_s"])[len(found) // 2]
        rates = sorted(r["tokens_per_s"] for r in found)
        rows.append(
            {
                **median,
                "repeats": len(found),
                "tokens_per_s_spread": (rates[-1] - rates[0]) / rates[len(rates) // 2],
            }
        )
    for batch, (runs, cpu) in service.items():
        row = stream_row(runs, sum(cpu))
        rows.append(
            {
                "system": "tokenwire",
                "transport": "grpc",
                "concurrency": batch,
                "arrival": "burst",
                **row,
            }
        )
        print(
            f"  grpc  c={batch:<3d} burst   {row['tokens_per_s']:8.1f} tok/s  "
            f"ttft p50 {row['ttft_p50_ms']:7.1f} ms (interleaved)",
            flush=True,
        )
    return rows


# Each graph form of the same weights, and the peers that run it.
GRAPHS = [("genai-fp32", "genai", ("raw", "genai")), ("genai-int4", "genai-int4", ("raw", "genai"))]


async def graph_rows(model: Path, prompts: list[str], rounds: int) -> list[dict[str, Any]]:
    """tokenwire serving each GenAI graph against ORT GenAI and the plain loop on that graph,
    taking turns: 1 stream, a burst of 16, 16 with staggered (Poisson) arrivals, and the engine
    alone in its own process (no transport)."""
    rows: list[dict[str, Any]] = []
    for graph, sub_dir, peer_modes in GRAPHS:
        model_dir = model / sub_dir
        found: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
        server = start_server(model_dir)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                await asyncio.gather(*(one_stream(stub, p, 16) for p in prompts[:16]))
                for _ in range(rounds):
                    for batch in (1, 16):
                        for mode in peer_modes:
                            row = peer(mode, model_dir, batch)
                            found.setdefault(
                                (row["system"], "in-process", batch, "static-batch"), []
                            ).append(row)
                    alone = engine_alone(model_dir)
                    found.setdefault(("tokenwire", "engine-alone", 1, "burst"), []).append(alone)
                    for c, arrival in ((1, "burst"), (16, "burst"), (16, "poisson")):
                        duration = (
                            NEW_TOKENS
                            / found[("tokenwire", "grpc", 16, "burst")][-1][
                                "per_stream_tokens_per_s"
                            ]
                            if arrival == "poisson"
                            else 1.0
                        )
                        row = await measure(
                            lambda p, stub=stub: one_stream(stub, p, NEW_TOKENS),
                            prompts,
                            c,
                            arrival,
                            rate=c / duration,
                            pid=server.proc.pid,
                        )
                        found.setdefault(("tokenwire", "grpc", c, arrival), []).append(row)
        finally:
            server.stop()
        for (system, transport, c, arrival), runs in found.items():
            median = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
            rows.append(
                {
                    **median,
                    "system": system,
                    "transport": transport,
                    "concurrency": c,
                    "arrival": arrival,
                    "graph": graph,
                    "repeats": len(runs),
                }
            )
            print(
                f"  {graph:10s} {system:9s} {transport:12s} c={c:<3d} {arrival:12s} "
                f"{median['tokens_per_s']:8.1f} tok/s  ttft p50 {median['ttft_p50_ms']:7.1f} ms",
                flush=True,
            )
    return rows


def engine_alone(model_dir: Path) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "engine_alone.py"),
            str(model_dir),
            "--streams",
            "1",
            "--prompt-tokens",
            str(PROMPT_TOKENS),
            "--new-tokens",
            str(NEW_TOKENS),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def peer(mode: str, model_dir: Path, batch: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            str(BENCH_PY),
            str(ROOT / "bench" / "peers.py"),
            mode,
            str(model_dir),
            "--batch",
            str(batch),
            "--prompt-tokens",
            str(PROMPT_TOKENS),
            "--new-tokens",
            str(NEW_TOKENS),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"  {mode:5s} b={batch:<3d}        {row['tokens_per_s']:8.1f} tok/s  "
        f"ttft {row['ttft_p50_ms']:7.1f} ms",
        flush=True,
    )
    return {
        "system": {"raw": "ort-loop", "genai": "ort-genai"}[mode],
        "transport": "in-process",
        "concurrency": batch,
        "arrival": "static-batch",
        **row,
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


def peer_knobs(genai_dir: Path) -> dict[str, str]:
    """Every setting each system ran with, as written in the report."""
    genai = json.loads((genai_dir / "genai_config.json").read_text())
    options = genai["model"]["decoder"].get("session_options", {})
    return {
        "ort-genai": "genai_config.json model.decoder.session_options "
        + json.dumps(options, sort_keys=True)
        + "; greedy search, static batch",
        "ort-loop": "intra_op_num_threads 0 (one per core), inter_op_num_threads 1, "
        "ORT_ENABLE_ALL, spinning on; one session.run per token, numpy argmax",
        "tokenwire": "defaults of `tokenwire serve` (intra_op_threads 0, inter_op_threads 1, "
        "spinning on, prefill chunk 256, max batch 16)",
    }


def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    return next(r for r in rows if all(r.get(k) == v for k, v in match.items()))


def graph_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The targets measured on the GenAI graphs (same graph for every system in a ratio)."""

    def rate(graph: str, **match: Any) -> dict[str, Any]:
        return find(rows, graph=graph, **match)

    fp32, int4 = "genai-fp32", "genai-int4"
    one = rate(fp32, system="tokenwire", transport="grpc", concurrency=1)
    staggered = rate(fp32, system="tokenwire", transport="grpc", concurrency=16, arrival="poisson")
    loop1 = rate(fp32, system="ort-loop", concurrency=1)
    return {
        "genai_graph_b1_vs_genai_b1": one["tokens_per_s"]
        / rate(fp32, system="ort-genai", concurrency=1)["tokens_per_s"],
        "genai_graph_c16_staggered_vs_genai_b16": staggered["tokens_per_s"]
        / rate(fp32, system="ort-genai", concurrency=16)["tokens_per_s"],
        "genai_graph_c16_staggered_ttft_p50_vs_idle": staggered["ttft_p50_ms"] / one["ttft_p50_ms"],
        "int4_b1_vs_genai_int4_b1": rate(int4, system="tokenwire", transport="grpc", concurrency=1)[
            "tokens_per_s"
        ]
        / rate(int4, system="ort-genai", concurrency=1)["tokens_per_s"],
        "engine_alone_vs_loop_b1": rate(fp32, transport="engine-alone")["tokens_per_s"]
        / loop1["tokens_per_s"],
        "grpc_vs_loop_b1": one["tokens_per_s"] / loop1["tokens_per_s"],
    }


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
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
    return {
        **graph_ratios(rows),
        "service_b1_vs_genai_b1": svc1["tokens_per_s"] / genai1["tokens_per_s"],
        "service_b1_vs_raw_b1": svc1["tokens_per_s"] / raw1["tokens_per_s"],
        "service_c16_vs_genai_b16": svc16["tokens_per_s"] / genai16["tokens_per_s"],
        "service_c16_ttft_p50_vs_idle": svc16["ttft_p50_ms"] / svc1["ttft_p50_ms"],
        "service_cpu_ms_per_token_c1": svc1["server_cpu_ms_per_token"],
        "service_overhead_cpu_ms_per_token_c1": svc1["server_cpu_ms_per_token"]
        - raw1["cpu_ms_per_token"],
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
    server = start_server(onnx_dir, metrics=True)
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
    rows += await graph_rows(model, prompts, rounds=2 if quick else 3)
    print("metrics exporter on vs off (alternating fresh servers)", flush=True)
    rows += await metrics_ab(onnx_dir, prompts, rounds=2)
    print("prefill fairness", flush=True)
    fair = [await fairness(onnx_dir, prompts, long_prompt, chunk) for chunk in (256, 64)]
    result = {
        "schema": 1,
        "model": {
            "name": "bench-56m",
            "layers": 8,
            "hidden": 512,
            "vocab": 32000,
            "params_millions": 56,
            "dtype": "fp32",
            "provider": "CPUExecutionProvider",
        },
        "workload": {
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "greedy": True,
            "ignore_eos": True,
        },
        "machine": machine(),
        "quick": quick,
        "wall_s": round(time.time() - started, 1),
        "peer_knobs": peer_knobs(genai_dir),
        "rows": rows,
        "fairness": fair,
    }
    result["ratios"] = ratios(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    asyncio.run(main(ap.parse_args().quick))
