"""An IPv6 host (`--host ::1`) is written in brackets wherever it meets a port: the address the
server binds, the addresses and URLs the processes log and `tokenwire up` prints."""

from __future__ import annotations

import socket
from typing import Any

import grpc
import pytest

from tokenwire.common.settings import host_family, host_port
from tokenwire.server.config import Settings
from tokenwire.server.rpc.server import TokenwireServer
from tokenwire.server.up import banner


def test_an_ipv6_host_and_a_port_make_a_bracketed_address() -> None:
    """host_port puts an IPv6 literal in brackets and leaves names and IPv4 addresses bare."""
    assert host_port("::1", 50051) == "[::1]:50051"
    assert host_port("::", 8000) == "[::]:8000"
    assert host_port("127.0.0.1", 50051) == "127.0.0.1:50051"
    assert host_port("tokenwire.internal", 50051) == "tokenwire.internal:50051"


def test_an_ipv6_host_listens_with_the_ipv6_family() -> None:
    """The edge, the server's port check and `up` open an IPv6 socket for an IPv6 literal (an
    IPv4 socket cannot bind `::1`) and an IPv4 one for anything else."""
    assert host_family("::1") == socket.AF_INET6
    assert host_family("127.0.0.1") == socket.AF_INET
    assert host_family("localhost") == socket.AF_INET


async def test_the_server_binds_an_ipv6_host_as_a_bracketed_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`serve --host ::1` asks gRPC for `[::1]:PORT` (`::1:PORT` failed with a garbled gRPC
    error); the port here is bound on 127.0.0.1, where the address is only recorded."""
    asked: list[str] = []
    made = grpc.aio.server

    def recording(*args: Any, **kwargs: Any) -> grpc.aio.Server:
        server = made(*args, **kwargs)
        bind = server.add_insecure_port

        def add_insecure_port(address: str) -> int:
            asked.append(address)
            return bind("127.0.0.1:0")

        server.add_insecure_port = add_insecure_port  # type: ignore[method-assign]
        return server

    monkeypatch.setattr(grpc.aio, "server", recording)
    server = TokenwireServer(Settings(host="::1", port=0))
    await server.start()
    await server.server.stop(None)
    assert asked == ["[::1]:0"]


def test_up_prints_ipv6_addresses_in_brackets() -> None:
    """`tokenwire up --host ::1` prints URLs and gRPC targets that name the host in brackets,
    which browsers, curl, grpcurl and `--target` can use."""
    text = banner("::1", 50051, 8000, 9464)
    assert "browser:  http://[::1]:8000/" in text
    assert "}' [::1]:50051 tokenwire.v1.GenerationService/Generate" in text
    assert "--target [::1]:50051 --stats" in text
    assert "metrics:  http://[::1]:9464/metrics (server), http://[::1]:8000/metrics (edge)" in text
    assert "::1:" not in text.replace("[::1]:", "")
