"""Peer measurements, run inside bench/.venv: the plain ORT decode loop, ORT GenAI's Generator
(alone, and as a static-batching server) and ORT GenAI's Engine.

Usage: python bench/peers.py raw|genai MODEL_DIR --batch N [--prompt-tokens 32 --new-tokens 128]
       [--sampling '{"temperature": 0.8, "top_k": 50, "top_p": 0.95}' (genai)]
       python bench/peers.py genai-engine MODEL_DIR < WORKLOAD.json
       python bench/peers.py genai-static MODEL_DIR --batch 16 --policy queued|full < WORKLOAD.json
       (every mode: [--threads N], intra-op threads; 0, the default, leaves each system's own)
WORKLOAD.json: {"arrivals": [seconds after the start, ...], "prompts": [[ids], ...],
"lengths": [tokens to generate, ...]}, one request per arrival. Prints one JSON object:
tokens/s, per-stream tokens/s, TTFT and inter-token latencies.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# GenAI's Engine on this graph: the static-batching scheduler (its dynamic one needs a
# paged-attention graph, which GenAI's builder writes for CUDA and WebGPU only). It takes
# requests in batches of at most 4 whatever max_batch_size says; 16 is written so the
# configured limit is never what holds it back.
ENGINE_SECTION = {"static_batching": {"max_batch_size": 16}}


SAMPLED = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}
"""The sampled rows' settings, for tokenwire and GenAI alike (a common chat configuration)."""
TOP_P = {"temperature": 0.7, "top_p": 0.9}
"""The top-p rows' settings: as OpenAI-style clients send them, temperature and top-p over the
whole vocabulary (the OpenAI API has no top-k)."""
SAMPLINGS = {"sampled": SAMPLED, "sampled-top-p": TOP_P}
"""Each sampled decoding's settings, by the name its rows carry."""
# GenAI's search keeps its genai_config.json top_k (the builder writes 50) unless a request
# sets one, and spells "no top-k" two ways that run different code on the CPU: top_k 0 (its
# nucleus path, which sorts a growing head of the row until it carries top_p) and top_k = the
# vocabulary size (a partial sort of the whole row). Which is faster depends on how peaked the
# rows are, so a row without top-k runs GenAI both ways and keeps the faster. -1 stands for
# the vocabulary size, read from the model's genai_config.json.
NO_TOP_K_VOCAB = -1
NO_TOP_K = (0, NO_TOP_K_VOCAB)
MIXED = "poisson-mixed"
"""Poisson arrivals with mixed output lengths (output_lengths), as traffic has them."""


def arrival_offsets(concurrency: int, arrival: str, rate: float | None) -> list[float]:
    """When each request of a load arrives, in seconds after the first: a burst of
    `concurrency` at once, or 2 x `concurrency` Poisson arrivals at `rate` per second, which
    keep about `concurrency` in flight (the mixed load arrives on the same schedule as the
    plain Poisson one). Seeded, so every system gets the same schedule."""
    if arrival == "burst":
        return [0.0] * concurrency
    rng = random.Random(concurrency)
    gaps = [rng.expovariate(rate or 1.0) for _ in range(2 * concurrency - 1)]
    return list(itertools.accumulate(gaps, initial=0.0))


def output_lengths(arrival: str, count: int, new: int) -> list[int]:
    """Each request's max_tokens: `new`, or in the mixed load seeded draws uniform in
    [16, 2 x new - 16] (mean `new`, so it carries the tokens of the plain load)."""
    if arrival != MIXED:
        return [new] * count
    rng = random.Random(count)
    return [rng.randint(16, 2 * new - 16) for _ in range(count)]


def nearest_rank(values: np.ndarray, q: float) -> float:
    """The percentile rule of tokenwire.common.stats (this venv has no tokenwire): nearest rank,
    which numpy calls inverted_cdf; tests/test_stats.py checks that the two agree."""
    return float(np.percentile(values, q, method="inverted_cdf"))


