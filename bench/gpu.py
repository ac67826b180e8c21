"""GPU benchmark: tokenwire against ONNX Runtime GenAI on one fp16 GenAI graph, CUDA provider.

Runs on a machine with an NVIDIA GPU and one Python that has torch, transformers, onnx,
onnxruntime-gpu and onnxruntime-genai-cuda, with tokenwire importable (bench/gpu.sh prepares
that on a bare GPU machine). Every system runs the same graph, built here by GenAI's own model
builder (`-p fp16 -e cuda`) from random-initialised Llama weights, with the same prompt ids
(32 tokens), 128 greedy new tokens:

- ORT GenAI Generator, batch 1 and a static batch of 16, with and without its CUDA graph
  capture (`enable_cuda_graph`; the faster of the two is the peer's row);
- tokenwire's engine alone (no transport), cache in device memory with decode steps replayed
  as CUDA graphs (the default), the same uncaptured, a cache that grows every step (as graphs
  without GroupQueryAttention have it) kept on the device between steps, and the copying cache
  (host arrays fed and fetched every step), to show what graphs and staying on the device are
  worth;
- tokenwire over gRPC (a server process on loopback): 1 stream, a burst of 16, and 16 with
  staggered (Poisson) arrivals;
- correctness: tokenwire's greedy ids (alone and in a batch of 16) against GenAI's;
- ORT's profiler over decode steps: Memcpy nodes and host<->device copies per step.

    python bench/gpu.py --out bench/results/gpu.json [--sizes bench-56m,bench-350m]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import engine_alone  # bench/ is this script's directory
import numpy as np
from build_models import genai_builder
from peers import (
    MIXED,
    SAMPLED,
    GeneratorPool,
    Served,
    arrival_offsets,
    genai_generator,
    genai_loop,
    genai_steps,
    nearest_rank,
    output_lengths,
    rewinds_cleanly,
    static_batches,
    summarise,
    summarise_served,
    timed,
)

ROOT = Path(__file__).resolve().parent.parent
PROMPT_TOKENS = 32
NEW_TOKENS = 128
VOCAB = 32000
# `--provider cpu` runs the same script on the CPU provider (fp32 graph): a dry run of it.
PROVIDER = {"name": "cuda", "precision": "fp16"}
SIZES: dict[str, dict[str, int]] = {
    # The CPU benchmark's model (bench/build_models.py), so the two reports read together.
    "bench-56m": {"layers": 8, "hidden": 512, "heads": 8, "kv_heads": 8, "intermediate": 1376},
    "bench-350m": {"layers": 24, "hidden": 1024, "heads": 16, "kv_heads": 8, "intermediate": 2816},
}


# -- the model ------------------------------------------------------------------------------


def build(name: str, work: Path) -> Path:
    """GenAI fp16 CUDA folder for SIZES[name]: random Llama weights, a word-level tokenizer of
    the same vocabulary (ids are what is measured; text is incidental)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = work / name / f"genai-{PROVIDER['precision']}"
    if (out / "genai_config.json").exists():
        return out
    hf_dir = work / name / "hf"
    size = SIZES[name]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).eval().save_pretrained(hf_dir)
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(hf_dir)
    built = subprocess.run(
        genai_builder(hf_dir, out, PROVIDER["precision"], PROVIDER["name"], work / name / "cache"),
        check=False,
        capture_output=True,
        text=True,
    )
    if built.returncode:
        raise RuntimeError(f"the GenAI builder failed:\n{built.stderr[-4000:]}")
    return out


def prompts(count: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[int(t) for t in row] for row in rng.integers(10, VOCAB - 10, (count, PROMPT_TOKENS))]


@contextlib.contextmanager
def cuda_graph(model_dir: Path, enabled: bool) -> Iterator[None]:
    """GenAI's genai_config with CUDA graph capture on or off (restored afterwards)."""
    path = model_dir / "genai_config.json"
    if PROVIDER["name"] != "cuda":
        yield
        return
    original = path.read_text()
    config = json.loads(original)
    options = config["model"]["decoder"].setdefault("session_options", {})
    providers = options.setdefault("provider_options", [{"cuda": {}}])
    for entry in providers:
        if "cuda" in entry:
            entry["cuda"]["enable_cuda_graph"] = "1" if enabled else "0"
    path.write_text(json.dumps(config, indent=4))
    try:
        yield
    finally:
        path.write_text(original)


