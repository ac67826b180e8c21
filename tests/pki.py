"""Certificates made in the test run with trustme: a CA, a server cert, a client cert."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trustme


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    """A client certificate from a CA the server does not trust."""
    stranger_key: Path


def _write(leaf: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def make_pki(directory: Path) -> Pki:
    ca, other_ca = trustme.CA(), trustme.CA()
    ca_path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    server = _write(ca.issue_cert("localhost", "127.0.0.1"), directory, "server")
    client = _write(ca.issue_cert("client.tokenwire.test"), directory, "client")
    stranger = _write(other_ca.issue_cert("stranger.tokenwire.test"), directory, "stranger")
    return Pki(ca_path, *server, *client, *stranger)
