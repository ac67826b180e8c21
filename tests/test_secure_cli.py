"""`tokenwire serve` and `tokenwire generate` wire TLS, mTLS and API keys from flags and
TOKENWIRE_* variables, end to end between two processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pki import Pki, make_pki
from tests.procs import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Keys from a file (flag) and the environment, TLS files from flags, mTLS from a variable."""
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("file-key\n")
    proc = ServerProcess(
        "--metrics-port",
        "0",
        "--api-keys-file",
        str(keys),
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        env={"TOKENWIRE_API_KEYS": "env-key", "TOKENWIRE_TLS_CLIENT_CA": str(pki.ca)},
    )
    try:
        proc.wait_for("server.started")
        yield proc
    finally:
        proc.close()


def _generate(target: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tokenwire.client.command", "generate", "def f():", *args]
    command += ["--target", target, "--max-tokens", "3", "--temperature", "0", "--timeout", "10"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False, env=clean | env
    )


def test_cli_flags_reach_a_tls_mtls_keyed_server(secure_server: ServerProcess, pki: Pki) -> None:
    """--tls-ca, --tls-cert, --tls-key and --api-key (a key from the server's file) stream."""
    done = _generate(
        secure_server.target,
        "--tls-ca",
        str(pki.ca),
        "--tls-cert",
        str(pki.client_cert),
        "--tls-key",
        str(pki.client_key),
        "--api-key",
        "file-key",
        env={},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_cli_variables_reach_a_tls_mtls_keyed_server(
    secure_server: ServerProcess, pki: Pki
) -> None:
    """TOKENWIRE_TLS_CA, _TLS_CLIENT_CERT, _TLS_CLIENT_KEY and _API_KEY (an env key) stream."""
    env = {
        "TOKENWIRE_TLS_CA": str(pki.ca),
        "TOKENWIRE_TLS_CLIENT_CERT": str(pki.client_cert),
        "TOKENWIRE_TLS_CLIENT_KEY": str(pki.client_key),
        "TOKENWIRE_API_KEY": "env-key",
    }
    done = _generate(secure_server.target, env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("key", "says"),
    [((), "the server requires an API key"), (("--api-key", "wrong"), "refused the API key")],
    ids=["none", "wrong"],
)
def test_cli_without_a_key_reports_unauthenticated(
    secure_server: ServerProcess, pki: Pki, key: tuple[str, ...], says: str
) -> None:
    """Over working mTLS but without a key (or with a wrong one), the CLI exits 1 with one
    `error:` line naming UNAUTHENTICATED and where a key is given: --api-key or
    TOKENWIRE_API_KEY."""
    done = _generate(
        secure_server.target,
        "--tls-ca",
        str(pki.ca),
        "--tls-cert",
        str(pki.client_cert),
        "--tls-key",
        str(pki.client_key),
        *key,
        env={},
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: UNAUTHENTICATED: ")
    assert says in done.stderr
    assert "--api-key or TOKENWIRE_API_KEY" in done.stderr
    assert done.stderr.count("\n") == 1


def test_cli_refuses_a_client_certificate_without_its_key(pki: Pki) -> None:
    """--tls-cert without --tls-key is a usage error (exit 2) naming both flags' settings."""
    done = _generate("127.0.0.1:1", "--tls-cert", str(pki.client_cert), env={})
    assert done.returncode == 2
    assert "tls_cert and tls_key" in done.stderr


def test_cli_refuses_a_ca_file_that_holds_no_certificate(tmp_path: Path) -> None:
    """--tls-ca naming a file that holds no certificate is a usage error (exit 2) naming
    tls_ca, before any call (not a handshake failure on the call)."""
    garbage = tmp_path / "ca.pem"
    garbage.write_text("hello\n")
    done = _generate("127.0.0.1:1", "--tls-ca", str(garbage), env={})
    assert done.returncode == 2
    assert "tls_ca:" in done.stderr
    assert "holds no CA certificate" in done.stderr
