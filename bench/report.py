"""Regenerate docs/benchmarks.md and its plots from bench/results/latest.json (bench/.venv)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
GPU_RESULTS = ROOT / "bench" / "results" / "gpu.json"
ANALYSIS = ROOT / "bench" / "analysis.md"
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"

TARGETS = [
    (
        "genai_graph_b1_vs_genai_b1",
        ">=",
        1.0,
        "(a) GenAI fp32 graph: 1 stream over gRPC vs ORT GenAI's Generator, batch 1",
    ),
    (
        "genai_graph_c16_staggered_vs_genai_static_server",
        ">=",
        1.3,
        "(b) GenAI fp32 graph: 16 streams with staggered arrivals vs GenAI's static batch of 16 "
        "serving the same arrivals",
    ),
    (
        "genai_graph_c16_staggered_ttft_p50_vs_idle",
        "<=",
        3.0,
        "(b) GenAI fp32 graph: TTFT p50 of those 16 staggered streams vs 1 stream (idle)",
    ),
    (
        "int4_b1_vs_genai_int4_b1",
        ">=",
        1.0,
        "(c) GenAI int4 graph: 1 stream over gRPC vs GenAI int4, batch 1",
    ),
    (
        "engine_alone_vs_loop_b1",
        ">=",
        0.97,
        "(d) GenAI fp32 graph: engine alone (no transport) vs the plain ORT loop",
    ),
    (
        "grpc_vs_loop_b1",
        ">=",
        0.9,
        "(e) GenAI fp32 graph: gRPC service, 1 stream, vs the plain ORT loop",
    ),
    (
        "service_b1_vs_raw_b1",
        ">=",
        0.9,
        "(e) Optimum fp32 graph: gRPC service, 1 stream, vs the plain ORT loop",
    ),
]
"""The issue's targets, each between systems on the same graph: pass or fail."""

INFORMATIONAL = [
    (
        "genai_graph_c16_staggered_ttft_p50_vs_genai_static_server",
        "GenAI fp32 graph: TTFT p50, 16 staggered streams vs GenAI's static batch of 16 serving "
        "the same arrivals",
    ),
    (
        "genai_graph_c16_mixed_vs_genai_static_server",
        "GenAI fp32 graph: 16 staggered streams of mixed lengths (16-240 tokens) vs GenAI's "
        "static batch of 16 serving the same arrivals and lengths",
    ),
    (
        "genai_graph_c16_mixed_ttft_p50_vs_genai_static_server",
        "GenAI fp32 graph: TTFT p50, the same mixed lengths",
    ),
    (
        "genai_graph_c16_staggered_vs_genai_b16",
        "GenAI fp32 graph: 16 staggered streams vs GenAI's static batch of 16 given all 16 "
        "prompts at once (a bound, not a load a server sees)",
    ),
    (
        "genai_graph_c16_staggered_vs_genai_engine_staggered",
        "GenAI fp32 graph: 16 staggered streams vs GenAI's Engine on the same arrivals "
        "(its CPU scheduler runs 4 requests at a time)",
    ),
    (
        "genai_graph_c16_mixed_vs_genai_engine_mixed",
        "GenAI fp32 graph: 16 staggered streams of mixed lengths vs GenAI's Engine on the same "
        "arrivals and lengths",
    ),
    (
        "genai_graph_c16_burst_vs_genai_engine_burst",
        "GenAI fp32 graph: burst of 16 vs GenAI's Engine given the same burst",
    ),
    (
        "genai_graph_c16_sampled_vs_genai_b16_sampled",
        "GenAI fp32 graph, sampled (temperature 0.8, top-k 50, top-p 0.95): burst of 16 vs "
        "GenAI's static batch of 16 sampling alike",
    ),
    (
        "genai_graph_c16_top_p_vs_genai_b16_top_p",
        "GenAI fp32 graph, sampled OpenAI-style (temperature 0.7, top-p 0.9, no top-k): burst "
        "of 16 vs GenAI's static batch of 16 sampling alike",
    ),
    (
        "service_b1_vs_genai_b1",
        "Different graphs: tokenwire on the Optimum fp32 graph, 1 stream, vs GenAI's Generator "
        "batch 1 on its own GenAI fp32 graph",
    ),
    (
        "service_c16_vs_genai_b16",
        "Different graphs: tokenwire on the Optimum fp32 graph, burst of 16, vs GenAI's static "
        "batch of 16 on its own GenAI fp32 graph",
    ),
    (
        "service_c16_ttft_p50_vs_idle",
        "Optimum fp32 graph: TTFT p50, a burst of 16 (all at once) vs 1 stream (target (b) is "
        "the staggered one)",
    ),
    (
        "service_cpu_ms_per_token_c1",
        "Optimum fp32 graph, 1 stream: CPU ms per token, server process only",
    ),
    (
        "service_overhead_cpu_ms_per_token_c1",
        "Optimum fp32 graph, 1 stream: CPU ms per token above the plain loop's process, server "
        "process only; the loop runs without session.force_spinning_stop, so its CPU counts "
        "workers spinning between its steps and this difference can read below 0 (not "
        "tokenwire using less CPU than ONNX Runtime)",
    ),
    (
        "service_with_client_cpu_ms_per_token_c1",
        "Optimum fp32 graph, 1 stream: CPU ms per token, server process + load generator",
    ),
    (
        "service_with_client_overhead_cpu_ms_per_token_c1",
        "Optimum fp32 graph, 1 stream: CPU ms per token above the plain loop's process, server "
        "process + load generator (the loop's CPU counts its spinning workers likewise)",
    ),
    ("edge_c16_vs_grpc_c16", "SSE edge vs direct gRPC tokens/s, 16 streams"),
    ("edge_ttft_p50_added_ms", "TTFT p50 the SSE edge adds (ms)"),
    ("metrics_on_vs_off_c16", "tokens/s with the metrics exporter on vs off, 16 streams"),
]
"""Every other ratio of the run, for reading beside the targets: no pass or fail."""