# -- ORT GenAI --------------------------------------------------------------------------------


Reference = dict[str, dict[int, list[int]]]


def genai_rows(model_dir: Path) -> tuple[list[dict[str, Any]], Reference]:
    """GenAI at batch 1 and 16, CUDA graph capture off and on; its greedy ids for each prompt
    in a batch of 16 ("b16") and alone ("b1"). Each row reuses one Generator, made before the
    clock (peers.GeneratorPool), where a rewound Generator was seen to give a fresh one's
    greedy ids on this provider (peers.rewinds_cleanly); otherwise each run makes its own, the
    clock started before its GeneratorParams. The row's knobs say which."""
    import onnxruntime_genai as og

    rows: list[dict[str, Any]] = []
    reference: Reference = {"b16": {}, "b1": {}}
    for graph in (False, True) if PROVIDER["name"] == "cuda" else (False,):
        with cuda_graph(model_dir, graph):
            model = og.Model(str(model_dir))
            for batch in (1, 16):
                keep = reference["b16"] if batch == 16 and not graph else None
                try:
                    pool = genai_pool(og, model, batch)
                    generate = genai_generate(model, batch, keep, pool=pool)
                    row = timed(generate, batch, NEW_TOKENS, repeats=5)
                except Exception as exc:  # e.g. CUDA graphs refused for this shape
                    print(f"  genai cuda_graph={graph} b={batch}: {exc}", flush=True)
                    continue
                rows.append(
                    {
                        "system": "ort-genai",
                        "transport": "in-process",
                        "concurrency": batch,
                        "arrival": "static-batch",
                        "knobs": {"enable_cuda_graph": graph, "generator_reused": pool.reuse},
                        **row,
                    }
                )
                say(rows[-1])
            if not graph:
                for i, ids in enumerate(prompts(16)):
                    alone: dict[int, list[int]] = {}
                    genai_generate(model, 1, alone, [ids])()
                    reference["b1"][i] = alone[0]
    return rows, reference


def genai_pool(og: Any, model: Any, batch: int) -> GeneratorPool:
    """A pool with the Generator of `batch` rows made, reusing it if rewinding it gives a fresh
    Generator's greedy ids here."""
    ids = np.asarray(prompts(batch), dtype=np.int64)
    try:
        reuse = rewinds_cleanly(og, model, ids, NEW_TOKENS)
    except Exception as exc:  # a provider or graph mode that cannot rewind
        print(f"  genai b={batch}: no rewind ({exc})", flush=True)
        reuse = False
    pool = GeneratorPool(og, model, reuse=reuse)
    if reuse:
        pool.make(batch, PROMPT_TOKENS + NEW_TOKENS)
    return pool


def genai_generate(
    model: Any,
    batch: int,
    keep: dict[int, list[int]] | None,
    rows: list[list[int]] | None = None,
    *,
    pool: GeneratorPool | None = None,
) -> Any:
    """One timed GenAI generation of `batch` prompts; `keep` receives the new ids. With a pool
    that reuses its Generators the clock starts before the prompt goes in; otherwise before
    a fresh Generator's GeneratorParams."""
    import onnxruntime_genai as og

    ids = np.asarray(prompts(batch) if rows is None else rows, dtype=np.int64)

    def generate() -> tuple[float, list[float], float]:
        if pool is not None and pool.reuse:
            generator = pool.get(batch, PROMPT_TOKENS + NEW_TOKENS)
            started, times = genai_steps(generator, ids, NEW_TOKENS)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            ttft, total = times[0] - started, times[-1] - started
        else:
            ttft, gaps, total, generator = genai_loop(og, model, ids, PROMPT_TOKENS + NEW_TOKENS)
        if keep is not None:
            for i in range(batch):
                keep[i] = [int(t) for t in generator.get_sequence(i)][PROMPT_TOKENS:]
        return ttft, gaps, total

    return generate


# -- tokenwire --------------------------------------------------------------------------------


# Engine configurations compared: (cache label, device_cache, preallocated, cuda_graph).
ENGINE_CONFIGS = (
    ("device", True, True, True),  # the defaults of `tokenwire serve` on CUDA
    ("device-uncaptured", True, True, False),
    # A cache that grows every step, as graphs without GroupQueryAttention (Optimum exports)
    # have it, kept on the device between steps: what such graphs get on CUDA.
    ("device-growing", True, False, False),
    ("copying", False, False, False),
)


