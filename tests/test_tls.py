"""TLS and mTLS on the gRPC port: round trips with test-made certificates, plaintext refused."""

from __future__ import annotations

import http.client
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from tests.conftest import RunningServer, eventually_blocking, start_edge, start_server
from tests.pki import Pki, make_pki, make_weak_pair
from tests.sockets import closed_within
from tokenwire.client import AsyncTokenwireClient, ChannelSecurity, Completion, GenerateOptions
from tokenwire.client.errors import Unavailable
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.telemetry.metrics import MetricsTls, ServerMetrics, _MetricsServer
from tokenwire.server.tokenizer import Tokenizer

SHORT = GenerateOptions(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def tls_server(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer, pki: Pki
) -> AsyncIterator[RunningServer]:
    running = await start_server(
        onnx_model, tokenizer, tls_cert=pki.server_cert, tls_key=pki.server_key
    )
    yield running
    await running.server.drain()


@pytest.fixture
async def mtls_server(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer, pki: Pki
) -> AsyncIterator[RunningServer]:
    running = await start_server(
        onnx_model,
        tokenizer,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
    )
    yield running
    await running.server.drain()


async def _finish(target: str, security: ChannelSecurity) -> str:
    async with AsyncTokenwireClient(target, security=security, timeout_s=10) as client:
        events = [event async for event in client.generate("def f():", SHORT)]
    last = events[-1]
    assert isinstance(last, Completion)
    return last.finish_reason


async def test_tls_round_trip_with_the_test_ca(tls_server: RunningServer, pki: Pki) -> None:
    """A client trusting the test CA streams a completion over TLS."""
    assert await _finish(tls_server.target, ChannelSecurity(tls_ca=pki.ca)) == "length"


async def test_plaintext_client_is_refused_by_a_tls_server(tls_server: RunningServer) -> None:
    """A plaintext channel to the TLS port never gets a response: UNAVAILABLE."""
    with pytest.raises(Unavailable):
        await _finish(tls_server.target, ChannelSecurity())


async def test_client_not_trusting_the_server_ca_is_refused(tls_server: RunningServer) -> None:
    """With the system trust roots only, the test server's certificate is rejected."""
    with pytest.raises(Unavailable):
        await _finish(tls_server.target, ChannelSecurity(tls=True))


async def test_mtls_round_trip_with_a_client_certificate(
    mtls_server: RunningServer, pki: Pki
) -> None:
    """A client presenting a certificate from the configured client CA is served."""
    security = ChannelSecurity(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
    assert await _finish(mtls_server.target, security) == "length"


async def test_mtls_refuses_a_client_without_a_certificate(
    mtls_server: RunningServer, pki: Pki
) -> None:
    """Under mTLS, a TLS client that presents no certificate fails the handshake."""
    with pytest.raises(Unavailable):
        await _finish(mtls_server.target, ChannelSecurity(tls_ca=pki.ca))


async def test_mtls_refuses_a_certificate_from_another_ca(
    mtls_server: RunningServer, pki: Pki
) -> None:
    """Under mTLS, a client certificate signed by an untrusted CA fails the handshake."""
    security = ChannelSecurity(tls_ca=pki.ca, tls_cert=pki.stranger_cert, tls_key=pki.stranger_key)
    with pytest.raises(Unavailable):
        await _finish(mtls_server.target, security)


async def test_health_check_works_over_mtls(mtls_server: RunningServer, pki: Pki) -> None:
    """Health is served on the same TLS port (probes need the client certificate too)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    security = ChannelSecurity(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
    async with grpc.aio.secure_channel(mtls_server.target, security.credentials()) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_edge_reaches_a_tls_server_through_its_upstream_settings(
    tls_server: RunningServer, pki: Pki
) -> None:
    """An edge given the CA file (upstream_tls_ca) streams from a TLS-only server."""
    edge = await start_edge(tls_server.target, upstream_tls_ca=str(pki.ca))
    try:
        async with httpx.AsyncClient(timeout=20) as http:
            response = await http.post(
                f"http://127.0.0.1:{edge.edge.port}/v1/completions",
                json={"prompt": "def f():", "max_tokens": 3, "temperature": 0},
            )
    finally:
        await edge.edge.stop()
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


def _fetch_metrics(url: str, context: ssl.SSLContext | None) -> int:
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return int(response.status)


def test_metrics_port_over_tls_requires_a_client_certificate(pki: Pki) -> None:
    """With metrics TLS and a client CA, a scraper without a certificate is refused, one with
    a certificate from the CA gets the metrics."""
    port, _ = ServerMetrics().serve(
        "127.0.0.1", 0, MetricsTls(pki.server_cert, pki.server_key, pki.ca)
    )
    url = f"https://localhost:{port}/metrics"
    anonymous = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        _fetch_metrics(url, anonymous)
    scraper = ssl.create_default_context(cafile=str(pki.ca))
    scraper.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    assert _fetch_metrics(url, scraper) == 200


def test_an_idle_connection_does_not_hold_up_tls_scrapes(pki: Pki) -> None:
    """A peer that connects to the HTTPS metrics port and says nothing holds up no scrape:
    the handshake runs in the connection's own thread, not in the accepting loop."""
    port, _ = ServerMetrics().serve(
        "127.0.0.1", 0, MetricsTls(pki.server_cert, pki.server_key, pki.ca)
    )
    scraper = ssl.create_default_context(cafile=str(pki.ca))
    scraper.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    with (
        socket.create_connection(("127.0.0.1", port)),
        urllib.request.urlopen(
            f"https://localhost:{port}/metrics", timeout=3, context=scraper
        ) as response,
    ):
        assert response.status == 200


def _scrape_status(url: str, context: ssl.SSLContext) -> int | None:
    """The HTTP status of one scrape, None if the server closed the connection instead."""
    try:
        return _fetch_metrics(url, context)
    except (OSError, http.client.HTTPException):
        return None


def test_a_tls_peer_trickling_its_request_is_cut_when_its_connection_time_is_up(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TLS as in plaintext, a peer that completes its handshake, then sends its request a
    byte every 0.2 s, is disconnected once the connection's time (1 s here) is up: with two
    connections allowed, two such peers hold up a scrape no longer than that."""
    monkeypatch.setattr(_MetricsServer, "timeout_s", 1.0)
    monkeypatch.setattr(_MetricsServer, "max_connections", 2)
    port, _ = ServerMetrics().serve(
        "127.0.0.1", 0, MetricsTls(pki.server_cert, pki.server_key, pki.ca)
    )
    scraper = ssl.create_default_context(cafile=str(pki.ca))
    scraper.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    peers = [
        scraper.wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
        )
        for _ in range(2)
    ]
    try:
        with ThreadPoolExecutor(2) as pool:
            trickling = [pool.submit(closed_within, peer, 4.0, True) for peer in peers]
            # Scraped while the peers still trickle, were they not cut.
            time.sleep(2.0)
            statuses: list[int | None] = []
            url = f"https://localhost:{port}/metrics"
            answered = eventually_blocking(
                lambda: statuses.append(_scrape_status(url, scraper)) or 200 in statuses, 1.0
            )
            closed = [each.result() for each in trickling]
    finally:
        for peer in peers:
            peer.close()
    assert all(each is not None and each < 2.0 for each in closed), closed
    assert answered, statuses


def test_settings_refuse_a_certificate_without_its_key(pki: Pki) -> None:
    """tls_cert without tls_key is a settings error naming tls_key."""
    from tokenwire.server.config import Settings, SettingsError

    with pytest.raises(SettingsError, match="tls_key"):
        Settings.from_env({"TOKENWIRE_TLS_CERT": str(pki.server_cert)})


@pytest.mark.parametrize("broken", ["tls_cert", "tls_key", "tls_client_ca"])
def test_settings_refuse_a_file_that_is_not_pem(pki: Pki, tmp_path: Path, broken: str) -> None:
    """A certificate, key or CA file that does not parse is a settings error naming the
    setting (gRPC would only say it failed to bind the port)."""
    from tokenwire.server.config import Settings, SettingsError

    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    files = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    files[broken] = junk
    env = {f"TOKENWIRE_{name.upper()}": str(path) for name, path in files.items()}
    expected = "tls_client_ca" if broken == "tls_client_ca" else "tls_cert"
    with pytest.raises(SettingsError, match=expected):
        Settings.from_env(env)


def test_settings_refuse_a_key_too_weak_for_openssl(tmp_path: Path) -> None:
    """A 1024-bit RSA key is a settings error naming tls_cert that says the key is too weak
    and what is strong enough, instead of OpenSSL's bare 'ee key too small'."""
    from tokenwire.server.config import Settings, SettingsError

    cert, key = make_weak_pair(tmp_path)
    env = {"TOKENWIRE_TLS_CERT": str(cert), "TOKENWIRE_TLS_KEY": str(key)}
    with pytest.raises(SettingsError, match="tls_cert") as caught:
        Settings.from_env(env)
    assert "too weak" in str(caught.value)
    assert "2048" in str(caught.value)


def test_settings_refuse_a_missing_certificate_file(tmp_path: Path) -> None:
    """A TLS path that is not a file names the setting."""
    from tokenwire.server.config import Settings, SettingsError

    missing = str(tmp_path / "nope.pem")
    with pytest.raises(SettingsError, match="tls_cert: must be an existing file"):
        Settings.from_env({"TOKENWIRE_TLS_CERT": missing, "TOKENWIRE_TLS_KEY": missing})