def cpu_name(cpu: str) -> str:
    """The CPU's model name without trademark signs and generic words ('Intel(R) Xeon(R)
    Processor' -> 'Intel Xeon')."""
    words = re.sub(r"\((R|TM)\)", "", cpu).split()
    return " ".join(w for w in words if w.lower() not in {"processor", "cpu"})


def graph_of(row: dict[str, Any]) -> str:
    """The graph a row ran: its own field, or for the Optimum-layout part of the run the
    Optimum graph, but GenAI's Generator, which runs its own GenAI graph there."""
    return str(row.get("graph", "genai-fp32" if row["system"] == "ort-genai" else "optimum-fp32"))


def label(row: dict[str, Any]) -> str:
    decoding = row.get("decoding", "greedy")
    sampled = "" if decoding == "greedy" else f", {decoding}"
    graph = f"[{graph_of(row)}{sampled}] "
    if row["system"] == "ort-genai-engine":
        return f"{graph}ort-genai Engine {row['concurrency']} requests ({row['arrival']})"
    if row["system"] == "ort-genai-static-server":
        return (
            f"{graph}ort-genai static-batch server, at most {row['concurrency']} "
            f"({row['arrival']}, policy {row['policy']})"
        )
    if row["system"] != "tokenwire":
        return f"{graph}{row['system']} static batch {row['concurrency']}"
    return f"{graph}tokenwire {row['transport']} {row['concurrency']} streams ({row['arrival']})"


def cpu_cells(row: dict[str, Any]) -> str:
    """The two CPU columns: the tokenwire server process alone, and every process the system
    ran in (tokenwire: server + load generator; a peer or the engine alone: its one process,
    which holds its own "client")."""
    server = row.get("server_cpu_ms_per_token")
    client = row.get("client_cpu_ms_per_token")
    whole = row.get("cpu_ms_per_token")
    if server is not None:
        whole = server + client if client is not None else None
    return " | ".join("" if v is None else f"{v:.2f}" for v in (server, whole))


def spread_cell(row: dict[str, Any]) -> str:
    """A row's run-to-run spread of tokens/s, (highest - lowest) / median, and over what: as
    the row records it (`spread_over`, from schema 2), else over its rounds where it has them
    (older rows of the GenAI graphs kept their median round's own spread, over the runs in that
    round, which is not the row's), else over its runs; a row of one run has none."""
    over, spread = row.get("spread_over"), row.get("tokens_per_s_spread")
    count = int(row.get("repeats") or 1)
    rounds = row.get("rounds") or []
    if over is None and len(rounds) > 1:
        rates = sorted(r["tokens_per_s"] for r in rounds)
        spread, over, count = (rates[-1] - rates[0]) / rates[len(rates) // 2], "rounds", len(rates)
    if count < 2:
        return "1 run"
    if spread is None:
        return f"not recorded ({count} {over or 'runs'})"
    return f"{spread:.0%} ({count} {over or 'runs'})"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| run | tokens/s | spread | per stream | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 "
        "| CPU ms/token, server only | CPU ms/token, with the client |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {label(r)} | {r['tokens_per_s']:.1f} | {spread_cell(r)} | {r['per_stream_tokens_per_s']:.1f} | "
            f"{r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.2f} | "
            f"{r['itl_p99_ms']:.2f} | {cpu_cells(r)} |"
        )
    return "\n".join(lines)


def targets(
    ratios: dict[str, float],
    goals: list[tuple[str, str, float, str]] | None = None,
    rounds: dict[str, list[float]] | None = None,
    missing: str = "not in this run",
) -> str:
    """One line per goal; given `rounds` (the per-round values of the paired ratios), a column
    with their lowest and highest. A goal the results lack gets a line saying so (`missing`),
    not silence."""
    paired = rounds is not None
    lines = [
        "| target | value |" + (" rounds (min-max) |" if paired else "") + " goal | |",
        "| --- | ---: |" + (" ---: |" if paired else "") + " --- | --- |",
    ]
    for key, op, goal, text in TARGETS if goals is None else goals:
        value = ratios.get(key)
        if value is None:
            lines.append(
                f"| {text} (`{key}`) | - |{' - |' if paired else ''} {op} {goal} | {missing} |"
            )
            continue
        met = value >= goal if op == ">=" else value <= goal
        each = (rounds or {}).get(key)
        spread = f" {min(each):.2f}-{max(each):.2f} ({len(each)}) |" if each else " |"
        lines.append(
            f"| {text} (`{key}`) | {value:.3f} |{spread if paired else ''} {op} {goal} | "
            f"{'met' if met else 'missed'} |"
        )
    return "\n".join(lines)


def informational(ratios: dict[str, float], rounds: dict[str, list[float]]) -> str:
    """The other ratios of the run, one line each, with their rounds where paired: no goal."""
    lines = [
        "| measurement | value | rounds (min-max) |",
        "| --- | ---: | ---: |",
    ]
    for key, text in INFORMATIONAL:
        value = ratios.get(key)
        if value is None:
            lines.append(f"| {text} (`{key}`) | not in this run | |")
            continue
        each = rounds.get(key)
        spread = f"{min(each):.2f}-{max(each):.2f} ({len(each)})" if each else ""
        lines.append(f"| {text} (`{key}`) | {value:.3f} | {spread} |")
    return "\n".join(lines)


GRAPH_NAMES = {"optimum-fp32": "Optimum fp32 graph", "genai-fp32": "GenAI fp32 graph"}


