"""The edge's settings for reaching its server (key, TLS files) are refused by the names the
user set them by: the setting, and the variable or flag it came from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.pki import make_pki

pytestmark = pytest.mark.compute


def _edge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwire.client.command", "edge", "--port", "0", *args],
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_upstream_ca_that_is_no_file_names_its_variable() -> None:
    """TOKENWIRE_UPSTREAM_TLS_CA naming no file stops the edge (status 2) with one line naming
    upstream_tls_ca and the variable, not the channel's `tls_ca`."""
    done = _edge(env={"TOKENWIRE_UPSTREAM_TLS_CA": "/no/such/ca.pem"})
    assert done.returncode == 2
    assert done.stderr == (
        "tokenwire edge: upstream_tls_ca: must be an existing file, got '/no/such/ca.pem' "
        "(from TOKENWIRE_UPSTREAM_TLS_CA)\n"
    )


def test_an_upstream_client_certificate_without_its_key_names_both_settings(
    tmp_path: Path,
) -> None:
    """`--upstream-tls-cert` without a key stops the edge naming the flag given and the
    variable and flag of the key it needs, not `tls_cert and tls_key`."""
    cert = tmp_path / "client.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    done = _edge("--upstream-tls-cert", str(cert))
    assert done.returncode == 2
    assert done.stderr.startswith(
        "tokenwire edge: upstream_tls_cert: must be given with upstream_tls_key "
        "(TOKENWIRE_UPSTREAM_TLS_KEY, --upstream-tls-key)"
    )
    assert done.stderr.endswith("(from --upstream-tls-cert)\n")


def test_an_upstream_key_metadata_cannot_carry_names_its_variable_not_the_key() -> None:
    """TOKENWIRE_UPSTREAM_API_KEY with a space stops the edge naming upstream_api_key and the
    variable, never repeating the key."""
    done = _edge(env={"TOKENWIRE_UPSTREAM_API_KEY": "secret with spaces"})
    assert done.returncode == 2
    assert "upstream_api_key: must be visible ASCII without spaces" in done.stderr
    assert "(from TOKENWIRE_UPSTREAM_API_KEY)" in done.stderr
    assert "secret" not in done.stderr


def test_an_upstream_ca_that_holds_no_certificate_stops_the_edge(tmp_path: Path) -> None:
    """An upstream CA file that holds no certificate stops the edge at start (status 2)
    naming upstream_tls_ca, instead of an edge whose every call fails its handshake."""
    garbage = tmp_path / "ca.pem"
    garbage.write_text("hello\n")
    done = _edge("--upstream-tls-ca", str(garbage))
    assert done.returncode == 2
    assert done.stderr.startswith("tokenwire edge: upstream_tls_ca: ")
    assert "holds no CA certificate" in done.stderr


def test_an_upstream_certificate_with_another_key_stops_the_edge(tmp_path: Path) -> None:
    """An upstream client certificate with a key that is not its own stops the edge at start
    (status 2) naming upstream_tls_cert and upstream_tls_key."""
    pki = make_pki(tmp_path)
    done = _edge(
        "--upstream-tls-cert", str(pki.client_cert), "--upstream-tls-key", str(pki.stranger_key)
    )
    assert done.returncode == 2
    assert done.stderr.startswith("tokenwire edge: upstream_tls_cert: ")
    assert "with upstream_tls_key" in done.stderr
    assert "cannot be used" in done.stderr


@pytest.mark.parametrize(
    ("url", "option"),
    [
        ("redis://user:secret@127.0.0.1:6379/0?socket_timeout=abc", "socket_timeout"),
        ("redis://user:secret@127.0.0.1:6379/0?bogus=1", "bogus"),
    ],
    ids=["unreadable", "unknown"],
)
def test_resume_store_options_redis_cannot_take_stop_the_edge_without_the_url(
    url: str, option: str
) -> None:
    """A Redis URL whose query option redis-py cannot read or does not take stops the edge
    at start (status 2) naming resume_store and the option, never the URL's credentials."""
    done = _edge("--resume-store", url)
    assert done.returncode == 2
    assert done.stderr.startswith("tokenwire edge: resume_store: its options do not work")
    assert option in done.stderr
    assert "secret" not in done.stderr


def test_an_encrypted_upstream_key_stops_the_edge_saying_so(tmp_path: Path) -> None:
    """An upstream client key encrypted with a passphrase stops the edge at start (status 2)
    naming upstream_tls_cert and saying the key is encrypted, never asking for a passphrase
    (stdin is a terminal-less pipe here; on a terminal it would prompt)."""
    pki = make_pki(tmp_path)
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    done = _edge("--upstream-tls-cert", str(pki.client_cert), "--upstream-tls-key", str(encrypted))
    assert done.returncode == 2
    assert done.stderr.startswith("tokenwire edge: upstream_tls_cert: ")
    assert "the key is encrypted with a passphrase" in done.stderr
