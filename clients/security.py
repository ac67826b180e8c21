"""How a client reaches a protected server: TLS (optionally with a client certificate) and a
bearer API key. One frozen object, used to build channels and per-call metadata."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grpc

from tokenwire.common.tls import tls_files_problem


class SecurityError(ValueError):
    """A TLS or key setting is inconsistent (e.g. a client certificate without its key)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelSecurity:
    """api_key is sent as `authorization: Bearer <key>`; TLS is used when tls is set or any
    certificate file is given. tls_ca overrides the system trust roots; tls_cert/tls_key are
    the client's own certificate for servers that require one (mTLS)."""

    api_key: str = dataclasses.field(default="", repr=False)
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityError("tls_cert and tls_key: give both or neither")
        if self.api_key and not all("!" <= c <= "~" for c in self.api_key):
            raise SecurityError("api_key: must be visible ASCII without spaces")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise SecurityError(f"{name}: {str(path)!r} is not a readable file")
        problem = tls_files_problem(self.tls_ca, self.tls_cert, self.tls_key)
        if problem is not None:
            raise SecurityError(f"tls_{problem[0]}: {problem[1]}")

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(p is not None for p in (self.tls_ca, self.tls_cert, self.tls_key))

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS channel credentials (read from the files now)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca),
            private_key=_read(self.tls_key),
            certificate_chain=_read(self.tls_cert),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


def aio_channel(
    target: str, security: ChannelSecurity, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    if security.uses_tls:
        return grpc.aio.secure_channel(target, security.credentials(), options=options)
    return grpc.aio.insecure_channel(target, options=options)


def sync_channel(
    target: str, security: ChannelSecurity, options: list[tuple[str, Any]]
) -> grpc.Channel:
    if security.uses_tls:
        return grpc.secure_channel(target, security.credentials(), options=options)
    return grpc.insecure_channel(target, options=options)
