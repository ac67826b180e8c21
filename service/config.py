"""Server settings: one frozen object, built once from a mapping (os.environ by default)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

ENV_PREFIX = "TOKENWIRE_"
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny-py"

Provider = Literal["auto", "cpu", "cuda"]
LogFormat = Literal["json", "console"]


class SettingsError(ValueError):
    """A setting has a value outside its allowed range."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server reads from its environment; validated at construction."""

    host: str = "127.0.0.1"
    port: int = 50051
    model_dir: Path = BUNDLED_MODEL_DIR
    provider: Provider = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    ort_spinning: bool = True
    max_batch_size: int = 16
    max_queue: int = 64
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    max_prompt_bytes: int = 262_144
    max_stop_strings: int = 8
    max_stop_length: int = 64
    prefill_chunk_tokens: int = 256
    max_kv_tokens: int = 16384
    drain_grace_s: float = 30.0
    drain_notice_s: float = 0.0
    max_connection_age_s: float = 0.0
    metrics_port: int = 9464
    log_format: LogFormat = "json"
    log_content: bool = False
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    """Bearer keys callers must present (with api_keys_file); empty and no file = no auth."""
    api_keys_file: Path | None = None
    """One key per line; blank lines and lines starting with # are ignored."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """When set, clients must present a certificate signed by this CA (mTLS)."""
    metrics_tls: bool = False
    """Serve /metrics over TLS with tls_cert/tls_key (and require client certs with the CA)."""

    def __post_init__(self) -> None:
        for check in _CHECKS:
            check(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read TOKENWIRE_<FIELD> variables, then apply explicit overrides (e.g. CLI flags)."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = source.get(ENV_PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = _parse(field.name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(name: str, raw: str) -> Any:
    kind = _FIELD_TYPES.get(name, str)
    try:
        return kind(raw)
    except ValueError as exc:
        raise SettingsError(f"{ENV_PREFIX}{name.upper()}: cannot parse {raw!r}: {exc}") from exc


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


_PARSERS: dict[type, Callable[[str], Any]] = {int: int, float: float, bool: _parse_bool}
_PATHS = ("api_keys_file", "tls_cert", "tls_key", "tls_client_ca")
_FIELD_TYPES: dict[str, Callable[[str], Any]] = (
    {
        f.name: _PARSERS.get(type(f.default), Path if isinstance(f.default, Path) else str)
        for f in dataclasses.fields(Settings)
    }
    | dict.fromkeys(_PATHS, Path)
    | {"api_keys": _parse_list}
)


def read_api_keys(path: Path) -> tuple[str, ...]:
    """The keys in an api_keys_file: one a line, blank lines and # comments skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"api_keys_file: cannot read {str(path)!r}: {exc}") from exc
    return tuple(k for line in lines if (k := line.strip()) and not k.startswith("#"))


def all_api_keys(s: Settings) -> tuple[str, ...]:
    """api_keys plus the keys in api_keys_file; empty means authentication is off."""
    from_file = read_api_keys(s.api_keys_file) if s.api_keys_file is not None else ()
    return s.api_keys + from_file


def _require(cond: bool, field: str, allowed: str, value: object) -> None:
    if not cond:
        raise SettingsError(f"{field}: must be {allowed}, got {value!r}")


def _check_network(s: Settings) -> None:
    _require(0 <= s.port <= 65535, "port", "between 0 and 65535", s.port)
    _require(bool(s.host), "host", "non-empty", s.host)
    _require(
        0 <= s.metrics_port <= 65535, "metrics_port", "between 0 (off) and 65535", s.metrics_port
    )


def _check_engine(s: Settings) -> None:
    _require(s.provider in get_args(Provider), "provider", "auto, cpu or cuda", s.provider)
    _require(s.intra_op_threads >= 0, "intra_op_threads", ">= 0 (0 = auto)", s.intra_op_threads)
    _require(s.inter_op_threads >= 0, "inter_op_threads", ">= 0 (0 = auto)", s.inter_op_threads)
    _require(
        1 <= s.max_batch_size <= 1024, "max_batch_size", "between 1 and 1024", s.max_batch_size
    )
    _require(s.max_queue >= 0, "max_queue", ">= 0", s.max_queue)
    _require(s.prefill_chunk_tokens >= 1, "prefill_chunk_tokens", ">= 1", s.prefill_chunk_tokens)
    _require(s.max_kv_tokens >= 1, "max_kv_tokens", ">= 1", s.max_kv_tokens)


def _check_limits(s: Settings) -> None:
    _require(s.max_tokens_limit >= 1, "max_tokens_limit", ">= 1", s.max_tokens_limit)
    _require(
        1 <= s.default_max_tokens <= s.max_tokens_limit,
        "default_max_tokens",
        f"between 1 and max_tokens_limit ({s.max_tokens_limit})",
        s.default_max_tokens,
    )
    _require(s.max_prompt_bytes >= 1, "max_prompt_bytes", ">= 1", s.max_prompt_bytes)
    _require(s.max_stop_strings >= 0, "max_stop_strings", ">= 0", s.max_stop_strings)
    _require(s.max_stop_length >= 1, "max_stop_length", ">= 1", s.max_stop_length)


def _check_lifecycle(s: Settings) -> None:
    _require(s.drain_grace_s >= 0, "drain_grace_s", ">= 0", s.drain_grace_s)
    _require(s.drain_notice_s >= 0, "drain_notice_s", ">= 0", s.drain_notice_s)
    _require(s.max_connection_age_s >= 0, "max_connection_age_s", ">= 0", s.max_connection_age_s)
    _require(s.log_format in get_args(LogFormat), "log_format", "json or console", s.log_format)


def _valid_key(key: str) -> bool:
    # A key travels as `authorization: Bearer <key>` metadata: visible ASCII, no spaces.
    return bool(key) and all("!" <= c <= "~" for c in key)


def _check_api_keys(s: Settings) -> None:
    bad = [i for i, key in enumerate(s.api_keys) if not _valid_key(key)]
    _require(not bad, "api_keys", "visible ASCII without spaces", f"<key #{bad[0]}>" if bad else "")
    if s.api_keys_file is not None:
        keys = read_api_keys(s.api_keys_file)
        _require(bool(keys), "api_keys_file", "a file with at least one key", str(s.api_keys_file))
        bad = [i for i, key in enumerate(keys) if not _valid_key(key)]
        _require(
            not bad,
            "api_keys_file",
            "visible ASCII keys",
            f"<key on line #{bad[0] + 1}>" if bad else "",
        )


def _check_tls(s: Settings) -> None:
    _require(
        (s.tls_cert is None) == (s.tls_key is None),
        "tls_key",
        "set together with tls_cert",
        s.tls_key,
    )
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


_CHECKS: tuple[Callable[[Settings], None], ...] = (
    _check_network,
    _check_engine,
    _check_limits,
    _check_lifecycle,
    _check_api_keys,
    _check_tls,
)
