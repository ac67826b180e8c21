"""Settings whose values reach gRPC, timers or ONNX Runtime are bounded where they are read: a
value those cannot take stops the process with one line naming it (status 2), never a
traceback later or a server that misbehaves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.procs import ServerProcess
from tokenwire.client.command import build_parser
from tokenwire.common.settings import MAX_SECONDS, SettingsError, read_settings
from tokenwire.edge.settings import EdgeSettings
from tokenwire.server.config import Settings
from tokenwire.server.main import cpus_available

SERVER_DURATIONS = ("drain_grace_s", "drain_notice_s", "max_connection_age_s")
EDGE_DURATIONS = (
    "resume_window_s",
    "resume_lease_s",
    "ping_s",
    "send_timeout_s",
    "upstream_timeout_s",
    "drain_grace_s",
    "drain_notice_s",
)


def _tokenwire(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwire.client.command", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("raw", ["inf", "-inf", "Infinity", "nan"])
def test_a_number_that_is_not_finite_is_refused_naming_the_variable(raw: str) -> None:
    """TOKENWIRE_DRAIN_NOTICE_S=inf (or nan) cannot be read: the error names the variable and
    asks for a finite number (an infinite notice would keep SIGTERM from ever ending)."""
    for cls in (Settings, EdgeSettings):
        with pytest.raises(
            SettingsError,
            match=rf"TOKENWIRE_DRAIN_NOTICE_S: cannot read '{raw}': expected a finite number",
        ):
            read_settings(cls, {}, {"TOKENWIRE_DRAIN_NOTICE_S": raw})


def test_an_infinite_flag_stops_serve_with_one_line_and_status_2() -> None:
    """`tokenwire serve --max-connection-age-s inf` exits 2 naming the flag, before the gRPC
    server turns the seconds into milliseconds (which overflowed, with a traceback)."""
    done = _tokenwire(
        "serve", "--port", "0", "--metrics-port", "0", "--max-connection-age-s", "inf"
    )
    assert done.returncode == 2
    assert "--max-connection-age-s: cannot read 'inf': expected a finite number" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("cls", "field"),
    [(Settings, f) for f in SERVER_DURATIONS] + [(EdgeSettings, f) for f in EDGE_DURATIONS],
    ids=[f"serve-{f}" for f in SERVER_DURATIONS] + [f"edge-{f}" for f in EDGE_DURATIONS],
)
def test_a_duration_beyond_the_longest_is_refused_naming_it(cls: type, field: str) -> None:
    """Every seconds setting takes at most MAX_SECONDS and refuses 1e10 naming the field, its
    range and the variable (1e10 s of grace or age overflowed gRPC's milliseconds; an upstream
    timeout that large made every request a 504 at once)."""
    variable = f"TOKENWIRE_{field.upper()}"
    assert getattr(read_settings(cls, {}, {variable: str(MAX_SECONDS)}), field) == MAX_SECONDS
    with pytest.raises(
        SettingsError,
        match=rf"{field}: must be .* {MAX_SECONDS} seconds, got 10000000000.0 \(from {variable}\)",
    ):
        read_settings(cls, {}, {variable: "1e10"})


def test_a_ping_interval_under_a_second_is_refused() -> None:
    """`tokenwire edge --ping-s 1e-9` is a settings error naming ping_s and its range: a ping
    is an event on every open stream."""
    args = build_parser().parse_args(["edge", "--ping-s", "1e-9"])
    with pytest.raises(SettingsError, match=r"ping_s: must be between 1 and 1000000 seconds"):
        read_settings(EdgeSettings, args, {})


@pytest.mark.parametrize("flag", ["--intra-op-threads", "--inter-op-threads"])
def test_more_threads_than_onnx_runtime_can_start_are_refused(flag: str) -> None:
    """`--intra-op-threads 3000000000` (or inter-op) is a settings error naming the field and
    its range, not a traceback from ONNX Runtime's session options."""
    field = flag.removeprefix("--").replace("-", "_")
    args = build_parser().parse_args(["serve", flag, "3000000000"])
    with pytest.raises(
        SettingsError,
        match=rf"{field}: must be between 0 \(auto\) and 1024, got 3000000000 \(from {flag}\)",
    ):
        read_settings(Settings, args, {})


def test_more_intra_op_threads_than_cpus_is_a_warning_at_start() -> None:
    """A server given more intra-op threads than the CPUs it may use starts, and says so in
    one warning naming both numbers."""
    cpus = cpus_available().cpus
    env = {"TOKENWIRE_INTRA_OP_THREADS": str(cpus + 1)}
    proc = ServerProcess("--metrics-port", "0", env=env)
    try:
        warning = proc.wait_for("server.threads_beyond_cpus")
        started = proc.wait_for("server.started")
    finally:
        proc.close()
    assert warning["level"] == "warning"
    assert (warning["intra_op_threads"], warning["cpus"]) == (cpus + 1, cpus)
    assert started["intra_op_threads"] == cpus + 1


@pytest.mark.parametrize(
    "endpoint",
    ["http://[::1", "http://", "https://:4317", "http://collector:port"],
)
def test_a_collector_url_that_does_not_parse_is_refused_naming_it(endpoint: str) -> None:
    """An OTLP endpoint that is no http(s) URL with a host (an unclosed IPv6 bracket, no host,
    a port that is no number) is a settings error naming otlp_endpoint, for the server and the
    edge alike."""
    for cls in (Settings, EdgeSettings):
        with pytest.raises(
            SettingsError, match=r"otlp_endpoint: must be an http:// .* with a host"
        ):
            read_settings(cls, {}, {"TOKENWIRE_OTLP_ENDPOINT": endpoint})


@pytest.mark.parametrize("verb", ["serve", "edge"])
def test_a_malformed_collector_url_stops_the_process_with_status_2(verb: str) -> None:
    """`tokenwire serve` (or `edge`) `--otlp-endpoint 'http://[::1'` exits 2 with one line
    naming the flag, not a traceback from the exporter."""
    done = _tokenwire(verb, "--port", "0", "--otlp-endpoint", "http://[::1")
    assert done.returncode == 2
    assert done.stderr.startswith(f"tokenwire {verb}: otlp_endpoint: must be")
    assert "(from --otlp-endpoint)" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_prompt_limit_grpc_cannot_size_a_message_for_is_refused() -> None:
    """max_prompt_bytes sizes gRPC's message limit (a 32-bit integer): above 64 MiB it is a
    settings error naming the field and its range."""
    with pytest.raises(
        SettingsError,
        match=r"max_prompt_bytes: must be between 1 and 67108864, got 3000000000 \(from "
        r"TOKENWIRE_MAX_PROMPT_BYTES\)",
    ):
        read_settings(Settings, {}, {"TOKENWIRE_MAX_PROMPT_BYTES": "3000000000"})
