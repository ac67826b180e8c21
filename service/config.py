"""Server settings: one frozen object, read once from flags, TOKENWIRE_* variables, defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from tokenwire.common import defaults, keys
from tokenwire.common.keys import read_api_keys
from tokenwire.common.settings import (
    ENV_PREFIX,
    SettingsError,
    read_settings,
    require_collector_url,
    require_seconds,
    setting,
)
from tokenwire.common.settings import require as _require
from tokenwire.common.tls import tls_files_problem

__all__ = ["BUNDLED_MODEL_DIR", "Settings", "SettingsError", "all_api_keys", "read_api_keys"]

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny-py"

Provider = Literal["auto", "cpu", "cuda"]
MAX_THREADS = 1024
"""The most ONNX Runtime threads of either kind a server may ask for."""
MAX_PROMPT_BYTES = 64 * 1024 * 1024
"""The largest max_prompt_bytes: far more than any model's context holds."""
LogFormat = Literal["json", "console"]


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything `tokenwire serve` reads (flags, then TOKENWIRE_* variables, then these
    defaults; see tokenwire.common.settings); validated at construction."""

    host: str = setting(defaults.HOST, "bind address (`0.0.0.0` in containers)")
    port: int = setting(defaults.GRPC_PORT, "gRPC port; 0 picks a free one (logged)")
    model_dir: Path = setting(
        BUNDLED_MODEL_DIR,
        "model directory (an Optimum export or an ONNX Runtime GenAI folder)",
        shown="`models/tiny-py`",
    )
    model_file: str = setting(
        "",
        "the graph to load, relative to the model directory (e.g. `onnx/model_q4.onnx`); "
        "empty: `model.onnx`, else `onnx/model.onnx`, or the file genai_config.json names",
    )
    provider: Provider = setting(
        "auto",
        "`auto` (CUDA when a GPU and its provider are usable, else CPU), `cpu`, "
        "or `cuda` (no start without it)",
    )
    intra_op_threads: int = setting(
        0,
        "ONNX Runtime intra-op threads, at most 1024 (0 = the physical cores this process may "
        "run on, capped by its container's CPU quota; logged at start, with a warning when "
        "more than the CPUs it may use)",
    )
    inter_op_threads: int = setting(1, "ONNX Runtime inter-op threads, at most 1024 (0 = auto)")
    ort_spinning: bool = setting(
        True,
        "ORT threads spin between the kernels of a step and sleep between steps "
        "(false: never spin, which frees shared CPUs at a cost per kernel)",
    )
    cuda_graph: bool = setting(
        True,
        "on CUDA, replay decode steps as CUDA graphs, one per batch size "
        "(GroupQueryAttention graphs; others run uncaptured)",
    )
    max_batch_size: int = setting(16, "sequences decoded together in one step (1 to 1024)")
    max_queue: int = setting(64, "requests waiting beyond the batch; more get RESOURCE_EXHAUSTED")
    max_tokens_limit: int = setting(512, "largest `max_tokens` accepted")
    default_max_tokens: int = setting(128, "`max_tokens` when a request leaves it 0")
    max_prompt_bytes: int = setting(
        262_144,
        "largest prompt in bytes, at most 64 MiB (gRPC takes requests up to 4 MiB, or up to "
        "this plus 1 MiB where that is more)",
    )
    max_stop_strings: int = setting(8, "most stop strings a request may give")
    max_stop_length: int = setting(64, "longest stop string, in characters")
    prefill_chunk_tokens: int = setting(256, "prompt tokens prefilled per step (chunked)")
    max_kv_tokens: int = setting(
        16384,
        "prompt + max_tokens of all running requests together; beyond it requests queue (one "
        "request holds at most this many)",
    )
    max_context_tokens: int = setting(
        0,
        "longest prompt + max_tokens one request may hold; 0 = the model's context (a "
        "preallocated cache row holds this many positions: lower it to fit more rows)",
    )
    drain_grace_s: float = setting(
        defaults.DRAIN_GRACE_S, "seconds in-flight streams may run after SIGTERM"
    )
    drain_notice_s: float = setting(
        0.0,
        "pause after NOT_SERVING (new requests already get UNAVAILABLE) before the drain waits "
        "for streams and closes the port",
    )
    max_connection_age_s: float = setting(
        0.0, "age out client connections so they re-balance across replicas (0 = off)"
    )
    metrics_port: int = setting(defaults.METRICS_PORT, "Prometheus `/metrics` port; 0 = off")
    log_format: LogFormat = setting("json", "`json` lines, or `console` for humans")
    log_content: bool = setting(False, "include prompts and completions in logs")
    otlp_endpoint: str = setting(
        "", "OTLP/gRPC collector for traces, e.g. `http://otel-collector:4317`; empty = no export"
    )
    api_keys: tuple[str, ...] = setting(
        (),
        "comma-separated bearer keys; with them (or a keys file) RPCs need one",
        secret=True,
        flag=False,
    )
    api_keys_file: Path | None = setting(
        None, "bearer keys, one a line (`#` comments); added to TOKENWIRE_API_KEYS"
    )
    tls_cert: Path | None = setting(None, "serve gRPC over TLS with this certificate chain (PEM)")
    tls_key: Path | None = setting(None, "the private key of tls_cert (PEM)")
    tls_client_ca: Path | None = setting(
        None, "require client certificates signed by this CA (mTLS)"
    )
    metrics_tls: bool = setting(
        False, "serve `/metrics` over HTTPS with tls_cert (client certs with tls_client_ca)"
    )

    def __post_init__(self) -> None:
        for check in _CHECKS:
            check(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
        """Read flags (keyword arguments), then TOKENWIRE_<FIELD> variables, then defaults."""
        return read_settings(cls, flags, env)


_PATHS = ("api_keys_file", "tls_cert", "tls_key", "tls_client_ca")


def all_api_keys(s: Settings) -> tuple[str, ...]:
    """api_keys plus the keys in api_keys_file; empty means authentication is off."""
    return keys.all_api_keys(s.api_keys, s.api_keys_file)


def _names(field: str) -> str:
    """The variable and the flag that set a field (those named after it)."""
    return f"{ENV_PREFIX}{field.upper()}, --{field.replace('_', '-')}"


def _check_network(s: Settings) -> None:
    _require(0 <= s.port <= 65535, "port", "between 0 and 65535", s.port)
    _require(bool(s.host), "host", "non-empty", s.host)
    _require(
        0 <= s.metrics_port <= 65535, "metrics_port", "between 0 (off) and 65535", s.metrics_port
    )
    # Both fixed and the same: the second listener would fail only once the first is up.
    same = s.metrics_port != 0 and s.metrics_port == s.port
    _require(not same, "metrics_port", f"0 (off) or different from port ({_names('port')})", s.port)
    require_collector_url(s.otlp_endpoint, "otlp_endpoint")


def _check_engine(s: Settings) -> None:
    _require(s.provider in get_args(Provider), "provider", "auto, cpu or cuda", s.provider)
    for name in ("intra_op_threads", "inter_op_threads"):
        threads = getattr(s, name)
        # ONNX Runtime takes a C int and starts every thread it is given.
        allowed = f"between 0 (auto) and {MAX_THREADS}"
        _require(0 <= threads <= MAX_THREADS, name, allowed, threads)
    _require(
        1 <= s.max_batch_size <= 1024, "max_batch_size", "between 1 and 1024", s.max_batch_size
    )
    _require(s.max_queue >= 0, "max_queue", ">= 0", s.max_queue)
    _require(s.prefill_chunk_tokens >= 1, "prefill_chunk_tokens", ">= 1", s.prefill_chunk_tokens)
    _require(s.max_kv_tokens >= 1, "max_kv_tokens", ">= 1", s.max_kv_tokens)
    _require(
        s.max_context_tokens == 0 or s.max_context_tokens >= 2,
        "max_context_tokens",
        "0 (the model's context) or at least 2",
        s.max_context_tokens,
    )


def _check_limits(s: Settings) -> None:
    _require(s.max_tokens_limit >= 1, "max_tokens_limit", ">= 1", s.max_tokens_limit)
    _require(
        1 <= s.default_max_tokens <= s.max_tokens_limit,
        "default_max_tokens",
        f"between 1 and max_tokens_limit ({s.max_tokens_limit})",
        s.default_max_tokens,
    )
    # It sizes gRPC's message limit, a 32-bit integer (see rpc/server.py max_message_bytes).
    _require(
        1 <= s.max_prompt_bytes <= MAX_PROMPT_BYTES,
        "max_prompt_bytes",
        f"between 1 and {MAX_PROMPT_BYTES}",
        s.max_prompt_bytes,
    )
    _require(s.max_stop_strings >= 0, "max_stop_strings", ">= 0", s.max_stop_strings)
    _require(s.max_stop_length >= 1, "max_stop_length", ">= 1", s.max_stop_length)
    # The smallest request that leaves max_tokens unset (one prompt token, the default
    # max_tokens) must fit the KV budget, or every such request would be refused.
    _require(
        s.max_kv_tokens > s.default_max_tokens,
        "max_kv_tokens",
        f"more than default_max_tokens ({s.default_max_tokens}): a one-token prompt with the "
        "default max_tokens must fit",
        s.max_kv_tokens,
    )


def _check_lifecycle(s: Settings) -> None:
    # Each reaches gRPC in milliseconds (connection ageing) or a timer: see MAX_SECONDS.
    require_seconds(s.drain_grace_s, "drain_grace_s")
    require_seconds(s.drain_notice_s, "drain_notice_s")
    require_seconds(s.max_connection_age_s, "max_connection_age_s")
    _require(s.log_format in get_args(LogFormat), "log_format", "json or console", s.log_format)


def _check_api_keys(s: Settings) -> None:
    keys.check_api_keys(s.api_keys, s.api_keys_file)


def _check_tls(s: Settings) -> None:
    pair = ("tls_cert", "tls_key")
    for given, other in (pair, pair[::-1]):
        value = getattr(s, given)
        alone = value is not None and getattr(s, other) is None
        _require(not alone, given, f"given with {other} ({_names(other)})", str(value))
    _require(
        s.tls_client_ca is None or s.tls_cert is not None,
        "tls_client_ca",
        "used only with tls_cert and tls_key",
        s.tls_client_ca,
    )
    _require(not s.metrics_tls or s.tls_cert is not None, "metrics_tls", "used with tls_cert", True)
    for name in _PATHS:
        path = getattr(s, name)
        _require(path is None or path.is_file(), name, "an existing file", path)
    problem = tls_files_problem(s.tls_client_ca, s.tls_cert, s.tls_key)
    if problem is not None:
        which, why = problem
        raise SettingsError("tls_client_ca" if which == "ca" else "tls_cert", why)


_CHECKS: tuple[Callable[[Settings], None], ...] = (
    _check_network,
    _check_engine,
    _check_limits,
    _check_lifecycle,
    _check_api_keys,
    _check_tls,
)
