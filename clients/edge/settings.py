"""Edge settings, read once from TOKENWIRE_* variables (or flags) and validated."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any


class EdgeSettingsError(ValueError):
    """A setting has a value outside its allowed range."""


def _split(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclasses.dataclass(frozen=True, slots=True)
class EdgeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_target: str = "127.0.0.1:50051"
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    resume_window_s: float = 10.0
    ping_s: float = 15.0
    max_body_bytes: int = 1_048_576
    resume_stream_bytes: int = 1_048_576
    resume_total_bytes: int = 64 * 1_048_576
    upstream_timeout_s: float = 600.0
    metrics: bool = True
    # How the edge reaches the server: bearer key (default: the first of api_keys, so one
    # TOKENWIRE_API_KEYS serves `tokenwire up`'s server and edge alike) and TLS files.
    upstream_api_key: str = dataclasses.field(default="", repr=False)
    upstream_tls: bool = False
    upstream_tls_ca: str = ""
    upstream_tls_cert: str = ""
    upstream_tls_key: str = ""
    drain_grace_s: float = 30.0
    drain_notice_s: float = 0.0
    # Other names the OpenAI routes accept for the served model (TOKENWIRE_MODEL_ALIASES).
    model_aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "port", "between 0 and 65535", self.port),
            (
                self.resume_window_s >= 0,
                "resume_window_s",
                ">= 0 (0 = cancel on disconnect)",
                self.resume_window_s,
            ),
            (self.ping_s > 0, "ping_s", "> 0", self.ping_s),
            (self.max_body_bytes >= 1024, "max_body_bytes", ">= 1024", self.max_body_bytes),
            (
                self.resume_stream_bytes >= 1024,
                "resume_stream_bytes",
                ">= 1024",
                self.resume_stream_bytes,
            ),
            (
                self.resume_total_bytes >= self.resume_stream_bytes,
                "resume_total_bytes",
                ">= resume_stream_bytes",
                self.resume_total_bytes,
            ),
            (self.upstream_timeout_s > 0, "upstream_timeout_s", "> 0", self.upstream_timeout_s),
            (self.drain_grace_s >= 0, "drain_grace_s", ">= 0", self.drain_grace_s),
            (self.drain_notice_s >= 0, "drain_notice_s", ">= 0", self.drain_notice_s),
        ]
        for ok, field, allowed, value in checks:
            if not ok:
                raise EdgeSettingsError(f"{field}: must be {allowed}, got {value!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> EdgeSettings:
        """TOKENWIRE_EDGE_HOST / _EDGE_PORT, TOKENWIRE_GRPC_TARGET, TOKENWIRE_API_KEYS, ..."""
        source = os.environ if env is None else env
        names = {"host": "EDGE_HOST", "port": "EDGE_PORT"}
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = source.get("TOKENWIRE_" + names.get(field.name, field.name.upper()))
            if raw is None:
                continue
            default = field.default
            try:
                if isinstance(default, tuple):
                    values[field.name] = _split(raw)
                elif isinstance(default, bool):
                    values[field.name] = raw.strip().lower() in {"1", "true", "yes", "on"}
                elif isinstance(default, int | float):
                    values[field.name] = type(default)(raw)
                else:
                    values[field.name] = raw
            except ValueError as exc:
                raise EdgeSettingsError(f"TOKENWIRE_{field.name.upper()}: {exc}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
