"""Checks of TLS files that exist but may not load, made at start so that the message names the
setting: gRPC would only log that a handshake failed, on every call."""

from __future__ import annotations

import ssl
from pathlib import Path

Problem = tuple[str, str]
"""(which file: "ca" or "cert", why it cannot be used)."""


def tls_files_problem(
    ca: Path | str | None,
    cert: Path | str | None,
    key: Path | str | None,
    key_setting: str = "tls_key",
) -> Problem | None:
    """Why these files cannot be used, or None: a CA file that holds no certificate; a
    certificate and key that do not parse, do not match, a key encrypted with a passphrase
    (never asked for on a terminal: the service reads its key unattended), or a key too weak
    for OpenSSL's default security level (RSA below 2048 bits). The message names the key by
    `key_setting` and its path."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca:
        try:
            context.load_verify_locations(ca)
        except (ssl.SSLError, ValueError, OSError) as exc:
            return "ca", f"{str(ca)!r} holds no CA certificate: {exc}"
    if cert and key:
        try:
            context.load_cert_chain(cert, key, password=b"")
        except (ssl.SSLError, ValueError, OSError) as exc:
            why = str(exc)
            if _encrypted(key):
                why = "the key is encrypted with a passphrase"
            elif "KEY_TOO_SMALL" in why:
                why = f"the key is too weak (RSA needs 2048 bits or more, or use an EC key): {exc}"
            return "cert", f"{str(cert)!r} with {key_setting} {str(key)!r} cannot be used: {why}"
    return None


def _encrypted(key: Path | str) -> bool:
    try:
        head = Path(key).read_bytes()[:4096]
    except OSError:
        return False
    return b"ENCRYPTED" in head