def plots(rows: list[dict[str, Any]]) -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for transport, arrival, style in (
        ("grpc", "burst", "o-"),
        ("grpc", "poisson", "s--"),
        ("edge-paired", "burst", "^-"),
    ):
        found = [
            r
            for r in rows
            if r["system"] == "tokenwire"
            and r["transport"] == transport
            and r["arrival"] == arrival
        ]
        if found:
            graph = GRAPH_NAMES[graph_of(found[0])]
            pts = sorted((r["concurrency"], r["tokens_per_s"]) for r in found)
            name = f"tokenwire {transport} ({arrival}), {graph}"
            ax.plot(*zip(*pts, strict=True), style, label=name)
    for system, style in (("ort-loop", "x:"), ("ort-genai", "d:")):
        found = [r for r in rows if r["system"] == system]
        if found:
            graph = GRAPH_NAMES[graph_of(found[0])]
            pts = sorted((r["concurrency"], r["tokens_per_s"]) for r in found)
            name = f"{system} (static batch), {graph}"
            ax.plot(*zip(*pts, strict=True), style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams / batch size")
    ax.set_ylabel("aggregate tokens/s")
    # Systems on different graphs share this plot: each label names its graph.
    ax.set_title("Throughput, bench-56m Llama, fp32, CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMG / "bench-throughput.png", dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    grpc = sorted(
        (
            r
            for r in rows
            if r["system"] == "tokenwire" and r["transport"] == "grpc" and r["arrival"] == "burst"
        ),
        key=lambda r: r["concurrency"],
    )
    xs = [r["concurrency"] for r in grpc]
    for key, style in (("ttft_p50_ms", "o-"), ("ttft_p99_ms", "o--")):
        left.plot(xs, [r[key] for r in grpc], style, label=key.replace("_ms", "").replace("_", " "))
    for key, style in (("itl_p50_ms", "s-"), ("itl_p99_ms", "s--")):
        right.plot(
            xs, [r[key] for r in grpc], style, label=key.replace("_ms", "").replace("_", " ")
        )
    for ax, title in ((left, "Time to first token"), (right, "Inter-token latency")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMG / "bench-latency.png", dpi=120)
    plt.close(fig)


def fairness(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| prefill chunk | long prompt TTFT | running streams' ITL p50 otherwise | worst ITL during the prefill |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for f in rows:
        lines.append(
            f"| {f['prefill_chunk_tokens']} | {f['long_prompt_ttft_ms']:.1f} ms | "
            f"{f['itl_p50_ms_otherwise']:.2f} ms | {f['itl_max_ms_during_prefill']:.2f} ms |"
        )
    return "\n".join(lines)


GPU_TARGETS = [
    (
        "grpc_b1_vs_genai_b1",
        ">=",
        1.0,
        "1 stream over gRPC vs GenAI batch 1 (its best: CUDA graph)",
    ),
    (
        "grpc_c16_staggered_vs_genai_static_server",
        ">=",
        1.3,
        "16 staggered streams vs GenAI's static batch of 16 serving the same arrivals",
    ),
    (
        "grpc_c16_mixed_vs_genai_static_server",
        ">=",
        1.3,
        "16 staggered streams of mixed lengths vs GenAI's static batch of 16 serving the same "
        "arrivals and lengths",
    ),
    (
        "grpc_c16_staggered_vs_genai_b16",
        ">=",
        1.0,
        "16 staggered streams vs GenAI static batch 16 given all prompts at once (a bound)",
    ),
    (
        "grpc_c16_sampled_vs_genai_b16_sampled",
        ">=",
        1.0,
        "burst of 16 sampling (temperature 0.8, top-k 50, top-p 0.95) vs GenAI's static batch "
        "of 16 sampling alike",
    ),
    ("grpc_c16_burst_vs_genai_b16", ">=", 1.0, "burst of 16 vs GenAI static batch 16"),
    ("engine_b1_vs_genai_b1", ">=", 1.0, "engine alone, 1 stream, vs GenAI batch 1"),
    ("engine_c16_vs_genai_b16", ">=", 1.0, "engine alone, burst of 16, vs GenAI static batch 16"),
    (
        "cuda_graph_vs_uncaptured_b1",
        ">=",
        1.0,
        "decode steps replayed as CUDA graphs vs uncaptured, 1 stream",
    ),
    (
        "cuda_graph_vs_uncaptured_c16",
        ">=",
        1.0,
        "decode steps replayed as CUDA graphs vs uncaptured, 16 streams",
    ),
    ("device_cache_vs_copying_b1", ">=", 1.0, "cache on the device vs copied every step, 1 stream"),
    (
        "device_cache_vs_copying_c16",
        ">=",
        1.0,
        "cache on the device vs copied every step, 16 streams",
    ),
    (
        "growing_on_device_vs_copying_b1",
        ">=",
        1.0,
        "a cache that grows every step (graphs without GroupQueryAttention) kept on the device "
        "vs copied every step, 1 stream",
    ),
    (
        "growing_on_device_vs_copying_c16",
        ">=",
        1.0,
        "a cache that grows every step kept on the device vs copied every step, 16 streams",
    ),
]


GPU_MISSING = "not measured on the GPU (the GPU run predates this target)"


def gpu_label(row: dict[str, Any]) -> str:
    sampled = ", sampled" if row.get("decoding") == "sampled" else ""
    if row["system"] == "ort-genai":
        graph = "CUDA graph" if row.get("knobs", {}).get("enable_cuda_graph") else "no CUDA graph"
        return f"ort-genai static batch {row['concurrency']} ({graph}{sampled})"
    if row["system"] == "ort-genai-static-server":
        return (
            f"ort-genai static-batch server, at most {row['concurrency']} ({row['arrival']}, "
            f"policy {row['policy']})"
        )
    cache = {
        "device": "cache on device, CUDA graphs",
        "device-uncaptured": "cache on device, no CUDA graphs",
        "device-prefill-copied": "cache on device, prompts prefilled apart and copied in",
        "device-growing": "cache growing every step, kept on device",
        "copying": "cache copied per step",
    }[row["cache"]]
    streams = f"{row['concurrency']} stream{'s' if row['concurrency'] > 1 else ''}"
    return f"tokenwire {row['transport']} {streams} ({row['arrival']}, {cache}{sampled})"


def gpu_run(gpu: dict[str, Any]) -> str:
    """When and on which commit the GPU run was made."""
    return f"{gpu.get('date', 'an unrecorded date')}, commit {gpu.get('git_commit', '?')}"


def gpu_section(gpu: dict[str, Any], result: dict[str, Any]) -> str:
    """Tables for each model of bench/results/gpu.json (bench/gpu.py), headed by how old the
    GPU run is beside the CPU run above."""
    m, cpu = gpu["machine"], result["machine"]
    parts = [
        f"**An older run than the CPU numbers above:** the GPU run of {gpu_run(gpu)}, against "
        f"the CPU run of {cpu['date']}, commit {cpu['git_commit']}. The code has changed since "
        "the GPU run and it has not been repeated: its numbers are that commit's, and targets "
        "added after it read 'not measured on the GPU'.",
        "",
        f"Regenerate with `bench/gpu.sh OUT_DIR` on a GPU machine (bench/gpu.py; results in "
        f"`bench/results/gpu.json`). Machine: {m['gpu']}, {m['cpu_cores']} CPU cores, Python "
        f"{m['python']}, ONNX Runtime {m['onnxruntime']} (onnxruntime-gpu, CUDA provider), "
        f"ONNX Runtime GenAI {m['onnxruntime_genai']} (onnxruntime-genai-cuda); "
        f"{gpu.get('date', '')}, commit {gpu.get('git_commit', '?')}.",
        "",
        f"Workload: every system on the same fp16 graph written by GenAI's builder (`-p fp16 -e "
        f"cuda`), random-initialised Llama weights, the same {gpu['prompt_tokens']}-token prompt "
        f"ids, {gpu['new_tokens']} greedy new tokens. GenAI runs with its builder's session "
        f"options, with and without CUDA graph capture (`enable_cuda_graph` in genai_config.json); "
        f"tokenwire with the defaults of `tokenwire serve` (`TOKENWIRE_PROVIDER=cuda`).",
    ]
    for name, entry in gpu["models"].items():
        size = entry["size"]
        rows = [r for r in entry["rows"] if "tokens_per_s" in r]
        checks = [r for r in entry["rows"] if "check" in r]
        parts += [
            "",
            f"### {name}: {size['layers']} layers, hidden {size['hidden']}, {size['heads']} heads "
            f"({size['kv_heads']} KV), fp16",
            "",
            "| run | tokens/s | TTFT p50 | ITL p50 | ITL p99 |",
            "| --- | ---: | ---: | ---: | ---: |",
            *(
                f"| {gpu_label(r)} | {r['tokens_per_s']:.0f} | {r['ttft_p50_ms']:.2f} ms | "
                f"{r['itl_p50_ms']:.2f} ms | {r['itl_p99_ms']:.2f} ms |"
                for r in rows
            ),
            "",
            targets(entry.get("ratios", {}), GPU_TARGETS, missing=GPU_MISSING),
        ]
        for check in checks:
            parts += ["", greedy_check(check)]
        if entry.get("step_costs"):
            parts += ["", step_costs_table(entry["step_costs"])]
        copies = entry.get("copies")
        if copies:
            parts += [
                "",
                f"Where the cache lives: {copies['cache_buffers_on_device']} cache buffers on "
                f"{', '.join(copies['cache_buffer_devices'])} "
                f"({copies['cache_bytes_on_device'] / 2**20:.0f} MiB for 16 slots); ONNX Runtime's "
                f"profiler over {copies['decode_steps']} decode steps of {copies['rows']} rows "
                f"(and the prefill) recorded {copies['memcpy_kernel_events']} Memcpy nodes among "
                f"{copies['node_kernel_events']} node runs.",
            ]
    return "\n".join(parts)


STEP_PARTS = [
    ("decode step (StaticDecode.run)", "model step (inputs up, replayed graph)"),
    ("inputs up (OrtValue.update_inplace)", "of which inputs up (one copy)"),
    ("argmax on the device", "argmax on the device (replayed graph)"),
    ("logits to the host", "whole logits to the host"),
]


def step_costs_table(costs: list[dict[str, Any]]) -> str:
    """Where a decode step's time goes (bench/gpu.py step_costs), microseconds per step."""
    head = " | ".join(f"{c['streams']} stream{'s' if c['streams'] > 1 else ''}" for c in costs)
    lines = [
        "Where a decode step's time goes (engine alone, defaults; microseconds per decode step, "
        "timers around each call; the rest is the scheduler's Python and event hand-off):",
        "",
        f"| part | {head} |",
        "| --- |" + " ---: |" * len(costs),
    ]
    for key, name in STEP_PARTS:
        cells = " | ".join(f"{c[key]['us_per_step']:.0f}" for c in costs)
        lines.append(f"| {name} | {cells} |")
    timed = [STEP_PARTS[0][0], STEP_PARTS[2][0], STEP_PARTS[3][0]]
    rests = [c["wall_us_per_step"] - sum(c[k]["us_per_step"] for k in timed) for c in costs]
    rest = " | ".join(f"{r:.0f}" for r in rests)
    lines.append(f"| the rest | {rest} |")
    wall = " | ".join(f"{c['wall_us_per_step']:.0f}" for c in costs)
    lines.append(f"| whole step (wall, timed) | {wall} |")
    return "\n".join(lines)


def greedy_check(check: dict[str, Any]) -> str:
    """One sentence per correctness record of bench/gpu.py (older records lack some counts)."""
    n = check["of"]
    said = [f"Greedy ids, {n} prompts of 32 tokens:"]
    if "alone_equal_genai_alone" in check:
        said.append(
            f"tokenwire alone equals GenAI alone for {check['alone_equal_genai_alone']}, and "
            f"GenAI's batch of 16 equals GenAI alone for "
            f"{check['genai_batch16_equal_genai_alone']};"
        )
    said.append(
        f"tokenwire alone equals GenAI's batch of 16 for {check['alone_equal_genai']}; "
        f"tokenwire's 16 together equal their solo ids for {check['batched_equal_alone']}"
    )
    if "mixed_lengths_batched_equal_alone" in check:
        said.append(
            f"(prompts of 16 different lengths: {check['mixed_lengths_batched_equal_alone']})"
        )
    said.append(f"; the shortest prefix shared with GenAI is {check['alone_common_prefix_min']}.")
    return " ".join(said).replace(" ;", ";")


README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


README_GPU_EXTRAS = [
    (
        "grpc_c16_staggered_vs_genai_static_server",
        "Staggered vs GenAI's static-batching server on the same arrivals:",
        "staggered streams vs GenAI's static-batching server",
    ),
    (
        "grpc_c16_mixed_vs_genai_static_server",
        "The same with mixed lengths:",
        "the same with mixed lengths",
    ),
    (
        "grpc_c16_sampled_vs_genai_b16_sampled",
        "16 sampling streams vs GenAI sampling alike:",
        "16 sampling streams vs GenAI sampling alike",
    ),
]
"""The GPU ratios the README line gives where the GPU run has them: key, the words before
the value, the name for the list of those it lacks."""


def readme_gpu(gpu: dict[str, Any] | None) -> list[str]:
    if gpu is None:
        return []
    lines = [
        f"- on an {gpu['machine']['gpu'].split(',')[0]} (CUDA provider, the same fp16 GenAI "
        "graph for both; tokenwire replays its decode steps as CUDA graphs, GenAI's row is its "
        "best: CUDA graphs at batch 1, where it can capture them), from an older run than the "
        f"lines above, not repeated since: the GPU run of {gpu_run(gpu)}:"
    ]
    for name, entry in gpu["models"].items():
        r = entry.get("ratios")
        if not r:
            continue
        one = next(
            x
            for x in entry["rows"]
            if x.get("transport") == "grpc" and x["concurrency"] == 1 and "tokens_per_s" in x
        )
        lines.append(
            f"  {name}: one stream over gRPC {one['tokens_per_s']:.0f} tokens/s = "
            f"{r['grpc_b1_vs_genai_b1']:.2f}x GenAI; a burst of 16 over gRPC "
            f"{r['grpc_c16_burst_vs_genai_b16']:.2f}x and 16 staggered "
            f"{r['grpc_c16_staggered_vs_genai_b16']:.2f}x GenAI's static batch of 16 (the engine "
            f"alone: {r['engine_c16_vs_genai_b16']:.2f}x); CUDA graphs "
            f"{r['cuda_graph_vs_uncaptured_b1']:.1f}x uncaptured steps at 1 stream."
            + "".join(f" {text} {r[key]:.2f}x." for key, text, _ in README_GPU_EXTRAS if key in r)
            + (
                " Not measured on the GPU (the GPU run predates them): "
                + ", ".join(what for key, _, what in README_GPU_EXTRAS if key not in r)
                + "."
                if any(key not in r for key, _, _ in README_GPU_EXTRAS)
                else ""
            )
        )
    return lines


def readme_transport(found: dict[str, Any] | None) -> list[str]:
    """The transport ceiling in one line: the most tokens/s one server process delivered."""
    if not found:
        return []

    def best(transport: str) -> dict[str, Any]:
        return max(
            (r for r in found["rows"] if r["transport"] == transport),
            key=lambda r: r["tokens_per_s"],
        )

    grpc = best("grpc")
    bare = next(
        (
            r
            for r in found["rows"]
            if r["transport"] == "grpc-bare" and r["concurrency"] == grpc["concurrency"]
        ),
        None,
    )
    beside = (
        ""
        if bare is None
        else f"; grpcio's own asyncio server, streaming the same messages from a plain loop, "
        f"at the same {grpc['concurrency']} streams: {bare['tokens_per_s']:,.0f}"
    )
    return [
        f"- one server process delivers up to {grpc['tokens_per_s']:,.0f} tokens/s over gRPC "
        f"when the model costs next to nothing ({grpc['concurrency']} streams, a stand-in "
        f"model of {found['step_ms']} ms per step{beside});"
    ]


def threads_text(result: dict[str, Any]) -> str:
    """How many intra-op threads the systems computed with, as the run recorded it."""
    found = result.get("threads")
    if not found:
        return "GenAI with one intra-op thread per core"
    n = found["intra_op_threads"]
    return (
        f"with {n} intra-op thread{'s' if n > 1 else ''} each (tokenwire's CPU budget: "
        f"{found['source']})"
    )


def readme_width(result: dict[str, Any]) -> str:
    """Where tokenwire sampled over fewer ids than GenAI (a tokenizer smaller than the model's
    vocabulary, or one not recorded: results before schema 2), the words that say so."""
    model = result["model"]
    vocab = model.get("vocab", 32000)
    named = model.get("tokenizer_vocab")
    if named is None:
        return (
            f" (in this run tokenwire sampled over the 20,489 ids its tokenizer had, GenAI over "
            f"all {vocab:,}: about 2.5 % of the top-p ratio is that)"
        )
    if named < vocab:
        return (
            f" (tokenwire sampled over the {named:,} ids its tokenizer has, GenAI over {vocab:,})"
        )
    return ""


def readme_block(result: dict[str, Any], gpu: dict[str, Any] | None = None) -> str:
    r = result["ratios"]

    def tokenwire(graph: str, c: int, arrival: str) -> dict[str, Any]:
        return next(
            x
            for x in result["rows"]
            if x["system"] == "tokenwire"
            and x.get("graph") == graph
            and x["transport"] == "grpc"
            and x["concurrency"] == c
            and x["arrival"] == arrival
        )

    svc1, svc16 = tokenwire("genai-fp32", 1, "burst"), tokenwire("genai-fp32", 16, "poisson")
    mixed = tokenwire("genai-fp32", 16, "poisson-mixed")
    int4 = tokenwire("genai-int4", 1, "burst")
    int4_c16 = tokenwire("genai-int4", 16, "burst")
    genai_int4_b16 = next(
        x
        for x in result["rows"]
        if x["system"] == "ort-genai" and x.get("graph") == "genai-int4" and x["concurrency"] == 16
    )
    return "\n".join(
        [
            START,
            f"On a {result['machine']['cores']}-core {cpu_name(result['machine']['cpu'])} CPU, "
            f"{result['model'].get('params_millions', 56)}M-parameter Llama "
            f"{result['model'].get('training', 'with random weights')}, 32-token prompts, 128 new "
            f"tokens, {threads_text(result)} ({result['machine']['date']}). Every comparison "
            "with GenAI or the plain ORT loop runs all its systems on the same ONNX Runtime "
            "GenAI graph (fp32, or int4 where said); the SSE-edge and metrics lines measure "
            "tokenwire alone, serving the Optimum-layout export of the same weights, and the "
            "transport line a stand-in model:",
            "",
            f"- one stream over gRPC, fp32: {svc1['tokens_per_s']:.0f} tokens/s, TTFT p50 "
            f"{svc1['ttft_p50_ms']:.0f} ms = {r['genai_graph_b1_vs_genai_b1']:.2f}x ONNX Runtime "
            f"GenAI's Generator, {r['grpc_vs_loop_b1']:.2f}x the plain ORT loop "
            f"(engine alone: {r['engine_alone_vs_loop_b1']:.2f}x);",
            f"- 16 streams arriving staggered: {svc16['tokens_per_s']:.0f} tokens/s, TTFT p50 "
            f"{svc16['ttft_p50_ms']:.0f} ms = "
            f"{r['genai_graph_c16_staggered_vs_genai_static_server']:.2f}x the tokens/s of GenAI's "
            f"static batch of 16 serving the same arrivals, at "
            f"{r['genai_graph_c16_staggered_ttft_p50_vs_genai_static_server']:.2f}x its TTFT p50 "
            f"({r['genai_graph_c16_staggered_vs_genai_b16']:.2f}x its batch of 16 given all 16 "
            f"prompts at once); every request here asks for the same 128 tokens, so a static "
            f"batch never holds a finished row;",
            f"- 16 streams arriving staggered with mixed lengths (16-240 tokens, mean 128): "
            f"{mixed['tokens_per_s']:.0f} tokens/s, TTFT p50 {mixed['ttft_p50_ms']:.0f} ms = "
            f"{r['genai_graph_c16_mixed_vs_genai_static_server']:.2f}x the tokens/s of GenAI's "
            f"static batch of 16 serving the same arrivals and lengths, at "
            f"{r['genai_graph_c16_mixed_ttft_p50_vs_genai_static_server']:.2f}x its TTFT p50;",
            f"- 16 streams sampling (temperature 0.8, top-k 50, top-p 0.95) at once: "
            f"{r['genai_graph_c16_sampled_vs_genai_b16_sampled']:.2f}x GenAI's static batch of "
            f"16 sampling alike; OpenAI-style (temperature 0.7, top-p 0.9, no top-k): "
            f"{r['genai_graph_c16_top_p_vs_genai_b16_top_p']:.2f}x{readme_width(result)};",
            f"- int4 weights, one stream: {int4['tokens_per_s']:.0f} tokens/s = "
            f"{r['int4_b1_vs_genai_int4_b1']:.2f}x GenAI int4; 16 streams at once: "
            f"{int4_c16['tokens_per_s']:.0f} tokens/s, against GenAI int4's batch of 16 "
            f"{genai_int4_b16['tokens_per_s']:.0f} (whose rows' tokens may depend on their batch);",
            *readme_transport(result.get("transport")),
            f"- SSE edge (Optimum graph): {r['edge_c16_vs_grpc_c16']:.2f}x direct gRPC tokens/s "
            f"at 16 streams, +{r['edge_ttft_p50_added_ms']:.1f} ms TTFT p50;",
            f"- metrics exporter on vs off (Optimum graph): {r['metrics_on_vs_off_c16']:.2f}x"
            + (";" if gpu else "."),
            *readme_gpu(gpu),
            "",
            "Full table, plots, the targets missed and why: [docs/benchmarks.md](docs/benchmarks.md)"
            " (`make bench` regenerates it).",
            END,
        ]
    )


def update_readme(result: dict[str, Any], gpu: dict[str, Any] | None) -> None:
    text = README.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + readme_block(result, gpu) + rest.split(END, 1)[1]
        README.write_text(text)


def transport(found: dict[str, Any] | None) -> str:
    """The transport-ceiling table (bench/transport.py), or why there is none."""
    if not found:
        return "Not measured in this run."
    lines = [
        f"A stand-in model that spends {found['step_ms']} ms per step with the GIL released (as "
        "the host thread does while a GPU computes) and always picks the same token; engine, "
        "scheduler, detokeniser, gRPC server and metrics are the real ones. Each stream asks for "
        f"{found['new_tokens']} tokens, all streams at once.",
        "",
        "| system | streams | tokens/s | server CPU µs/token |",
        "| --- | ---: | ---: | ---: |",
    ]
    names = {
        "engine-alone": "engine alone (no transport)",
        "grpc": "tokenwire over gRPC",
        "grpc-bare": "bare grpc.aio servicer, same messages (no engine)",
    }
    for row in found["rows"]:
        cpu = row.get("server_cpu_ms_per_token")
        lines.append(
            f"| {names[row['transport']]} | {row['concurrency']} | {row['tokens_per_s']:.0f} | "
            f"{'' if cpu is None else f'{cpu * 1000:.0f}'} |"
        )
    return "\n".join(lines)


OLD_KNOBS = (
    "- settings this run's knobs above leave out or misstate (results before schema 2 did not "
    "write them; the benchmark code of the run's commit ran with them): GenAI's Generator "
    "with search options max_length = min_length = prompt + new tokens (EOS is forbidden until "
    "min_length, which is how GenAI ignores it) and past_present_share_buffer true "
    "(genai_config.json's search section); GenAI's Engine with min and max generated tokens "
    "both the request's own length, which in poisson-mixed is the request's seeded draw "
    "(16-240), not 128; tokenwire's server with max_kv_tokens 16384, each request up to the "
    "model's context of 512 positions, on the GenAI graphs one cache preallocated at start of "
    "32 slots x 512 positions, on the Optimum graph a cache that grows each step; the engine "
    "alone with EngineConfig(max_batch_size=16), the rest its defaults (16 slots x 512 "
    "positions on the GenAI graphs); and tokenwire's TTFT and latency clocks started when its "
    "client sent each request, not at the request's scheduled arrival, where the peers serving "
    "the same load start theirs (a client late to send flattered tokenwire's staggered TTFT "
    "a little)"
)
"""What results of schema 1 lack in their knobs, true of the code that made them."""


def knobs(result: dict[str, Any]) -> str:
    """One line per system: the settings it ran with; for older results, what they left out."""
    lines = [
        f"- `{name}` ran with: {text}"
        for name, text in sorted(result.get("peer_knobs", {}).items())
    ]
    if result.get("schema", 1) < 2:
        lines.append(OLD_KNOBS)
    return "\n".join(lines)


def sampling_width(result: dict[str, Any]) -> str:
    """How many ids each system samples over: tokenwire over those its tokenizer names (at most
    the model's vocabulary), GenAI over every column of the logits."""
    model = result["model"]
    vocab = model.get("vocab", 32000)
    named = model.get("tokenizer_vocab")
    if named is None:
        return (
            "tokenizer size not recorded in this run: the benchmark model of results before "
            "schema 2 had a tokenizer of 20,489 tokens (trained on 4 MB of CPython's sources) "
            f"over its {vocab:,}-row embedding, so tokenwire sampled over 20,489 ids and GenAI "
            f"over all {vocab:,}; sampling 16 such rows at top-p took tokenwire's sampler "
            "0.75 ms a step against 1.10 ms at the full width (0.26 against 0.30 ms with "
            "top-k 50), which flatters the top-p ratio by about 2.5 %"
        )
    if named >= vocab:
        return (
            f"its tokenizer names all {vocab:,} ids, so tokenwire and GenAI sample over the same "
            f"{vocab:,}"
        )
    return (
        f"its tokenizer names {named:,} of the {vocab:,} ids: tokenwire samples over those "
        f"{named:,}, GenAI over all {vocab:,} (a narrower row is cheaper to sample, which "
        "flatters tokenwire's sampled ratios)"
    )


PLACEHOLDER = re.compile(r"\{\{([^{}]*)\}\}")
"""{{name}} in bench/analysis.md: a figure of the published run, filled from latest.json."""
NOT_IN_RUN = "not in this run"


def find_row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def analysis_values(result: dict[str, Any], gpu: dict[str, Any] | None = None) -> dict[str, str]:
    """Every figure bench/analysis.md may quote of the published run (and when the GPU run
    was made), by placeholder name: `ratio:KEY` and `rounds:KEY` for each ratio and its rounds
    (min-max), and the named ones below. A figure the run lacks reads NOT_IN_RUN."""
    ratios, rows, m = result["ratios"], result["rows"], result["machine"]
    values = {
        "run": f"{m['date']}, commit {m['git_commit']}",
        "gpu_run": "(none recorded)" if gpu is None else gpu_run(gpu),
        "run_minutes": f"{result['wall_s'] / 60:.0f}",
        "edge_ttft_added_ms": f"{ratios['edge_ttft_p50_added_ms']:.1f}",
        **{f"ratio:{key}": f"{value:.2f}" for key, value in ratios.items()},
        **{
            f"rounds:{key}": f"{min(each):.2f}-{max(each):.2f}"
            for key, each in result.get("ratio_rounds", {}).items()
        },
    }
    # Single-stream peers: how far their slowest round fell below their fastest.
    lows = [
        min(x["tokens_per_s"] for x in r["rounds"]) / max(x["tokens_per_s"] for x in r["rounds"])
        for r in rows
        if r["system"] in ("ort-loop", "ort-genai")
        and r["concurrency"] == 1
        and len(r.get("rounds", [])) > 1
    ]
    values["peer_round_low_pct"] = f"{min(lows) * 100:.0f}" if lows else NOT_IN_RUN
    # GenAI's Generator at one stream: CPU per token, and the bound a server's 0.33 ms of CPU
    # per token outside ONNX Runtime sets on the same cores (arithmetic, not a measurement).
    for graph, name in (("genai-int4", "int4"), ("genai-fp32", "fp32")):
        row = (
            find_row(rows, graph=graph, system="ort-genai", concurrency=1, decoding="greedy") or {}
        )
        cpu = row.get("cpu_ms_per_token")
        values[f"genai_cpu_ms_{name}"] = NOT_IN_RUN if cpu is None else f"{cpu:.2f}"
        values[f"genai_token_ms_{name}"] = (
            f"{1000 / row['tokens_per_s']:.2f}" if row else NOT_IN_RUN
        )
        values[f"bound_{name}"] = NOT_IN_RUN if cpu is None else f"{cpu / (cpu + 0.33):.2f}"
    fair = {f["prefill_chunk_tokens"]: f for f in result.get("fairness", [])}
    for chunk in (256, 64):
        f = fair.get(chunk)
        values[f"fair_worst_ms_{chunk}"] = (
            NOT_IN_RUN if f is None else f"{f['itl_max_ms_during_prefill']:.0f}"
        )
        values[f"fair_ttft_ms_{chunk}"] = (
            NOT_IN_RUN if f is None else f"{f['long_prompt_ttft_ms']:.0f}"
        )
    normal = [f["itl_p50_ms_otherwise"] for f in fair.values()]
    values["fair_normal_ms"] = f"{min(normal):.1f}-{max(normal):.1f}" if normal else NOT_IN_RUN
    ceiling = result.get("transport") or {"rows": []}
    for transport, name in (("engine-alone", "alone"), ("grpc", "grpc"), ("grpc-bare", "bare")):
        for c in (16, 64):
            found = find_row(ceiling["rows"], transport=transport, concurrency=c)
            values[f"transport_{name}_{c}"] = (
                NOT_IN_RUN if found is None else f"{round(found['tokens_per_s'], -2):,.0f}"
            )
    static = (
        find_row(
            rows, graph="genai-fp32", system="ort-genai-static-server", arrival="poisson-mixed"
        )
        or {}
    )
    making = static.get("generator_making_ms_in_clock")
    values["static_mixed_making"] = (
        "not recorded in this run"
        if making is None
        else f"{static['generators_made_in_clock']} Generators made inside the requests' "
        f"clocks, {making:.0f} ms of the {static['span_s']:.1f} s span "
        f"({making / 10 / static['span_s']:.1f} %)"
    )
    return values


def fill(text: str, values: dict[str, str], source: Path = ANALYSIS) -> str:
    """`text` with every {{name}} replaced by values[name]; an unknown name stops the report
    (a figure nobody fills would be printed as a stale or empty one)."""
    unknown = sorted({name for name in PLACEHOLDER.findall(text) if name not in values})
    if unknown:
        raise SystemExit(
            f"{source}: unknown placeholder(s) {', '.join(unknown)}; report.py analysis_values "
            f"names: {', '.join(sorted(values))}"
        )
    filled = PLACEHOLDER.sub(lambda found: values[found.group(1)], text)
    if "{{" in filled or "}}" in filled:
        raise SystemExit(f"{source}: a placeholder is not closed ({{{{name}}}})")
    return filled


def main() -> None:
    result = json.loads(RESULTS.read_text())
    gpu = json.loads(GPU_RESULTS.read_text()) if GPU_RESULTS.exists() else None
    update_readme(result, gpu)
    plots([row for row in result["rows"] if "graph" not in row])
    m, w = result["machine"], result["workload"]
    analysis = fill(ANALYSIS.read_text(), analysis_values(result, gpu)) if ANALYSIS.exists() else ""
    doc = f"""# Benchmarks

Regenerate with `make bench` (this run measured for {result["wall_s"] / 60:.0f} minutes on
{m["cores"]} cores, once its environment and models existed; `make bench-quick` for a shorter run).
Everything below comes from `bench/results/latest.json`, measured side by side in one run.

- machine: {m["cpu"]}, {m["cores"]} cores; Python {m["python"]}; ONNX Runtime {m["onnxruntime_service"]}
  (service, CPU provider of onnxruntime-gpu) / {m["onnxruntime_peers"]} (peers); ONNX Runtime GenAI
  {m["onnxruntime_genai"]}; commit {m["git_commit"]}; {m["date"]}{" (quick run)" if result["quick"] else ""}
- model: Llama, 8 layers, hidden 512, vocab {result["model"].get("vocab", 32000)}, {result["model"].get("params_millions", 56)}M parameters
  (the output layer shares the embedding's weights), {result["model"].get("training", "with random weights")}
  (`bench/build_models.py`): its next-token distributions are peaked as a trained model's, which is what sampled rows need;
  {sampling_width(result)};
  fp32, CPU; the same weights in the Optimum layout (tokenwire and the plain loop) and the GenAI
  format
- workload: prompt {w["prompt_tokens"]} tokens, {w["new_tokens"]} new tokens, greedy, EOS ignored;
  tokenwire over gRPC on loopback with a light asyncio client in the same machine; staggered
  loads: 32 Poisson arrivals keeping about 16 in flight, every request asking for
  {w["new_tokens"]} tokens (`poisson`) or, on the same arrivals, for mixed lengths (`poisson-mixed`,
  {w.get("mixed_output_lengths", "not measured in this run")})
{knobs(result)}

## Targets

{targets(result["ratios"], rounds=result.get("ratio_rounds", {}))}

Each target compares systems on the same graph. A ratio with rounds is paired: each round runs
every system once in turn, the ratio is taken within each round, and the value is its median
over the rounds; the column gives the lowest and highest round (and how many rounds).

## Other comparisons (informational, not targets)

No pass or fail here: comparisons beside the targets, some between different graphs (said in
the row), and the costs of the edge, the metrics exporter and the server's CPU.

{informational(result["ratios"], result.get("ratio_rounds", {}))}

## All runs

CPU ms/token: "server only" is the tokenwire server process; "with the client" adds the load
generator's process for tokenwire rows, and for the plain loop, GenAI and the engine alone is
their one process, which holds its own caller.

{table(result["rows"])}

![throughput](img/bench-throughput.png)

![latency](img/bench-latency.png)

## Prefill fairness

A 400-token prompt arrives while 4 streams decode. Prefill is interleaved with decoding, one
chunk of `TOKENWIRE_PREFILL_CHUNK_TOKENS` per step, so running streams wait for one chunk at a
time, never for the whole prompt.

{fairness(result["fairness"])}

## Transport ceiling

How many tokens/s one server process delivers when the model costs next to nothing
(`bench/transport.py`): the bound a fast GPU meets.

{transport(result.get("transport"))}

## GPU

{gpu_section(gpu, result) if gpu else "No GPU run is recorded (`bench/gpu.sh` makes one)."}

{analysis}
"""
    DOC.write_text(doc)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
