"""One settings mechanism: a flag, a TOKENWIRE_* variable or the default reaches the engine and
the edge the same way, by the same rules, read exactly as the `tokenwire` verbs read them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.fakes import ScriptedModel
from tokenwire.client.cli import ConnectionSettings
from tokenwire.client.command import build_parser
from tokenwire.common.settings import MAX_SECONDS, SettingsError, read_settings, settings_table
from tokenwire.edge.settings import EdgeSettings
from tokenwire.server.config import Settings
from tokenwire.server.domain import EngineStopped, TokenwireError
from tokenwire.server.engine import Engine, EngineConfig, ModelSpec
from tokenwire.server.main import engine_config
from tokenwire.server.rpc.errors import to_status
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.server.up import UpSettings

pytestmark = pytest.mark.compute

ROOT = Path(__file__).resolve().parent.parent

# Each source of one value: the flag, the variable, or nothing (the default).
SOURCES = {
    "flag": (["--drain-grace-s", "7"], {}, 7.0),
    "env": ([], {"TOKENWIRE_DRAIN_GRACE_S": "8"}, 8.0),
    "default": ([], {}, 30.0),
}


def serve_settings(argv: list[str], env: dict[str, str]) -> Settings:
    """What `tokenwire serve` builds: its own parser's values, then env, then defaults."""
    return read_settings(Settings, build_parser().parse_args(["serve", *argv]), env)


def edge_settings(argv: list[str], env: dict[str, str]) -> EdgeSettings:
    """What `tokenwire edge` builds, the same way."""
    return read_settings(EdgeSettings, build_parser().parse_args(["edge", *argv]), env)


@pytest.mark.parametrize("source", SOURCES)
def test_a_shared_setting_reaches_the_server_and_the_edge_alike(source: str) -> None:
    """drain_grace_s given by flag, by TOKENWIRE_DRAIN_GRACE_S or by default: both read it."""
    argv, env, expected = SOURCES[source]
    assert serve_settings(argv, env).drain_grace_s == expected
    assert edge_settings(argv, env).drain_grace_s == expected


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [(["--max-queue", "7"], {}, 7), ([], {"TOKENWIRE_MAX_QUEUE": "9"}, 9), ([], {}, 64)],
    ids=["flag", "env", "default"],
)
def test_a_limit_reaches_the_engine_config(
    argv: list[str], env: dict[str, str], expected: int
) -> None:
    """max_queue by flag, variable or default ends up in the EngineConfig the server builds."""
    assert engine_config(serve_settings(argv, env)).max_queue == expected


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--max-prompt-bytes", "4000"], {}, 4000),
        ([], {"TOKENWIRE_MAX_PROMPT_BYTES": "5000"}, 5000),
        ([], {}, 262_144),
    ],
    ids=["flag", "env", "default"],
)
def test_a_request_limit_reaches_the_engine(
    argv: list[str], env: dict[str, str], expected: int, spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """max_prompt_bytes by flag, variable or default is the bound a real Engine checks."""
    config = engine_config(serve_settings(argv, env))
    engine = Engine(ScriptedModel(spec, {}), tokenizer, config)
    assert engine.limits.max_prompt_bytes == expected


def test_a_flag_beats_the_variable_which_beats_the_default() -> None:
    """With both given, the flag wins, for the server and the edge alike."""
    env = {"TOKENWIRE_DRAIN_GRACE_S": "8", "TOKENWIRE_LOG_FORMAT": "console"}
    server = serve_settings(["--drain-grace-s", "7"], env)
    edge = edge_settings(["--drain-grace-s", "7"], env)
    assert (server.drain_grace_s, server.log_format) == (7.0, "console")
    assert (edge.drain_grace_s, edge.log_format) == (7.0, "console")


@pytest.mark.parametrize(
    ("verb", "variable"),
    [("serve", "TOKENWIRE_LOG_CONTENT"), ("edge", "TOKENWIRE_METRICS")],
)
def test_a_bad_boolean_variable_stops_the_process_naming_it(verb: str, variable: str) -> None:
    """`tokenwire serve` and `tokenwire edge` exit 2 naming the variable and the allowed values."""
    done = subprocess.run(
        [sys.executable, "-m", "tokenwire.client.command", verb, "--port", "0"],
        env={"PATH": "", variable: "maybe"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert f"{variable}: cannot read 'maybe': expected one of 1/0, true/false" in done.stderr


def test_an_out_of_range_variable_names_field_and_variable() -> None:
    """A value that parses but is out of range names the field, its range and the variable."""
    with pytest.raises(
        SettingsError,
        match=r"port: must be between 0 and 65535, got 70000 \(from TOKENWIRE_EDGE_PORT\)",
    ):
        edge_settings([], {"TOKENWIRE_EDGE_PORT": "70000"})


def test_a_target_list_naming_no_server_is_refused_naming_it() -> None:
    """A gRPC target of only commas and spaces stops the edge and the CLI with a settings error
    naming the field, not a traceback from the channel."""
    with pytest.raises(SettingsError, match=r"grpc_target: must be a host:port"):
        edge_settings(["--grpc-target", " , "], {})
    args = build_parser().parse_args(["generate", "x", "--target", ","])
    with pytest.raises(SettingsError, match=r"target: must be a host:port"):
        read_settings(ConnectionSettings, args, {})


def test_a_target_that_is_no_address_is_refused_naming_it() -> None:
    """`--target 'not a target'` is a settings error naming the field for the CLI and the
    edge, not a resolver failure at the first call."""
    with pytest.raises(SettingsError, match=r"grpc_target: must be a host:port"):
        edge_settings(["--grpc-target", "not a target"], {})
    for target in ("not a target", "a:1,b:", "host:99999", "[::1:50051"):
        args = build_parser().parse_args(["generate", "x", "--target", target])
        with pytest.raises(SettingsError, match=r"target: must be a host:port"):
            read_settings(ConnectionSettings, args, {})


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:50051",
        "localhost",
        "[::1]:50051",
        "dns:///tokenwire.default.svc.cluster.local:50051",
        "dns://8.8.8.8/tokenwire.example:50051",
        "unix:/run/tokenwire.sock",
        "unix:///run/tokenwire.sock",
        "ipv4:127.0.0.1:50051,127.0.0.2:50051",
        "ipv6:[::1]:50051,[::2]:50051",
        "a.example:50051, b.example:50051",
    ],
)
def test_every_grpc_target_form_is_accepted(target: str) -> None:
    """The target forms grpc's channel takes pass the settings check."""
    args = build_parser().parse_args(["generate", "x", "--target", target])
    assert read_settings(ConnectionSettings, args, {}).target == target
    assert edge_settings(["--grpc-target", target], {}).grpc_target == target


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "1e300"])
def test_a_timeout_out_of_range_stops_the_cli_naming_it(timeout: str) -> None:
    """`tokenwire generate --timeout -1` (or 0, or more than a gRPC deadline holds) exits 2
    with one line naming --timeout, before any call, instead of failing the call with
    DEADLINE_EXCEEDED."""
    done = subprocess.run(
        [sys.executable, "-m", "tokenwire.client.command", "generate", "x", "--timeout", timeout],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert (
        done.stderr
        == f"error: --timeout: must be a number of seconds above 0 and at most {MAX_SECONDS}, "
        f"got {float(timeout)!r}\n"
    )


def test_up_refuses_one_port_for_two_listeners() -> None:
    """`tokenwire up` with the edge on the server's port is a settings error naming it."""
    args = build_parser().parse_args(["up", "--grpc-port", "7001", "--http-port", "7001"])
    with pytest.raises(SettingsError, match=r"http_port: must be different from grpc_port"):
        read_settings(UpSettings, args, {})


def test_up_reads_the_ports_serve_and_edge_read() -> None:
    """`tokenwire up` takes TOKENWIRE_PORT, _EDGE_PORT and _METRICS_PORT, which its flags beat."""
    env = {
        "TOKENWIRE_PORT": "6001",
        "TOKENWIRE_EDGE_PORT": "6002",
        "TOKENWIRE_METRICS_PORT": "6003",
    }
    read = read_settings(UpSettings, build_parser().parse_args(["up"]), env)
    assert (read.grpc_port, read.http_port, read.metrics_port) == (6001, 6002, 6003)
    flagged = read_settings(
        UpSettings, build_parser().parse_args(["up", "--grpc-port", "7001"]), env
    )
    assert flagged.grpc_port == 7001


def test_every_engine_limit_is_a_server_setting() -> None:
    """EngineConfig is filled from the settings by name: each of its fields is a setting."""
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)} - {"retry_after_s"}
    assert engine_fields <= {f.name for f in dataclasses.fields(Settings)}


