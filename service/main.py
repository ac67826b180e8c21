"""`tokenwire serve`: wire settings, model, engine and server together, run until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from tokenwire.common.settings import host_family, host_port, is_loopback
from tokenwire.server import __version__
from tokenwire.server.config import Settings, all_api_keys
from tokenwire.server.cpus import CpuBudget, cpu_budget
from tokenwire.server.engine import (
    Engine,
    EngineConfig,
    EngineObserver,
    ModelLoadError,
    OnnxCausalLM,
    Padding,
)
from tokenwire.server.rpc.server import TokenwireServer
from tokenwire.server.telemetry import configure_logging
from tokenwire.server.telemetry.metrics import MetricsTls, ServerMetrics
from tokenwire.server.telemetry.tracing import Tracing
from tokenwire.server.tokenizer import Tokenizer, TokenizerLoadError

log = structlog.get_logger("tokenwire.server")


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's part of the settings: every EngineConfig field is the setting of its name
    (a new engine limit is one field in each, with no wiring here); the rest keep defaults."""
    names = {field.name for field in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{name: getattr(settings, name) for name in names & _SETTING_NAMES})


_SETTING_NAMES = {field.name for field in dataclasses.fields(Settings)}


def intra_op_threads(settings: Settings) -> CpuBudget:
    """ONNX Runtime's intra-op threads: the setting, or (0) this process's CPU budget."""
    if settings.intra_op_threads:
        return CpuBudget(settings.intra_op_threads, "intra_op_threads")
    return cpu_budget()


def cpus_available() -> CpuBudget:
    """The CPUs this process may run on, hyperthreads counted (its affinity mask), capped by
    its CPU quota: intra-op threads beyond these wait for each other at every operator."""
    # With no topology to read, the budget counts the affinity mask's CPUs, not cores.
    return cpu_budget(topology=Path(os.devnull))


def load_engine(settings: Settings, observer: EngineObserver | None = None) -> Engine:
    """Load the model and tokenizer and warm them up (blocking; run it off the event loop)."""
    model = OnnxCausalLM(
        settings.model_dir,
        provider=settings.provider,
        intra_op_threads=intra_op_threads(settings).cpus,
        inter_op_threads=settings.inter_op_threads,
        spinning=settings.ort_spinning,
        cuda_graph=settings.cuda_graph,
        # The most tokens one request may hold here: what the load checks the graph for.
        max_kv_tokens=min(settings.max_kv_tokens, settings.max_context_tokens or sys.maxsize),
        model_file=settings.model_file,
    )
    try:
        tokenizer = Tokenizer.from_dir(settings.model_dir)
    except TokenizerLoadError as exc:
        raise ModelLoadError(str(exc)) from exc
    engine = Engine(model, tokenizer, engine_config(settings), observer)
    engine.warm_up()
    return engine


LOAD_THREAD = "tokenwire-model-load"


