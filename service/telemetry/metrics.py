"""Prometheus metrics: the only module that imports prometheus_client.

Names follow Prometheus conventions and line up with vLLM's and the OpenTelemetry GenAI
conventions (see docs/observability.md). Labels are bounded: no request ids, no prompts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl
import sys
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from tokenwire.common.buckets import TTFT_BUCKETS
from tokenwire.server.engine.observer import RequestRecord, StepRecord

log = structlog.get_logger("tokenwire.metrics")

# From 0.1 ms: a small model can decode a token in less than a millisecond.
ITL_BUCKETS = (
    *(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03),
    *(0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5),
)
# Never below TTFT_BUCKETS' top: a request lasts at least until its first token.
DURATION_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    *(5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0),
)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024)
FINISH_REASONS = (
    "stop",
    "length",
    "stop_sequence",
    "cancelled",
    "deadline_exceeded",
    "error",
    "rejected",
)


class ServerMetrics:
    """Engine observer that exports to a registry of its own (one per server instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "tokenwire_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tokenwire_inter_token_latency_seconds",
            "Time between consecutive tokens of a stream.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "tokenwire_request_duration_seconds",
            "End-to-end time from arrival to the end of generation.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "tokenwire_request_queue_seconds",
            "Time from arrival until prefill starts.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.step = Histogram(
            "tokenwire_decode_step_seconds",
            "Duration of one scheduler step (prefill + batched decode).",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "tokenwire_requests",
            "Finished or rejected requests by outcome.",
            ["finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tokenwire_prompt_tokens", "Prompt tokens processed.", registry=r
        )
        self.generation_tokens = Counter(
            "tokenwire_generation_tokens", "Tokens generated.", registry=r
        )
        self.running = Gauge(
            "tokenwire_requests_running", "Requests prefilling or decoding.", registry=r
        )
        self.waiting = Gauge(
            "tokenwire_requests_waiting", "Requests queued for a batch slot.", registry=r
        )
        self.batch_size = Gauge("tokenwire_batch_size", "Rows in the last decode step.", registry=r)
        self.kv_cache_usage = Gauge(
            "tokenwire_kv_cache_usage_ratio",
            "Share of the KV cache in use: of its token budget (max_kv_tokens) reserved by "
            "running requests, or, for a preallocated cache, of its rows taken (each holds a "
            "whole request).",
            registry=r,
        )
        self.build_info = Gauge(
            "tokenwire_build_info",
            "Version, model and provider (value 1).",
            ["version", "model", "provider"],
            registry=r,
        )
        for reason in FINISH_REASONS:
            self.requests.labels(finish_reason=reason)

    def describe_build(self, version: str, model: str, provider: str) -> None:
        self.build_info.labels(version=version, model=model, provider=provider).set(1)

    def request_finished(self, record: RequestRecord) -> None:
        self.requests.labels(finish_reason=record.outcome).inc()
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generation_tokens.inc(record.completion_tokens)
        if record.queue_time is not None:
            self.queue.observe(record.queue_time)
        self.duration.observe(record.finished_at - record.arrived_at)
        ttft = record.time_to_first_token
        if ttft is not None:
            self.ttft.observe(ttft)
        for gap in record.inter_token_latencies:
            self.itl.observe(gap)

    def request_rejected(self, reason: str) -> None:
        self.requests.labels(finish_reason="rejected").inc()

    def step_finished(self, record: StepRecord) -> None:
        if record.stepped:
            self.step.observe(record.duration)
        self.batch_size.set(record.batch_size)
        self.running.set(record.running)
        self.waiting.set(record.waiting)
        self.kv_cache_usage.set(record.kv_usage)

    def serve(
        self, host: str, port: int, tls: MetricsTls | None = None
    ) -> tuple[int, threading.Thread]:
        """Expose /metrics on its own port (HTTPS with tls); return the port and server thread.

        Each connection has its own thread, in which the TLS handshake runs (with a time
        limit): a peer that connects and says nothing holds up its own thread only, not the
        accepting loop and every scrape behind it."""
        server = _MetricsServer(host, port, None if tls is None else tls.context())
        server.set_app(make_wsgi_app(self.registry))
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        return int(server.server_port), thread


class _QuietHandler(WSGIRequestHandler):
    """No access log lines on stderr (scrapes every few seconds would flood it)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most `max_connections` at once; with `context`, TLS is
    negotiated in that thread. A connection is closed `timeout_s` after it was accepted,
    whatever it is doing: a peer that trickles its request a byte at a time holds its thread
    no longer than one that says nothing."""

    daemon_threads = True
    timeout_s = 10.0
    """How long a connection may stay open: TLS handshake, request and answer."""
    max_connections = 64
    """Connections served at once; more are closed as they are accepted."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None) -> None:
        # The family of the address asked for (an IPv6 host needs AF_INET6), before binding.
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.context = context
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__((host, port), _QuietHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # every slot is taken: this connection waits not
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        deadline = _Deadline(request, self.timeout_s)
        try:
            request.settimeout(self.timeout_s)
            if self.context is not None:
                try:
                    # The TLS socket takes the connection over from the accepted one, which
                    # then holds nothing: the deadline follows it, from before the handshake.
                    request = self.context.wrap_socket(
                        request, server_side=True, do_handshake_on_connect=False
                    )
                    deadline.follow(request)
                    request.do_handshake()
                except (OSError, ssl.SSLError):
                    return  # a failed or abandoned handshake ends this connection only
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
        finally:
            deadline.stop()  # before the socket is closed, and its number free for another
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line for a connection that failed (timed out, cut, reset), no traceback."""
        error = sys.exc_info()[1]
        log.info("metrics.connection_failed", error=f"{type(error).__name__}: {error}")


class _Deadline:
    """Shuts a connection's socket down `timeout_s` from now, which ends any read or write in
    progress on it: the socket the connection uses by then (`follow`), never one closed
    before (`stop`, before closing it)."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self._sock: socket.socket | None = sock
        self._passed = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout_s, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def follow(self, sock: socket.socket) -> None:
        """Shut `sock` down at the deadline instead (at once, if it has passed)."""
        with self._lock:
            self._sock = sock
            if self._passed:
                _shut(sock)

    def stop(self) -> None:
        """No shutdown from now on (the socket may then be closed)."""
        self._timer.cancel()
        with self._lock:
            self._sock = None

    def _cut(self) -> None:
        with self._lock:
            self._passed = True
            if self._sock is not None:
                _shut(self._sock)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for a TLS one: the TLS socket's own would drop its TLS
    # state, which the connection's thread may be reading or writing through.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsTls:
    """Certificate files for an HTTPS /metrics port; with client_ca, scrapers need a cert."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context
