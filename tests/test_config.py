"""Settings come from TOKENWIRE_* variables, are validated, and name a bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenwire.server.config import Settings, SettingsError


def test_environment_variables_set_fields() -> None:
    """TOKENWIRE_PORT, _MODEL_DIR and _LOG_CONTENT are parsed into typed fields."""
    env = {"TOKENWIRE_PORT": "6000", "TOKENWIRE_MODEL_DIR": "/m", "TOKENWIRE_LOG_CONTENT": "yes"}
    settings = Settings.from_env(env)
    assert (settings.port, settings.model_dir, settings.log_content) == (6000, Path("/m"), True)


def test_explicit_overrides_beat_the_environment() -> None:
    """A CLI flag passed as an override wins over the variable."""
    assert Settings.from_env({"TOKENWIRE_PORT": "6000"}, port=7000).port == 7000


def test_out_of_range_value_names_the_field() -> None:
    """An invalid batch size raises SettingsError naming max_batch_size and its range."""
    with pytest.raises(SettingsError, match=r"max_batch_size: must be between 1 and 1024"):
        Settings.from_env({"TOKENWIRE_MAX_BATCH_SIZE": "0"})


def test_unparsable_value_names_the_variable() -> None:
    """A non-number port names TOKENWIRE_PORT."""
    with pytest.raises(SettingsError, match="TOKENWIRE_PORT"):
        Settings.from_env({"TOKENWIRE_PORT": "http"})


def test_a_kv_budget_no_default_request_fits_is_refused() -> None:
    """A KV budget that cannot hold a one-token prompt with the default max_tokens (so every
    request leaving max_tokens unset would be refused) stops the server naming max_kv_tokens."""
    env = {"TOKENWIRE_MAX_KV_TOKENS": "128", "TOKENWIRE_DEFAULT_MAX_TOKENS": "128"}
    with pytest.raises(SettingsError, match=r"max_kv_tokens: must be more than default_max"):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("env", "flags", "origin"),
    [
        ({}, {"tls_cert": Path("/etc/hostname")}, "--tls-cert"),
        ({"TOKENWIRE_TLS_CERT": "/etc/hostname"}, {}, "TOKENWIRE_TLS_CERT"),
    ],
)
def test_a_certificate_without_its_key_names_where_each_comes_from(
    env: dict[str, str], flags: dict[str, Path], origin: str
) -> None:
    """tls_cert alone is refused naming the certificate and where it was given (flag or
    variable), and the missing tls_key with its variable and flag."""
    expected = (
        "tls_cert: must be given with tls_key (TOKENWIRE_TLS_KEY, --tls-key), "
        f"got '/etc/hostname' (from {origin})"
    )
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(env, **flags)
    assert str(refused.value) == expected


def test_a_metrics_port_equal_to_the_grpc_port_is_refused_naming_both() -> None:
    """metrics_port the same (nonzero) port as port is refused at once, naming both settings,
    instead of failing later with the address in use."""
    env = {"TOKENWIRE_PORT": "7000", "TOKENWIRE_METRICS_PORT": "7000"}
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(env)
    assert str(refused.value) == (
        "metrics_port: must be 0 (off) or different from port (TOKENWIRE_PORT, --port), "
        "got 7000 (from TOKENWIRE_METRICS_PORT)"
    )
