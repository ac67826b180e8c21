"""Edge settings: one frozen object, read once from flags, TOKENWIRE_* variables, defaults."""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from tokenwire.client.targets import TARGET_RULE, names_a_target
from tokenwire.common import defaults, keys
from tokenwire.common.settings import (
    SettingsError,
    read_settings,
    require,
    require_collector_url,
    require_seconds,
    setting,
)
from tokenwire.common.tls import tls_files_problem

# The edge's errors are the shared settings errors: one type, one message shape everywhere.
EdgeSettingsError = SettingsError

LogFormat = Literal["json", "console"]
MIN_PING_S = 1
"""The shortest SSE ping interval, in seconds."""
_DB = re.compile(r"/?[0-9]{0,9}", re.ASCII)


def _is_store_url(url: str) -> bool:
    """A Redis URL the client can open: redis[s]://host[:port][/db], or unix:///path."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (reading it checks it: a port that is no number raises)
    except ValueError:
        return False
    if parts.scheme == "unix":
        return bool(parts.path)
    return (
        parts.scheme in ("redis", "rediss")
        and bool(parts.hostname)
        and bool(_DB.fullmatch(parts.path))
    )


def _store_options_problem(url: str) -> str | None:
    """Why redis-py cannot make a connection of the URL (a query option it does not take, or
    a value it cannot read: `?socket_timeout=abc`), or None; nothing is connected. The reason
    names the option, never the URL, which may carry credentials."""
    # Imported here: the settings build `tokenwire edge`'s flags without the edge extra.
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    try:
        aioredis.ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    except (ValueError, RedisError) as exc:
        return str(exc)
    except TypeError as exc:
        unknown = str(exc).rpartition("argument ")[2] or "an option"
        return f"{unknown} is not an option redis-py takes"
    return None


def _names(field: str) -> str:
    """The variable and the flag that set a field of the edge's (those named after it)."""
    return f"TOKENWIRE_{field.upper()}, --{field.replace('_', '-')}"