def _load_off_loop(settings: Settings, observer: EngineObserver) -> asyncio.Future[Engine]:
    """load_engine on a daemon thread of its own; its engine (or its error) in a future.

    Not asyncio.to_thread: asyncio.run joins the default executor's threads before it
    returns, so a process stopped during the load would wait for the load to end. A load
    given up on (the future cancelled) runs on unwatched; the process does not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Engine] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():  # else given up on
            outcome()

    def load() -> None:
        try:
            engine = context.run(load_engine, settings, observer)
        except BaseException as exc:  # the waiting side decides what it means
            outcome = functools.partial(future.set_exception, exc)
        else:
            outcome = functools.partial(future.set_result, engine)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=load, name=LOAD_THREAD, daemon=True).start()
    return future


async def _load_unless_stopped(
    settings: Settings, observer: EngineObserver, stop: asyncio.Event
) -> Engine | None:
    """The loaded, warm engine; None when `stop` is set first (the load is given up on).
    Raises what the load raises (ModelLoadError: a model the engine cannot drive)."""
    if stop.is_set():
        return None
    loading = _load_off_loop(settings, observer)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((loading, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not stop.is_set():
        return loading.result()
    # A signal came first (or with the engine): it is never attached.
    if loading.done() and loading.exception() is None:
        loading.result().shutdown()
    loading.cancel()
    return None


def metrics_tls(settings: Settings) -> MetricsTls | None:
    """The /metrics port's TLS files, when metrics_tls is on (the gRPC port's certificate)."""
    if not settings.metrics_tls or settings.tls_cert is None or settings.tls_key is None:
        return None
    return MetricsTls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)


def _check_free(host: str, port: int) -> None:
    """Raise OSError if the port cannot be bound, before grpc tries (and logs its own noise)."""
    if port:
        with socket.create_server((host, port), family=host_family(host)):
            pass


async def run_server(
    settings: Settings, stop: asyncio.Event, hurry: asyncio.Event | None = None
) -> int:
    """Serve until `stop` is set, then drain (cut short once `hurry` is set); return the exit
    status.

    Health is NOT_SERVING until the model is warm. A port that cannot be bound, or a model the
    engine cannot drive, is one log line and status 2.
    """
    metrics = ServerMetrics()
    tracing = Tracing.from_endpoint(settings.otlp_endpoint, __version__)
    server = TokenwireServer(
        settings, observer=metrics, tracing=tracing, hurry=hurry or asyncio.Event()
    )
    try:
        return await _serve(settings, stop, server, metrics)
    finally:
        tracing.shutdown()  # the spans still batched go out before the process ends


def _log_loaded(engine: Engine, settings: Settings) -> None:
    """The start-up lines that say how the loaded model is served: `model.loaded`, and a
    warning for each way its serving departs from the plain one."""
    rounding = engine.model.batch_rounding if isinstance(engine.model, OnnxCausalLM) else 0.0
    rows_alone = engine.model.padding is Padding.ALONE or engine.model.decodes_rows_alone
    log.info(
        "model.loaded",
        model_dir=str(settings.model_dir),
        cache=engine.model.layout.describe() if isinstance(engine.model, OnnxCausalLM) else "",
        padding=engine.model.padding.value,
        kv_cache="preallocated, in place" if engine.kv_in_place else "batch tensors",
        context_length=engine.model.spec.context_length,
        request_tokens=engine.limits.context_length,
        rows=engine.max_rows,
        # The widest attention mask rows share forwards within (None: any); rows past it
        # decode in forwards of their own.
        width_limit=engine.model.width_limit,
        batch_rounding=rounding,
        # A one-position forward of one row runs as two rows (a scratch row beside it): this
        # CPU computes a one-row MatMulNBits this much otherwise than a batched one.
        # (With one slot every request runs alone, on the one-row kernel.)
        single_rows_padded=engine.model.pads_single_rows and engine.max_rows > 1,
        one_row_rounding=(
            engine.model.one_row_rounding if isinstance(engine.model, OnnxCausalLM) else 0.0
        ),
    )
    if engine.max_rows < settings.max_batch_size:
        log.warning(
            "model.rows_limited",
            rows=engine.max_rows,
            max_batch_size=settings.max_batch_size,
            reason=f"each row of the preallocated cache holds a whole request "
            f"({engine.limits.context_length} positions), and max_kv_tokens "
            f"({settings.max_kv_tokens}) holds {engine.max_rows}: raise max_kv_tokens (memory) "
            "or lower max_context_tokens to decode more requests together",
        )
    if rounding and not rows_alone:
        log.warning(
            "model.batch_rounding",
            relative=rounding,
            reason="a row decoded beside others rounds differently from the same row "
            "decoded alone, by this much of the logit scale: masked padding columns in front "
            "of a shorter row change the order its attention sums in (left-padded graphs), or "
            "ONNX Runtime computes a one-row product with another kernel than a batched one "
            "(MatMulNBits on some CPUs, fp16 libraries on GPUs). A request served alone and in "
            "a batch may get different tokens where two are nearly tied (greedy) or where a "
            "seeded draw falls that near a boundary between two tokens, and a stream "
            "continued after a failover may differ likewise",
        )
    if engine.model.decodes_rows_alone:
        log.warning(
            "model.unbatched",
            reason="this CPU computes a row alone otherwise than beside others (batch_rounding "
            "above 0) and the graph quantises each row's activations to int8 (MatMulNBits "
            "with accuracy_level 4), which turns that rounding into other tokens a few dozen "
            "steps on: every decode row runs in a forward of its own, and every prompt "
            "prefills alone",
            quantizers=["MatMulNBits"],
            batch_rounding=rounding,
        )
    elif engine.model.padding is Padding.ALONE:
        quantizers = (
            engine.model.quantizes_activations if isinstance(engine.model, OnnxCausalLM) else []
        )
        log.warning(
            "model.unbatched",
            reason="rows sharing a forward would change each other's outputs (activations "
            "quantised with scales over the whole batch, as dynamically quantised int8 graphs "
            "do, or with fixed scales, where a padded row's rounding can cross a quantisation "
            "step): every row decodes in a forward of its own",
            quantizers=quantizers,
        )
    spec = engine.model.spec
    if spec.context_cap:
        log.warning(
            "model.context_capped",
            declared=spec.declared_context_length,
            served=spec.context_length,
            reason=spec.context_cap,
        )
    if settings.max_context_tokens > spec.context_length:
        log.warning(
            "model.max_context_tokens_capped",
            max_context_tokens=settings.max_context_tokens,
            context_length=spec.context_length,
            reason=f"max_context_tokens ({settings.max_context_tokens}) is more than the "
            f"model's context ({spec.context_length}): a request holds at most "
            f"{spec.context_length} positions",
        )


async def _serve(
    settings: Settings, stop: asyncio.Event, server: TokenwireServer, metrics: ServerMetrics
) -> int:
    try:
        _check_free(settings.host, settings.port)
        port = await server.start()
    except (OSError, RuntimeError) as exc:  # taken, not allowed, or grpc's "Failed to bind"
        log.error(
            "server.cannot_listen", address=host_port(settings.host, settings.port), reason=str(exc)
        )
        return 2
    log.info("server.listening", host=settings.host, port=port, pid=os.getpid())
    if not (all_api_keys(settings) or settings.tls_client_ca or is_loopback(settings.host)):
        log.warning(
            "server.unauthenticated",
            host=settings.host,
            reason="no API keys and no client certificates: anyone who reaches this address "
            "can generate; set TOKENWIRE_API_KEYS (or TOKENWIRE_API_KEYS_FILE)",
        )
    if settings.metrics_port:
        tls = metrics_tls(settings)
        try:
            metrics_port, _ = metrics.serve(settings.host, settings.metrics_port, tls)
        except OSError as exc:
            log.error(
                "metrics.cannot_listen",
                address=host_port(settings.host, settings.metrics_port),
                reason=str(exc),
            )
            await server.close("metrics_cannot_listen")
            return 2
        scheme = "http" if tls is None else "https"
        where = host_port(settings.host, metrics_port)
        log.info("metrics.listening", url=f"{scheme}://{where}/metrics")
    # Resolved once: the engine computes with the number the start-up line reports.
    threads = intra_op_threads(settings)
    available = cpus_available()
    if threads.cpus > available.cpus:
        log.warning(
            "server.threads_beyond_cpus",
            intra_op_threads=threads.cpus,
            cpus=available.cpus,
            cpus_from=available.source,
            reason="more intra-op threads than CPUs this process may use wait for each other "
            "at every operator, which makes each step slower: lower intra_op_threads, or "
            "leave it 0 for the physical cores",
        )
    resolved = dataclasses.replace(settings, intra_op_threads=threads.cpus)
    try:
        engine = await _load_unless_stopped(resolved, metrics, stop)
    except ModelLoadError as exc:
        log.error("model.refused", model_dir=str(settings.model_dir), reason=str(exc))
        await server.close("model_refused")
        return 2
    if engine is None:
        # Stopped before it served: no notice and no drain (nothing reached the engine), so
        # a pod deleted while its model loads goes at once rather than at its grace period.
        await server.close("signal_during_load")
        return 0
    _log_loaded(engine, settings)
    metrics.describe_build(__version__, engine.model.spec.name, engine.model.provider)
    await server.attach(engine)
    log.info(
        "server.started",
        version=__version__,
        model=engine.model.spec.name,
        model_dir=str(settings.model_dir),
        provider=engine.model.provider,
        intra_op_threads=threads.cpus,
        intra_op_threads_from=threads.source,
        inter_op_threads=settings.inter_op_threads,
        max_batch_size=settings.max_batch_size,
        # The limits in effect (engine.config: what the engine was built with).
        max_queue=engine.config.max_queue,
        max_kv_tokens=engine.config.max_kv_tokens,
        prefill_chunk_tokens=engine.config.prefill_chunk_tokens,
        max_tokens_limit=engine.config.max_tokens_limit,
        default_max_tokens=engine.config.default_max_tokens,
        max_prompt_bytes=engine.config.max_prompt_bytes,
        drain_grace_s=settings.drain_grace_s,
        port=port,
    )
    await stop.wait()
    await server.drain()
    return 0


async def _main(settings: Settings) -> int:
    stop, hurry = asyncio.Event(), asyncio.Event()

    def signalled() -> None:
        # The first SIGTERM/SIGINT drains; a second cuts the drain short, as the edge's does.
        if not stop.is_set():
            stop.set()
        else:
            hurry.set()  # the drain logs server.drain_cut_short where one runs

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled)
    return await run_server(settings, stop, hurry)


def serve(settings: Settings) -> int:
    configure_logging(settings.log_format)
    code = asyncio.run(_main(settings))
    if any(t.name == LOAD_THREAD and t.is_alive() for t in threading.enumerate()):
        # A load given up on at a signal still runs (ONNX Runtime building a session, or a
        # warm-up step): exit without finalizing the interpreter under native code still
        # running in it. The logs and the traces are out; the port is closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