def engine_rows(model_dir: Path, reference: Reference) -> list[dict[str, Any]]:
    """The engine alone, in this process: device cache with decode steps replayed as CUDA
    graphs (the default), the same without graphs, a cache that grows every step kept on the
    device, and the copying cache."""
    from tokenwire.server.engine import Engine, EngineConfig, OnnxCausalLM
    from tokenwire.server.tokenizer import Tokenizer

    rows = []
    for where, device_cache, preallocated, graphs in ENGINE_CONFIGS:
        model = OnnxCausalLM(
            model_dir,
            provider=PROVIDER["name"],
            device_cache=device_cache,
            preallocated=preallocated,
            cuda_graph=graphs,
            static_decode=graphs,  # the fixed bindings also run where nothing is captured (CPU)
        )
        engine = Engine(model, Tokenizer.from_dir(model_dir), EngineConfig(max_batch_size=32))
        engine.warm_up()
        engine.start()
        facts = {
            "provider": model.provider,
            "kv_in_place": engine.kv_in_place,
            "captures_graphs": model.captures_graphs,
            "cache": where,
        }
        print(f"  engine: {facts}", flush=True)
        try:
            for streams in (1, 16):
                row = asyncio.run(engine_load(engine, streams))
                rows.append(
                    {
                        "system": "tokenwire",
                        "transport": "engine-alone",
                        "concurrency": streams,
                        "arrival": "burst",
                        **facts,
                        **row,
                    }
                )
                say(rows[-1])
            if where == "device":
                rows.append(asyncio.run(correctness(engine, reference)))
                rows[-1]["decode_graphs"] = model.decode_graphs
                print(f"  correctness: {rows[-1]}", flush=True)
        finally:
            engine.shutdown()
    return rows


async def engine_load(engine: Any, streams: int) -> dict[str, Any]:
    runs = []
    await engine_burst(engine, streams, 16)  # warm every batch shape
    for _ in range(5 if streams == 1 else 3):
        runs.append(await engine_burst(engine, streams, NEW_TOKENS))
    total, ttft, gaps = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    return summarise(streams, NEW_TOKENS, ttft, gaps, total=total, cpu=0.0)


async def engine_burst(engine: Any, streams: int, new: int) -> tuple[float, float, list[float]]:
    ttft, gaps, total = await engine_alone.run(engine, prompts(streams), new)
    return total, ttft, gaps


async def correctness(engine: Any, reference: Reference) -> dict[str, Any]:
    """Greedy ids alone and with 15 neighbours joining at different steps, against GenAI's
    alone and in its batch of 16; and prompts of 16 different lengths, alone and together."""
    from tokenwire.server.domain import GenerationRequest, SamplingParams, TokenEvent

    async def ids_of(i: int, ids: list[int], delay: float) -> list[int]:
        await asyncio.sleep(delay)
        request = GenerationRequest(
            f"c{i}-{time.monotonic_ns()}",
            "",
            prompt_ids=tuple(ids),
            max_tokens=NEW_TOKENS,
            sampling=SamplingParams(temperature=0.0),
            ignore_eos=True,
        )
        return [
            e.token_id async for e in engine.submit(request).events() if isinstance(e, TokenEvent)
        ]

    rows = prompts(16)
    alone = [await ids_of(i, p, 0.0) for i, p in enumerate(rows)]
    together = await asyncio.gather(*(ids_of(i, p, 0.002 * i) for i, p in enumerate(rows)))
    mixed = [p[: 8 + (i * 5) % 25] for i, p in enumerate(rows)]
    mixed_alone = [await ids_of(i, p, 0.0) for i, p in enumerate(mixed)]
    mixed_together = await asyncio.gather(*(ids_of(i, p, 0.0) for i, p in enumerate(mixed)))
    b1, b16 = reference["b1"], reference["b16"]
    return {
        "check": "greedy ids vs ORT GenAI on the same graph",
        "alone_equal_genai_alone": sum(alone[i] == b1.get(i) for i in range(16)),
        "alone_equal_genai": sum(alone[i] == b16.get(i) for i in range(16)),
        "genai_batch16_equal_genai_alone": sum(b16.get(i) == b1.get(i) for i in range(16)),
        "batched_equal_alone": sum(together[i] == alone[i] for i in range(16)),
        "mixed_lengths_batched_equal_alone": sum(
            mixed_together[i] == mixed_alone[i] for i in range(16)
        ),
        "alone_common_prefix_min": min(prefix(alone[i], b1.get(i, [])) for i in range(16)),
        "of": 16,
    }


def prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def grpc_rows(model_dir: Path) -> list[dict[str, Any]]:
    """A tokenwire server process (CUDA, device cache) on loopback, driven over gRPC."""
    env = {
        **os.environ,
        "TOKENWIRE_MODEL_DIR": str(model_dir),
        "TOKENWIRE_PROVIDER": PROVIDER["name"],
        "TOKENWIRE_PORT": "0",
        "TOKENWIRE_METRICS_PORT": "0",
        "TOKENWIRE_LOG_FORMAT": "json",
        "TOKENWIRE_MAX_BATCH_SIZE": "32",
        "TOKENWIRE_MAX_QUEUE": "256",
    }
    code = (
        "import sys; from tokenwire.server.config import Settings; "
        "from tokenwire.server.main import serve; sys.exit(serve(Settings.from_env()))"
    )
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=log)
    try:
        port = wait_for_port(Path(log.name), proc)
        return asyncio.run(grpc_load(port))
    finally:
        proc.terminate()
        proc.wait(60)


def wait_for_port(log: Path, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 300
    port, started = 0, False
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "server.listening":
                    port = int(event["port"])
                started = started or event.get("event") == "server.started"
        if port and started:
            return port
        time.sleep(0.2)
    raise RuntimeError(f"server did not start:\n{log.read_text()[-4000:]}")


GRPC_LOADS = (
    (1, "burst", False),
    (16, "burst", False),
    (16, "poisson", False),
    (16, MIXED, False),
    (16, "burst", True),
)
"""tokenwire's gRPC loads: (streams, arrival, sampled); the staggered ones arrive at the rate
that keeps 16 in flight at the burst's per-stream speed, and that rate goes in their rows."""


async def grpc_load(port: int) -> list[dict[str, Any]]:
    import grpc

    from tokenwire.v1 import generate_pb2 as pb
    from tokenwire.v1 import generate_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def one(
            ids: list[int], new: int, sampled: bool, at: float | None = None
        ) -> dict[str, Any]:
            """One stream; its clock starts at `at`, the request's scheduled arrival, where
            given (as the static-batching server's clocks do), else when it is sent."""
            sampling = (
                pb.SamplingParams(
                    temperature=SAMPLED["temperature"],
                    top_k=int(SAMPLED["top_k"]),
                    top_p=SAMPLED["top_p"],
                )
                if sampled
                else pb.SamplingParams(temperature=0.0)
            )
            request = pb.GenerateRequest(
                prompt_ids=ids, max_tokens=new, ignore_eos=True, sampling=sampling
            )
            sent, times = time.perf_counter() if at is None else at, []
            call: Any = stub.Generate(request, timeout=600)
            async for message in call:
                if message.WhichOneof("event") == "token":
                    times.append(time.perf_counter())
            return {"sent": sent, "times": times}

        rows = []
        await asyncio.gather(*(one(p, 16, False) for p in prompts(16)))
        rate = 1.0
        for streams, arrival, sampled in GRPC_LOADS:
            runs = []
            for _ in range(5 if streams == 1 else 3):
                runs.append(await load(one, streams, arrival, rate, sampled))
            row = stream_row(runs)
            if (streams, arrival, sampled) == (16, "burst", False):
                rate = streams * row["per_stream_tokens_per_s"] / NEW_TOKENS
            rows.append(
                {
                    "system": "tokenwire",
                    "transport": "grpc",
                    "concurrency": streams,
                    "arrival": arrival,
                    "decoding": "sampled" if sampled else "greedy",
                    "cache": "device",
                    **({"rate": rate} if arrival != "burst" else {}),
                    **row,
                }
            )
            say(rows[-1])
        return rows


async def load(
    one: Any, streams: int, arrival: str, rate: float, sampled: bool
) -> list[dict[str, Any]]:
    """One load: request i at its arrival offset (peers.arrival_offsets), asking for its
    length (peers.output_lengths), with prompt i; each request's clock starts at its scheduled
    arrival (passed on), not when this client gets round to sending it."""
    offsets = arrival_offsets(streams, arrival, rate)
    lengths = output_lengths(arrival, len(offsets), NEW_TOKENS)
    ids = prompts(len(offsets))
    started, tasks = time.perf_counter(), []
    for i, offset in enumerate(offsets):
        await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
        stream = one(ids[i], lengths[i], sampled, started + offset)
        tasks.append(asyncio.create_task(stream))
    return list(await asyncio.gather(*tasks))


def serving_rows(model_dir: Path, grpc: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GenAI on tokenwire's own loads: its Generator behind a static-batching server (at most
    16) on the staggered arrivals, prompts and lengths of the gRPC rows, and its static batch
    of 16 sampling with SAMPLED. The dispatch policy is picked once per load, by one warm-up
    run of each (the faster); the row is a further run of the pick alone."""
    import onnxruntime_genai as og

    rows: list[dict[str, Any]] = []
    with cuda_graph(model_dir, False):  # a batch of 16 is not captured
        model = og.Model(str(model_dir))
        reuse = genai_pool(og, model, 16).reuse
        for staggered in (r for r in grpc if "rate" in r):
            rows.append(
                static_server_row(og, model, staggered["arrival"], staggered["rate"], reuse)
            )
            say(rows[-1])
        ids16 = np.asarray(prompts(16), dtype=np.int64)
        sampling = GeneratorPool(og, model, dict(SAMPLED), reuse=reuse)

        def sampled() -> tuple[float, list[float], float]:
            if not reuse:
                return genai_loop(og, model, ids16, PROMPT_TOKENS + NEW_TOKENS, dict(SAMPLED))[:3]
            generator = sampling.get(16, PROMPT_TOKENS + NEW_TOKENS)
            started, times = genai_steps(generator, ids16, NEW_TOKENS)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            return times[0] - started, gaps, times[-1] - started

        rows.append(
            {
                "system": "ort-genai",
                "transport": "in-process",
                "concurrency": 16,
                "arrival": "static-batch",
                "decoding": "sampled",
                "knobs": {"enable_cuda_graph": False, "generator_reused": reuse, **SAMPLED},
                **timed(sampled, 16, NEW_TOKENS, repeats=3),
            }
        )
        say(rows[-1])
    return rows


def static_server_row(
    og: Any, model: Any, arrival: str, rate: float, reuse: bool
) -> dict[str, Any]:
    """GenAI's static-batching server (peers.static_batches, at most 16) on one staggered
    load: each policy once as its warm-up, then the faster alone for the row. Generators are
    reused (`reuse`) as peers.run_genai_static reuses them."""
    offsets = arrival_offsets(16, arrival, rate)
    lengths = output_lengths(arrival, len(offsets), NEW_TOKENS)
    ids = prompts(len(offsets))
    warm = np.asarray(ids[:16], dtype=np.int32)
    genai_steps(genai_generator(og, model, 16, PROMPT_TOKENS + 16), warm, 16)
    pool = GeneratorPool(og, model, reuse=reuse)
    if reuse and len(set(lengths)) == 1:
        for count in range(1, 17):
            pool.make(count, PROMPT_TOKENS + lengths[0])

    def serve_load(policy: str) -> dict[str, Any]:
        started = time.perf_counter()
        served = [Served(started + a) for a in offsets]
        static_batches(pool, served, ids, lengths, batch=16, policy=policy)
        return summarise_served(served, cpu=0.0)

    tried = {policy: serve_load(policy)["tokens_per_s"] for policy in ("queued", "full")}
    policy = max(tried, key=lambda name: tried[name])
    return {
        "system": "ort-genai-static-server",
        "transport": "in-process",
        "concurrency": 16,
        "arrival": arrival,
        "decoding": "greedy",
        **serve_load(policy),
        "policy": policy,
        "policy_warm_up_tokens_per_s": tried,
        "knobs": {"generator_reused": reuse},
    }


def stream_row(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    rates = sorted(
        sum(len(s["times"]) for s in run)
        / (max(s["times"][-1] for s in run) - min(s["sent"] for s in run))
        for run in runs
    )
    streams = [s for run in runs for s in run]
    ttft = [(s["times"][0] - s["sent"]) * 1000 for s in streams]
    gaps = [(b - a) * 1000 for s in streams for a, b in itertools.pairwise(s["times"])]
    return {
        "tokens_per_s": rates[len(rates) // 2],
        "per_stream_tokens_per_s": statistics.median(
            len(s["times"]) / (s["times"][-1] - s["sent"]) for s in streams
        ),
        "ttft_p50_ms": nearest_rank(np.asarray(ttft), 50),
        "itl_p50_ms": nearest_rank(np.asarray(gaps), 50),
        "itl_p99_ms": nearest_rank(np.asarray(gaps), 99),
        "repeats": len(runs),
    }


# -- where a decode step's time goes --------------------------------------------------------


@contextlib.contextmanager
def timers(targets: dict[str, tuple[Any, str]]) -> Iterator[dict[str, list[float]]]:
    """Time every call of each (class, method) while inside: label -> [seconds, calls]."""
    spent: dict[str, list[float]] = {label: [0.0, 0] for label in targets}
    originals = {label: getattr(owner, name) for label, (owner, name) in targets.items()}

    def timed(label: str, original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label][0] += time.perf_counter() - started
                spent[label][1] += 1

        return call

    for label, (owner, name) in targets.items():
        setattr(owner, name, timed(label, originals[label]))
    try:
        yield spent
    finally:
        for label, (owner, name) in targets.items():
            setattr(owner, name, originals[label])


def step_costs(model_dir: Path) -> list[dict[str, Any]]:
    """The engine alone with the defaults, 1 and 16 streams: per decode step, the time in the
    replayed model run, in putting the step's inputs on the device, in the argmax and the
    logits' trip to the host, and the rest (the scheduler's Python), in microseconds."""
    import onnxruntime as ort

    from tokenwire.server.engine import Engine, EngineConfig, OnnxCausalLM
    from tokenwire.server.engine.logits import LogitsReader
    from tokenwire.server.engine.static_decode import StaticDecode
    from tokenwire.server.tokenizer import Tokenizer

    model = OnnxCausalLM(model_dir, provider=PROVIDER["name"], static_decode=True)
    engine = Engine(model, Tokenizer.from_dir(model_dir), EngineConfig(max_batch_size=32))
    engine.warm_up()
    engine.start()
    rows = []
    targets = {
        "decode step (StaticDecode.run)": (StaticDecode, "run"),
        "every ORT run": (ort.InferenceSession, "run_with_iobinding"),
        "inputs up (OrtValue.update_inplace)": (ort.OrtValue, "update_inplace"),
        "argmax on the device": (LogitsReader, "argmax"),
        "logits to the host": (LogitsReader, "to_host"),
    }
    try:
        for streams in (1, 16):
            asyncio.run(engine_burst(engine, streams, 16))
            with timers(targets) as spent:
                total, _, gaps = asyncio.run(engine_burst(engine, streams, NEW_TOKENS))
            steps = max(1, int(spent["decode step (StaticDecode.run)"][1]))
            row: dict[str, Any] = {"streams": streams, "decode_steps": steps}
            row["wall_us_per_step"] = total * 1e6 / steps
            row["itl_p50_us"] = nearest_rank(np.asarray(gaps), 50) * 1e6
            for label, (seconds, calls) in spent.items():
                row[label] = {"us_per_step": seconds * 1e6 / steps, "calls": int(calls)}
            rows.append(row)
            print(f"  step costs: {row}", flush=True)
    finally:
        engine.shutdown()
    return rows


# -- where the cache lives --------------------------------------------------------------------


def copies_per_step(model_dir: Path) -> dict[str, Any]:
    """ORT's profiler over 32 decode steps of 16 rows in the preallocated device cache: the
    copy nodes ONNX Runtime ran (Memcpy*), against every node it ran."""
    from tokenwire.server.engine import OnnxCausalLM
    from tokenwire.server.engine.slot_buffer import DeviceSlotBuffer

    prefix = Path(tempfile.mkdtemp()) / "tokenwire"
    model = OnnxCausalLM(
        model_dir,
        provider=PROVIDER["name"],
        device_cache=True,
        cuda_graph=False,  # the profiler counts node runs: a replayed graph runs none
        profile_prefix=str(prefix),
    )
    cache = model.new_slot_cache(16, 512)
    assert cache is not None, "no preallocated cache"
    assert cache.device == PROVIDER["name"], "the cache is not on the device"
    buffers = [b for b in cache.buffers if isinstance(b, DeviceSlotBuffer)]
    prefill = model.new_cache(16, 0, left_aligned=True)
    ids = np.asarray(prompts(16), dtype=np.int64)
    mask = prefill.mask_with(PROMPT_TOKENS)
    positions = np.tile(np.arange(PROMPT_TOKENS), (16, 1))
    _, present = model.forward(ids, mask, positions, prefill.tensors)
    prefill.advance(present, mask)
    cache.extend(prefill)
    tokens = np.full((16, 1), 11, dtype=np.int64)
    for _ in range(32):
        mask = cache.mask_with(1)
        positions = mask.sum(axis=1, keepdims=True) - 1
        model.forward(tokens, mask, positions, cache.tensors, in_place=True)
        cache.advance([], mask)
    events = json.loads(Path(model.session.end_profiling()).read_text())
    nodes = [
        e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
    ]
    copies = [e for e in nodes if "Memcpy" in e.get("args", {}).get("op_name", "")]
    return {
        "decode_steps": 32,
        "rows": 16,
        "cache_buffers_on_device": f"{len(buffers)} of {len(cache.buffers)}",
        "cache_buffer_devices": sorted({b.value.device_name() for b in buffers}),
        "cache_bytes_on_device": sum(b.nbytes for b in buffers),
        "profiled_runs_include_prefill": 1,
        "node_kernel_events": len(nodes),
        "memcpy_kernel_events": len(copies),
        "memcpy_ops": sorted({e["args"]["op_name"] + ":" + e["name"] for e in copies})[:20],
    }


# -- report -----------------------------------------------------------------------------------


def say(row: dict[str, Any]) -> None:
    print(
        f"  {row['system']:9s} {row['transport']:12s} c={row['concurrency']:<3d} "
        f"{row['arrival']:12s} {row.get('cache', ''):8s} {row['tokens_per_s']:9.1f} tok/s  "
        f"ttft p50 {row['ttft_p50_ms']:7.2f} ms  itl p50 {row['itl_p50_ms']:6.2f} ms",
        flush=True,
    )


def machine() -> dict[str, Any]:
    import onnxruntime as ort
    import onnxruntime_genai as og

    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    gpu = "none"
    with contextlib.suppress(OSError):
        gpu = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
    return {
        "gpu": gpu,
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_genai": og.__version__,
        "providers": ort.get_available_providers(),
    }


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    def best(**match: Any) -> dict[str, Any]:
        found = [r for r in rows if matches(r, match)]
        return max(found, key=lambda r: r["tokens_per_s"])

    genai1 = best(system="ort-genai", concurrency=1)["tokens_per_s"]
    genai16 = best(system="ort-genai", concurrency=16, decoding="greedy")["tokens_per_s"]
    grpc1 = best(system="tokenwire", transport="grpc", concurrency=1)["tokens_per_s"]
    staggered = best(system="tokenwire", transport="grpc", concurrency=16, arrival="poisson")
    burst16 = best(
        system="tokenwire", transport="grpc", concurrency=16, arrival="burst", decoding="greedy"
    )

    def engine(streams: int, cache: str) -> float:
        found = best(system="tokenwire", transport="engine-alone", concurrency=streams, cache=cache)
        return float(found["tokens_per_s"])

    return {
        "grpc_b1_vs_genai_b1": grpc1 / genai1,
        "grpc_c16_burst_vs_genai_b16": burst16["tokens_per_s"] / genai16,
        "grpc_c16_staggered_vs_genai_b16": staggered["tokens_per_s"] / genai16,
        "engine_b1_vs_genai_b1": engine(1, "device") / genai1,
        "engine_c16_vs_genai_b16": engine(16, "device") / genai16,
        "cuda_graph_vs_uncaptured_b1": engine(1, "device") / engine(1, "device-uncaptured"),
        "cuda_graph_vs_uncaptured_c16": engine(16, "device") / engine(16, "device-uncaptured"),
        "device_cache_vs_copying_b1": engine(1, "device-uncaptured") / engine(1, "copying"),
        "device_cache_vs_copying_c16": engine(16, "device-uncaptured") / engine(16, "copying"),
        "growing_on_device_vs_copying_b1": engine(1, "device-growing") / engine(1, "copying"),
        "growing_on_device_vs_copying_c16": engine(16, "device-growing") / engine(16, "copying"),
        **serving_ratios(rows),
    }


def matches(row: dict[str, Any], match: dict[str, Any]) -> bool:
    """Whether the row has every field of `match` (a row without `decoding` is greedy)."""
    return all(row.get(k, "greedy" if k == "decoding" else None) == v for k, v in match.items())


def serving_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """tokenwire against GenAI on the same serving loads, where both rows exist."""
    pairs: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "grpc_c16_staggered_vs_genai_static_server": (
            {"system": "tokenwire", "transport": "grpc", "arrival": "poisson"},
            {"system": "ort-genai-static-server", "arrival": "poisson"},
        ),
        "grpc_c16_mixed_vs_genai_static_server": (
            {"system": "tokenwire", "transport": "grpc", "arrival": MIXED},
            {"system": "ort-genai-static-server", "arrival": MIXED},
        ),
        "grpc_c16_sampled_vs_genai_b16_sampled": (
            {"system": "tokenwire", "transport": "grpc", "decoding": "sampled"},
            {"system": "ort-genai", "concurrency": 16, "decoding": "sampled"},
        ),
    }
    found = {}
    for name, (ours, theirs) in pairs.items():
        a = [r for r in rows if matches(r, ours)]
        b = [r for r in rows if matches(r, theirs)]
        if a and b:
            found[name] = a[0]["tokens_per_s"] / b[0]["tokens_per_s"]
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="bench-56m")
    ap.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tokenwire-gpu")
    args = ap.parse_args()
    if args.provider == "cpu":
        PROVIDER.update(name="cpu", precision="fp32")
    else:
        # Loads the CUDA 13 libraries torch ships, which ONNX Runtime's CUDA provider uses too
        # (its documented alternative to LD_LIBRARY_PATH).
        import torch

        print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}", flush=True)
    report: dict[str, Any] = {"machine": machine(), "prompt_tokens": PROMPT_TOKENS}
    report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report["git_commit"] = os.environ.get("TOKENWIRE_COMMIT", "?")
    report["new_tokens"] = NEW_TOKENS
    report["models"] = {}

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    for name in args.sizes.split(","):
        entry: dict[str, Any] = {}
        report["models"][name] = entry
        measure_size(name, args.work, entry, save)


def measure_size(name: str, work: Path, entry: dict[str, Any], save: Callable[[], None]) -> None:
    """Every section for one model size into `entry`; `save` writes the report so far."""
    started = time.monotonic()
    print(f"{name}: building", flush=True)
    model_dir = build(name, work)
    entry.update(size=SIZES[name], build_s=time.monotonic() - started)
    reference: Reference = {"b16": {}, "b1": {}}
    entry["rows"] = []
    try:
        entry["rows"], reference = genai_rows(model_dir)
    except Exception as exc:  # the other rows are still worth having
        entry.setdefault("errors", {})["genai"] = f"{type(exc).__name__}: {exc}"
        print(f"  genai failed: {exc}", flush=True)
    for label in ("engine", "grpc", "serving"):
        try:
            if label == "engine":
                entry["rows"] += engine_rows(model_dir, reference)
            elif label == "grpc":
                entry["rows"] += grpc_rows(model_dir)
            else:
                entry["rows"] += serving_rows(model_dir, entry["rows"])
        except Exception as exc:
            entry.setdefault("errors", {})[label] = f"{type(exc).__name__}: {exc}"
            print(f"  {label} failed: {exc}", flush=True)
        save()
    with contextlib.suppress(Exception):
        entry["ratios"] = ratios([r for r in entry["rows"] if "tokens_per_s" in r])
    try:
        entry["step_costs"] = step_costs(model_dir)
    except Exception as exc:
        entry.setdefault("errors", {})["step_costs"] = f"{type(exc).__name__}: {exc}"
    try:
        entry["copies"] = copies_per_step(model_dir)
    except Exception as exc:
        entry.setdefault("errors", {})["copies"] = f"{type(exc).__name__}: {exc}"
    entry["seconds"] = time.monotonic() - started
    save()
    print(json.dumps({name: entry.get("ratios"), "copies": entry.get("copies")}), flush=True)


if __name__ == "__main__":
    main()