@dataclasses.dataclass(frozen=True, slots=True)
class EdgeSettings:
    """Everything `tokenwire edge` reads; validated at construction."""

    host: str = setting(
        defaults.HOST,
        "bind address; on a loopback one the edge answers only loopback Host names (and "
        "allowed_hosts)",
        env="TOKENWIRE_EDGE_HOST",
    )
    port: int = setting(
        defaults.HTTP_PORT, "HTTP port; 0 picks a free one (logged)", env="TOKENWIRE_EDGE_PORT"
    )
    grpc_target: str = setting(
        defaults.GRPC_TARGET,
        "server address; a comma-separated list (a stream opens on, and fails over to, the "
        "next target that serves the same model; ready while any is SERVING) or "
        "`dns:///name:port` (round robin over every replica whose health is SERVING)",
    )
    api_keys: tuple[str, ...] = setting(
        (),
        "comma-separated bearer keys; with them (or a keys file) all but health and page "
        "routes need one",
        secret=True,
        flag=False,
    )
    api_keys_file: Path | None = setting(
        None, "bearer keys, one a line (`#` comments); added to TOKENWIRE_API_KEYS"
    )
    cors_origins: tuple[str, ...] = setting((), "comma-separated allowed origins")
    allowed_hosts: tuple[str, ...] = setting(
        (),
        "comma-separated Host names an edge on a loopback address answers besides loopback "
        "ones (a reverse proxy's on the same machine that passes its own Host)",
    )
    resume_window_s: float = setting(
        10.0, "how long a dropped native stream keeps generating for a resume (0 = cancel)"
    )
    resume_store: str = setting(
        "",
        "where native streams are kept for resumes: empty = this edge's memory; "
        "`redis://host:port/db` = shared by every edge, so a resume may land on any replica "
        "and a dead edge's streams continue on another",
        secret=True,  # a redis:// URL may carry a password
        shown="(memory)",
    )
    resume_lease_s: float = setting(
        2.0,
        "with a resume store: how long an edge's hold on the streams it generates outlives it "
        "(another edge takes a dead edge's stream over after this)",
    )
    ping_s: float = setting(
        15.0, "SSE ping comment interval, 1 s or more (keeps proxies from cutting streams)"
    )
    send_timeout_s: float = setting(
        30.0,
        "a client that takes no data for this long while the edge has some for it (a stream "
        "or a response it stopped reading) is cut: its connection closed, as if it had left",
    )
    max_connections: int = setting(
        900,
        "HTTP connections served at once; beyond them requests get 503 (health probes are "
        "answered) and their connection closed; lowered to fit the open-files limit",
    )
    max_body_bytes: int = setting(1_048_576, "larger request bodies get 413")
    resume_stream_bytes: int = setting(1_048_576, "resume buffer of one stream, bytes")
    resume_total_bytes: int = setting(64 * 1_048_576, "resume buffers of all streams, bytes")
    upstream_timeout_s: float = setting(
        600.0,
        "deadline of each upstream stream, its failovers included, and of a tokenize or "
        "detokenize call over all the targets it tries",
    )
    metrics: bool = setting(True, "serve the edge's `/metrics`")
    otlp_endpoint: str = setting(
        "", "OTLP/gRPC collector for traces, e.g. `http://otel-collector:4317`; empty = no export"
    )
    # How the edge reaches the server: bearer key (default: the first of api_keys, so one
    # TOKENWIRE_API_KEYS serves `tokenwire up`'s server and edge alike) and TLS files.
    upstream_api_key: str = setting(
        "",
        "bearer key the edge sends to the server",
        secret=True,
        flag=False,
        shown="first of the edge's keys",
    )
    upstream_tls: bool = setting(False, "reach the server over TLS (system trust roots)")
    upstream_tls_ca: str = setting("", "CA to trust for the server's certificate (implies TLS)")
    upstream_tls_cert: str = setting("", "the edge's client certificate, for an mTLS server")
    upstream_tls_key: str = setting("", "the key of upstream_tls_cert")
    drain_grace_s: float = setting(
        defaults.DRAIN_GRACE_S, "seconds open streams may run after SIGTERM before cancellation"
    )
    drain_notice_s: float = setting(
        0.0, "pause after `/readyz` turns 503 before new requests are refused"
    )
    log_format: LogFormat = setting("json", "`json` lines, or `console` for humans")
    model_aliases: tuple[str, ...] = setting(
        (), "comma-separated other names the OpenAI routes accept for the served model"
    )

    def all_api_keys(self) -> tuple[str, ...]:
        """api_keys plus the keys file's, as the server reads them; empty: no authentication."""
        return keys.all_api_keys(self.api_keys, self.api_keys_file)

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "port", "between 0 and 65535", self.port)
        require(names_a_target(self.grpc_target), "grpc_target", TARGET_RULE, self.grpc_target)
        keys.check_api_keys(self.api_keys, self.api_keys_file)
        # Durations reach gRPC deadlines, Redis expiries in milliseconds and timers: each is
        # finite and at most MAX_SECONDS.
        require_seconds(self.resume_window_s, "resume_window_s")
        require(
            not self.resume_store or _is_store_url(self.resume_store),
            "resume_store",
            "empty (memory) or a URL redis://host[:port][/db], rediss://... or unix:///path",
            # A URL that may carry credentials (user:password@, or ?password=) is not repeated
            # in a message that may be logged.
            "<a URL that may carry credentials>"
            if "@" in self.resume_store or "?" in self.resume_store
            else self.resume_store,
        )
        if self.resume_store and _is_store_url(self.resume_store):
            problem = _store_options_problem(self.resume_store)
            if problem is not None:
                raise SettingsError("resume_store", f"its options do not work: {problem}")
        require_seconds(self.resume_lease_s, "resume_lease_s", above=True)
        # A ping is an event on every open stream: more than one a second only adds traffic.
        require_seconds(self.ping_s, "ping_s", MIN_PING_S)
        require_seconds(self.send_timeout_s, "send_timeout_s", above=True)
        require(self.max_connections >= 1, "max_connections", ">= 1", self.max_connections)
        require(self.max_body_bytes >= 1024, "max_body_bytes", ">= 1024", self.max_body_bytes)
        require(
            self.resume_stream_bytes >= 1024,
            "resume_stream_bytes",
            ">= 1024",
            self.resume_stream_bytes,
        )
        require(
            self.resume_total_bytes >= self.resume_stream_bytes,
            "resume_total_bytes",
            ">= resume_stream_bytes",
            self.resume_total_bytes,
        )
        require_seconds(self.upstream_timeout_s, "upstream_timeout_s", above=True)
        require_seconds(self.drain_grace_s, "drain_grace_s")
        require_seconds(self.drain_notice_s, "drain_notice_s")
        require(
            self.log_format in ("json", "console"), "log_format", "json or console", self.log_format
        )
        require_collector_url(self.otlp_endpoint, "otlp_endpoint")
        self._check_upstream_security()

    def _check_upstream_security(self) -> None:
        """The upstream key and TLS files, checked here so that a message names the setting
        (and the variable or flag it came from) rather than the channel's own field."""
        key = self.upstream_api_key
        allowed = "visible ASCII without spaces"
        require(not key or keys.valid_key(key), "upstream_api_key", allowed, "<the key>")
        pair = ("upstream_tls_cert", "upstream_tls_key")
        for given, other in (pair, pair[::-1]):
            value = getattr(self, given)
            alone = bool(value) and not getattr(self, other)
            require(not alone, given, f"given with {other} ({_names(other)})", value)
        for name in ("upstream_tls_ca", "upstream_tls_cert", "upstream_tls_key"):
            path = getattr(self, name)
            require(not path or Path(path).is_file(), name, "an existing file", path)
        files = (self.upstream_tls_ca, self.upstream_tls_cert, self.upstream_tls_key)
        problem = tls_files_problem(*files, key_setting="upstream_tls_key")
        if problem is not None:
            which, why = problem
            raise SettingsError(f"upstream_tls_{which}", why)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **flags: Any) -> EdgeSettings:
        """Read flags (keyword arguments), then TOKENWIRE_* variables, then defaults."""
        return read_settings(cls, flags, env)