def test_the_docs_tables_are_the_settings() -> None:
    """docs/operations.md carries the table rendered from each process's settings class."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for settings in (Settings, EdgeSettings, UpSettings, ConnectionSettings):
        assert settings_table(settings) in text, settings.__name__


@pytest.mark.parametrize(
    ("settings", "verb"),
    [
        (Settings, "serve"),
        (ConnectionSettings, "generate"),
        (UpSettings, "up"),
        (EdgeSettings, "edge"),
    ],
)
def test_each_docs_table_is_under_its_commands_heading(settings: type, verb: str) -> None:
    """In docs/operations.md the heading nearest above a settings table names its command, so
    no table reads as part of another command's section."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    above = text[: text.index(settings_table(settings))]
    headings = [line for line in above.splitlines() if line.startswith("#")]
    assert headings[-1] == f"### `tokenwire {verb}`"


def test_engine_stopped_is_a_domain_error_reported_as_internal() -> None:
    """EngineStopped is a TokenwireError and still maps to INTERNAL with its message."""
    exc = EngineStopped("decode failed")
    status = to_status(exc)
    assert isinstance(exc, TokenwireError)
    assert (status.code, status.details) == (grpc.StatusCode.INTERNAL, "decode failed")


def test_an_empty_variable_counts_as_unset() -> None:
    """TOKENWIRE_MAX_QUEUE= (empty) leaves the default, for numbers as for booleans."""
    settings = serve_settings([], {"TOKENWIRE_MAX_QUEUE": "", "TOKENWIRE_ORT_SPINNING": " "})
    assert (settings.max_queue, settings.ort_spinning) == (64, True)