def prompt_ids(batch: int, length: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(10, vocab - 10, size=(batch, length), dtype=np.int64)


def latencies(ttft: list[float], gaps: list[float]) -> dict[str, float]:
    """TTFT and inter-token percentiles in ms, from seconds."""
    ttft_ms, gaps_ms = np.asarray(ttft) * 1000, np.asarray(gaps) * 1000
    return {
        "ttft_p50_ms": nearest_rank(ttft_ms, 50),
        "ttft_p99_ms": nearest_rank(ttft_ms, 99),
        "itl_p50_ms": nearest_rank(gaps_ms, 50),
        "itl_p99_ms": nearest_rank(gaps_ms, 99),
    }


def summarise(
    batch: int, new: int, ttft: float, gaps: list[float], *, total: float, cpu: float
) -> dict[str, float]:
    return {
        "cpu_ms_per_token": cpu * 1000 / (batch * new),
        "tokens_per_s": batch * new / total,
        "per_stream_tokens_per_s": new / total,
        **latencies([ttft], gaps),
    }


def timed(generate: Any, batch: int, new: int, repeats: int = 1) -> dict[str, float]:
    """Warm up once, then keep the median of `repeats` timed runs (by total time)."""
    generate()
    runs = []
    for _ in range(repeats):
        cpu0 = time.process_time()
        ttft, gaps, total = generate()
        runs.append((total, ttft, gaps, time.process_time() - cpu0))
    total, ttft, gaps, cpu = sorted(runs, key=lambda r: r[0])[repeats // 2]
    return summarise(batch, new, ttft, gaps, total=total, cpu=cpu)


def run_raw(
    model_dir: Path, batch: int, prompt: int, new: int, threads: int = 0
) -> dict[str, float]:
    """The loop every Optimum-export user writes: prefill, then one session.run per token, with
    `threads` intra-op threads (0: ONNX Runtime's default)."""
    import onnxruntime as ort

    layers, kvh, head_dim, vocab = shape_of(model_dir)
    # The session options tokenwire uses by default (service/engine/model.py), but for
    # session.force_spinning_stop: nothing runs between this loop's steps, and stopping
    # the workers there cost it 1-2 % in a side test, so it runs at its best without.
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    outputs = ["logits"] + [n.replace("past_key_values", "present") for n in names]
    ids = prompt_ids(batch, prompt, vocab)
    has_positions = "position_ids" in {i.name for i in session.get_inputs()}

    def step(
        tokens: np.ndarray, past: list[np.ndarray], total: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {
            "input_ids": tokens,
            "attention_mask": np.ones((batch, total), dtype=np.int64),
        }
        if has_positions:
            feed["position_ids"] = np.tile(
                np.arange(total - tokens.shape[1], total, dtype=np.int64), (batch, 1)
            )
        feed.update(zip(names, past, strict=True))
        out = session.run(outputs, feed)
        return out[0][:, -1, :], out[1:]

    empty = [np.zeros((batch, kvh, 0, head_dim), dtype=np.float32) for _ in names]

    def generate() -> tuple[float, list[float], float]:
        started = time.perf_counter()
        logits, past = step(ids, empty, prompt)
        token = logits.argmax(-1)[:, None]
        ttft = time.perf_counter() - started
        last, gaps = time.perf_counter(), []
        for i in range(1, new):
            logits, past = step(token, past, prompt + i)
            token = logits.argmax(-1)[:, None]
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        return ttft, gaps, time.perf_counter() - started

    return timed(generate, batch, new)


def shape_of(model_dir: Path) -> tuple[int, int, int, int]:
    """Layers, KV heads, head dim and vocabulary of an Optimum or a GenAI model folder."""
    if (model_dir / "config.json").exists():
        config = json.loads((model_dir / "config.json").read_text())
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return (
            config["num_hidden_layers"],
            config["num_key_value_heads"],
            head_dim,
            config["vocab_size"],
        )
    model = json.loads((model_dir / "genai_config.json").read_text())["model"]
    decoder = model["decoder"]
    return (
        decoder["num_hidden_layers"],
        decoder["num_key_value_heads"],
        decoder["head_size"],
        model["vocab_size"],
    )


def genai_model(og: Any, model_dir: Path, threads: int = 0) -> Any:
    """GenAI's model of model_dir; `threads` (0: as genai_config.json says) sets its decoder
    session's intra-op threads when the session is made (og.Config.overlay), so every system
    computes with the same number without the cached folder being rewritten."""
    config = og.Config(str(model_dir))
    if threads:
        options = {"session_options": {"intra_op_num_threads": threads}}
        config.overlay(json.dumps({"model": {"decoder": options}}))
    return og.Model(config)


def run_genai(
    model_dir: Path,
    batch: int,
    prompt: int,
    new: int,
    sampling: dict[str, float] | None = None,
    *,
    threads: int = 0,
) -> dict[str, float]:
    """GenAI's Generator, greedy or with the given sampling options (do_sample on): one
    Generator made before the clock and reused for every run (GeneratorPool)."""
    import onnxruntime_genai as og

    model = genai_model(og, model_dir, threads)
    config = json.loads((model_dir / "genai_config.json").read_text())
    vocab = config["model"]["vocab_size"]
    ids = prompt_ids(batch, prompt, vocab)
    if sampling and sampling.get("top_k") == NO_TOP_K_VOCAB:
        sampling = {**sampling, "top_k": vocab}
    pool = GeneratorPool(og, model, sampling)
    generator = pool.make(batch, prompt + new)

    def generate() -> tuple[float, list[float], float]:
        started, times = genai_steps(generator, ids, new)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return times[0] - started, gaps, times[-1] - started

    return timed(generate, batch, new)


def genai_generator(
    og: Any, model: Any, rows: int, length: int, sampling: dict[str, float] | None = None
) -> Any:
    """A Generator for `rows` prompts generating up to `length` tokens in all (EOS ignored
    until then: min_length = max_length), greedy or with `sampling`'s search options."""
    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=length,
        min_length=length,
        batch_size=rows,
        **({"do_sample": True, **sampling} if sampling else {"do_sample": False}),
    )
    return og.Generator(model, params)


def genai_steps(generator: Any, ids: np.ndarray, new: int) -> tuple[float, list[float]]:
    """`new` tokens for the rows of ids on `generator` (made for their number of rows): when
    the clock started, just before the prompt tokens go in (prefill included, as every other
    system's clock has it), and when each step's tokens came out. A Generator that ran before
    is rewound first (Generator.rewind_to(0), outside the clock: it is its reset for the next
    batch, which the same greedy ids as a fresh Generator's show it is)."""
    if generator.token_count():
        generator.rewind_to(0)
    started = time.perf_counter()
    generator.append_tokens(ids)
    times = []
    for _ in range(new):
        generator.generate_next_token()
        times.append(time.perf_counter())
    return started, times


class GeneratorPool:
    """GenAI Generators by shape (rows, max_length), as a server keeps them at its best: made
    once and reused, rewound between batches, so a batch pays for its prefill and steps but not
    for making a Generator. `make` makes one ahead of the clock; `get` returns the one of that
    shape, making it (inside the caller's clock) the first time. With reuse off, `get` makes a
    fresh Generator every time (where rewinding was not seen to give a fresh one's ids)."""

    def __init__(
        self, og: Any, model: Any, sampling: dict[str, float] | None = None, *, reuse: bool = True
    ) -> None:
        self._og, self._model, self._sampling, self.reuse = og, model, sampling, reuse
        self._made: dict[tuple[int, int], Any] = {}
        self.made_in_get = 0
        """Generators `get` had to make (inside its caller's clock)."""
        self.making_s_in_get = 0.0
        """The seconds making them took."""

    def make(self, rows: int, length: int) -> Any:
        generator = genai_generator(self._og, self._model, rows, length, self._sampling)
        if self.reuse:
            self._made[(rows, length)] = generator
        return generator

    def get(self, rows: int, length: int) -> Any:
        found = self._made.get((rows, length))
        if found is not None:
            return found
        started = time.perf_counter()
        generator = self.make(rows, length)
        self.made_in_get += 1
        self.making_s_in_get += time.perf_counter() - started
        return generator


def genai_loop(
    og: Any, model: Any, ids: np.ndarray, length: int, sampling: dict[str, float] | None = None
) -> tuple[float, list[float], float, Any]:
    """One GenAI generation of the rows of ids up to `length` tokens (EOS ignored) on a fresh
    Generator, greedy or sampled, the clock started before its GeneratorParams (its making
    counts, as every other system's setup does): TTFT, the inter-token gaps, the wall time, and
    the generator (for its sequences)."""
    started = time.perf_counter()
    generator = genai_generator(og, model, len(ids), length, sampling)
    _, times = genai_steps(generator, ids, length - ids.shape[1])
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return times[0] - started, gaps, times[-1] - started, generator


def rewinds_cleanly(og: Any, model: Any, ids: np.ndarray, new: int) -> bool:
    """Whether a Generator rewound to 0 after another prompt gives the greedy ids a fresh one
    gives the rows of ids (so reusing one is sound on this model and provider)."""
    length = ids.shape[1] + new
    fresh = genai_loop(og, model, ids, length)[3]
    reused = genai_generator(og, model, len(ids), length)
    genai_steps(reused, ids[:, ::-1].copy(), new)  # another prompt first
    genai_steps(reused, ids, new)
    return all(list(fresh.get_sequence(i)) == list(reused.get_sequence(i)) for i in range(len(ids)))


@dataclass
class Served:
    """One Engine request: when it arrived, when each token came out, and the tokens."""

    arrival: float
    times: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


def summarise_served(served: list[Served], *, cpu: float) -> dict[str, float]:
    """Requests that arrive apart, by the rules of run.py's stream_row: tokens over the span
    from the first arrival to the last token, TTFT from each request's own arrival."""
    tokens = sum(len(s.times) for s in served)
    total = max(s.times[-1] for s in served) - min(s.arrival for s in served)
    return {
        "cpu_ms_per_token": cpu * 1000 / tokens,
        "tokens_per_s": tokens / total,
        "per_stream_tokens_per_s": float(
            np.median([len(s.times) / (s.times[-1] - s.arrival) for s in served])
        ),
        **latencies(
            [s.times[0] - s.arrival for s in served],
            [b - a for s in served for a, b in itertools.pairwise(s.times)],
        ),
    }


def engine_folder(model_dir: Path, into: Path, threads: int = 0) -> dict[str, Any]:
    """model_dir's files linked into `into`, with ENGINE_SECTION added to its genai_config.json
    (and `threads` intra-op threads, unless 0); returns the settings the Engine runs with."""
    for path in model_dir.iterdir():
        if path.name != "genai_config.json":
            (into / path.name).symlink_to(path.resolve())
    config = json.loads((model_dir / "genai_config.json").read_text())
    config["engine"] = ENGINE_SECTION
    if threads:
        options = config["model"]["decoder"].setdefault("session_options", {})
        options["intra_op_num_threads"] = threads
    (into / "genai_config.json").write_text(json.dumps(config, indent=4))
    return {
        "engine": ENGINE_SECTION,
        "session_options": config["model"]["decoder"].get("session_options", {}),
    }


def begin(og: Any, engine: Any, ids: list[int], new: int) -> Any:
    """A greedy request of exactly `new` tokens (EOS masked until then, so it is ignored)."""
    request = engine.create_request()
    turn = og.TurnOptions(request)
    turn.set_do_sample(False)
    turn.set_min_generated_tokens(new)
    turn.set_max_generated_tokens(new)
    request.begin_turn(np.asarray(ids, dtype=np.int32), turn)
    return request


def serve(
    og: Any, engine: Any, arrivals: list[float], prompts: list[list[int]], lengths: list[int]
) -> list[Served]:
    """Request i begins at arrivals[i] seconds after the start and generates lengths[i]
    tokens; arrivals are checked between Engine steps (a step is not interrupted; the wait
    counts in the request's TTFT)."""
    buffer = engine.create_event_buffer(256)
    token, failed = og.EngineEventFlags.TOKEN.value, og.EngineEventFlags.FAILED.value
    started = time.perf_counter()
    served = [Served(started + a) for a in arrivals]
    by_request: dict[Any, Served] = {}
    while len(by_request) < len(served) or engine.has_pending_requests():
        for i in range(len(by_request), len(served)):
            if served[i].arrival > time.perf_counter():
                break
            by_request[begin(og, engine, prompts[i], lengths[i])] = served[i]
        if not engine.has_pending_requests():
            time.sleep(max(0.0, served[len(by_request)].arrival - time.perf_counter()))
            continue
        events = list(engine.run(buffer))
        now = time.perf_counter()
        for event in events:
            if event.flags.value & failed:
                raise RuntimeError(f"GenAI Engine request failed: {event.error_code}")
            if event.flags.value & token:
                by_request[event.request].times.append(now)
                by_request[event.request].ids.append(event.token)
    return served


def run_genai_engine(model_dir: Path, workload: dict[str, Any], threads: int = 0) -> dict[str, Any]:
    """The workload through GenAI's Engine, after a warm-up burst of every batch shape. The
    Engine is made before the clock, as a server is started before its load; each request's
    clock starts at its arrival, before its Request is made (`serve`)."""
    import onnxruntime_genai as og

    arrivals, prompts, lengths = workload["arrivals"], workload["prompts"], workload["lengths"]
    with tempfile.TemporaryDirectory() as folder:
        knobs = engine_folder(model_dir, Path(folder), threads)
        engine = og.Engine(og.Model(folder))
        warm = min(16, len(prompts))
        serve(og, engine, [0.0] * warm, prompts[:warm], [16] * warm)
        cpu0 = time.process_time()
        served = serve(og, engine, arrivals, prompts, lengths)
        cpu = time.process_time() - cpu0
    return {**summarise_served(served, cpu=cpu), "knobs": knobs}


def static_batches(
    pool: GeneratorPool,
    served: list[Served],
    prompts: list[list[int]],
    lengths: list[int],
    *,
    batch: int,
    policy: str,
) -> None:
    """GenAI's Generator behind a static-batching server: when the Generator is free it takes
    the requests that have arrived (at most `batch`; with policy "full" it first waits until
    `batch` have arrived, or every request left has) and runs them together until the longest
    has its tokens; a request is done once it has its own lengths[i] tokens, but its row stays
    in the batch, and a request that arrives meanwhile waits for the whole batch. Each group
    runs on the pool's Generator of its shape (rows, prompt + its longest request); its
    requests' clocks run from their arrivals, so whatever the pool does for them counts."""
    if len({len(p) for p in prompts}) != 1:
        raise SystemExit("genai-static needs prompts of one length (GenAI pads no batch here)")
    done = 0
    while done < len(served):
        wanted = min(batch, len(served) - done) if policy == "full" else 1
        time.sleep(max(0.0, served[done + wanted - 1].arrival - time.perf_counter()))
        now = time.perf_counter()
        group = [s for s in served[done : done + batch] if s.arrival <= now]
        wants = lengths[done : done + len(group)]
        ids = np.asarray(prompts[done : done + len(group)], dtype=np.int32)
        generator = pool.get(len(group), ids.shape[1] + max(wants))
        _, times = genai_steps(generator, ids, max(wants))
        for s, want in zip(group, wants, strict=True):
            s.times = times[:want]
        done += len(group)


def run_genai_static(
    model_dir: Path, workload: dict[str, Any], *, batch: int, policy: str, threads: int = 0
) -> dict[str, Any]:
    """The workload through `static_batches`, after a warm-up batch of the largest shape.

    Where every request asks for the same length, each group needs a Generator of that length
    for its number of rows: one for each number, 1 to `batch`, is made before the load. With
    mixed lengths a group's Generator is made for its longest request when first needed, and
    kept for the next group of that shape: one sized for the longest request of the whole load
    would serve every group, but its steps ran up to 10 % slower (16 rows, 272 positions
    against 160) than a group's own length costs to make (12-45 ms)."""
    import onnxruntime_genai as og

    model = genai_model(og, model_dir, threads)
    arrivals, prompts, lengths = workload["arrivals"], workload["prompts"], workload["lengths"]
    prompt = len(prompts[0])
    pool = GeneratorPool(og, model)
    if len(set(lengths)) == 1:
        for rows in range(1, batch + 1):
            pool.make(rows, prompt + lengths[0])
    warm = np.asarray(prompts[:batch], dtype=np.int32)
    genai_steps(genai_generator(og, model, len(warm), prompt + 16), warm, 16)
    started = time.perf_counter()
    served = [Served(started + a) for a in arrivals]
    cpu0 = time.process_time()
    static_batches(pool, served, prompts, lengths, batch=batch, policy=policy)
    return {
        **summarise_served(served, cpu=time.process_time() - cpu0),
        # Generators made inside the requests' clocks (mixed lengths: one per new shape), and
        # how long making them took: a server that made them ahead would save at most that.
        "generators_made_in_clock": pool.made_in_get,
        "generator_making_ms_in_clock": pool.making_s_in_get * 1000,
        "span_s": max(s.times[-1] for s in served) - min(s.arrival for s in served),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["raw", "genai", "genai-engine", "genai-static"])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--policy", choices=["queued", "full"], default="queued")
    ap.add_argument("--sampling", type=json.loads, default=None, help="JSON search options")
    ap.add_argument(
        "--threads", type=int, default=0, help="intra-op threads (0: each system's default)"
    )
    args = ap.parse_args()
    threads = args.threads
    if args.mode == "genai-engine":
        row = run_genai_engine(args.model_dir, json.load(sys.stdin), threads)
    elif args.mode == "genai-static":
        row = run_genai_static(
            args.model_dir,
            json.load(sys.stdin),
            batch=args.batch,
            policy=args.policy,
            threads=threads,
        )
    elif args.mode == "raw":
        row = run_raw(args.model_dir, args.batch, args.prompt_tokens, args.new_tokens, threads)
    else:
        row = run_genai(
            args.model_dir,
            args.batch,
            args.prompt_tokens,
            args.new_tokens,
            args.sampling,
            threads=threads,
        )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
