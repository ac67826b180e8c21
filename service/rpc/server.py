"""The grpc.aio server: GenerationService, health, reflection, and an ordered drain."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenwire.common.settings import host_port
from tokenwire.server.config import Settings, all_api_keys
from tokenwire.server.domain import FinishReason
from tokenwire.server.engine import Engine, EngineObserver, NullObserver
from tokenwire.server.rpc import handlers
from tokenwire.server.rpc.auth import ApiKeyInterceptor, ApiKeys
from tokenwire.server.rpc.servicer import EngineSlot, GenerationServicer
from tokenwire.server.telemetry.tracing import Tracing
from tokenwire.v1 import generate_pb2 as pb

log = structlog.get_logger("tokenwire.server")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
GENERATE_METHOD = f"/{SERVICE_NAME}/Generate"
LOGGED_WHEN_REFUSED = frozenset(
    f"/{SERVICE_NAME}/{name}" for name in ("Generate", "Tokenize", "Detokenize")
)
"""Methods whose calls log every refusal, the key check's included: each logs one line a call."""
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""gRPC's own limit on a received message, kept unless max_prompt_bytes needs more."""
MESSAGE_ROOM_BYTES = 1024 * 1024
"""Room beside a prompt of max_prompt_bytes for a request's other fields (continuation ids,
stop strings, logit bias; prompt_ids come instead of a prompt)."""
QUIET_S = 0.05
QUIET_LIMIT_S = 1.0


def max_message_bytes(settings: Settings) -> int:
    """The largest request gRPC takes: 4 MiB, or a prompt of max_prompt_bytes with room for the
    rest where that is more. Without it a prompt limit above 4 MiB could never apply: gRPC
    would refuse the message first, with RESOURCE_EXHAUSTED naming no field."""
    return max(MAX_MESSAGE_BYTES, settings.max_prompt_bytes + MESSAGE_ROOM_BYTES)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes(settings)),
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_s > 0:
        # Long-lived HTTP/2 connections pin clients to one replica; ageing them out makes
        # clients re-resolve and spread again. The grace lets in-flight streams finish.
        age_ms = int(settings.max_connection_age_s * 1000)
        grace_ms = int((settings.drain_grace_s + 5) * 1000)
        options += [
            ("grpc.max_connection_age_ms", age_ms),
            ("grpc.max_connection_age_grace_ms", grace_ms),
        ]
    return options


@dataclasses.dataclass
class TokenwireServer:
    """Owns the grpc server and the health state; the engine is attached once it is warm."""

    settings: Settings
    server: grpc.aio.Server = dataclasses.field(init=False)
    health: health.aio.HealthServicer = dataclasses.field(init=False)
    servicer: GenerationServicer = dataclasses.field(init=False)
    slot: EngineSlot = dataclasses.field(default_factory=EngineSlot)
    port: int = 0
    observer: EngineObserver = dataclasses.field(default_factory=NullObserver)
    """Hears of Generate calls refused before they reach the engine (the engine's own
    observer counts the rest), so every rejection is counted once."""
    tracing: Tracing = dataclasses.field(default_factory=lambda: Tracing.from_endpoint(""))
    """Where Generate spans go; by default nowhere (they still get ids for the logs)."""
    hurry: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    """Set (a second signal) to cut a drain short: its notice and its grace end at once, and
    streams still running end CANCELLED."""

    async def start(self) -> int:
        """Bind and start serving with health NOT_SERVING; return the bound port."""
        keys = ApiKeys(all_api_keys(self.settings))
        interceptors = (ApiKeyInterceptor(keys, self._refused),) if keys.enabled else ()
        self.server = grpc.aio.server(
            options=server_options(self.settings), interceptors=interceptors
        )
        self.servicer = GenerationServicer(
            self.slot,
            keys=keys,
            log_content=self.settings.log_content,
            observer=self.observer,
            tracing=self.tracing,
        )
        handlers.register(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = host_port(self.settings.host, self.settings.port)
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        return self.port

    def _refused(self, method: str) -> None:
        """A call the key check refused: a Generate counts as a rejected request; it, a
        Tokenize and a Detokenize log one request.rejected line as their other refusals do
        (never the key it brought)."""
        if method == GENERATE_METHOD:
            self.observer.request_rejected("Unauthenticated")
        if method in LOGGED_WHEN_REFUSED:
            log.info(
                "request.rejected", code="Unauthenticated", reason="no valid API key was given"
            )

    async def attach(self, engine: Engine) -> None:
        """The engine is warm: accept requests and report SERVING."""
        engine.start()
        self.slot.engine = engine
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def drain(self) -> None:
        """NOT_SERVING, refuse new work, let streams finish within the grace, then stop."""
        settings = self.settings
        await self.health.enter_graceful_shutdown()
        engine = self.slot.engine
        if engine is not None:
            engine.stop_accepting()
        log.info("server.draining", grace_s=settings.drain_grace_s, active=_active(engine))
        if settings.drain_notice_s:
            await self._unless_hurried(asyncio.sleep(settings.drain_notice_s, True))
        # The server keeps answering while streams finish: new requests get an explicit
        # UNAVAILABLE (which clients retry elsewhere) rather than a transport-level cancel.
        idle = engine is None or await self._unless_hurried(
            engine.wait_idle(settings.drain_grace_s)
        )
        if self.hurry.is_set():  # a second signal: the notice or the grace ended at once
            log.info("server.drain_cut_short", cancelled=_active(engine))
        elif not idle:
            log.warning("server.drain_timeout", cancelled=_active(engine))
        if engine is not None and not idle:
            engine.cancel_all(FinishReason.CANCELLED)
            await engine.wait_idle(2.0)
        await self._quiet_moment()
        await self.server.stop(grace=1.0)
        self.servicer.tokens.shutdown()
        if engine is not None:
            engine.shutdown()
        log.info("server.stopped")

    async def close(self, reason: str) -> None:
        """Stop a server that never served (its start failed, or a signal came while the model
        loaded): the port closes at once, with no notice and no drain, as nothing reached an
        engine. The log line says why."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=None)
        self.servicer.tokens.shutdown()
        log.info("server.stopped", reason=reason)

    async def _unless_hurried(self, wait: Awaitable[bool]) -> bool:
        """What `wait` returns, or False as soon as `hurry` is set (`wait` is cancelled)."""
        waiting = asyncio.ensure_future(wait)
        hurried = asyncio.ensure_future(self.hurry.wait())
        try:
            await asyncio.wait({waiting, hurried}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            hurried.cancel()
        return waiting.done() and not waiting.cancelled() and waiting.result()

    async def _quiet_moment(self) -> None:
        """Wait (briefly) until no Generate call has arrived for QUIET_S.

        Once grpc's stop begins, a call that reaches the server before the client has seen
        its GOAWAY is cancelled by grpc core (CANCELLED, which clients do not retry). Calls
        until now got UNAVAILABLE; stopping in a lull shrinks that window for clients that
        pace their retries. See docs/security.md (drain) for what remains.
        """
        limit = time.monotonic() + QUIET_LIMIT_S
        while time.monotonic() < limit:
            idle = time.monotonic() - self.servicer.last_arrival
            if idle >= QUIET_S:
                return
            await asyncio.sleep(QUIET_S - idle)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from tls_cert/tls_key; with tls_client_ca, clients must present a certificate."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _active(engine: Engine | None) -> int:
    return 0 if engine is None else engine.active_count
