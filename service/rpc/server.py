"""The grpc.aio server: GenerationService, health, reflection, and an ordered drain."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

from service.config import Settings
from service.domain import FinishReason
from service.engine import Engine
from service.rpc.servicer import EngineSlot, GenerationServicer

log = structlog.get_logger("tokenwire.server")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def server_options(settings: Settings) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
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
    slot: EngineSlot = dataclasses.field(default_factory=EngineSlot)
    port: int = 0

    async def start(self) -> int:
        """Bind and start serving with health NOT_SERVING; return the bound port."""
        self.server = grpc.aio.server(options=server_options(self.settings))
        pb_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(self.slot, log_content=self.settings.log_content), self.server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        return self.port

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
            await asyncio.sleep(settings.drain_notice_s)
        # The server keeps answering while streams finish: new requests get an explicit
        # UNAVAILABLE (which clients retry elsewhere) rather than a transport-level cancel.
        if engine is not None and not await engine.wait_idle(settings.drain_grace_s):
            log.warning("server.drain_timeout", cancelled=engine.active_count)
            engine.cancel_all(FinishReason.CANCELLED)
            await engine.wait_idle(2.0)
        await self.server.stop(grace=1.0)
        if engine is not None:
            engine.shutdown()
        log.info("server.stopped")


def _active(engine: Engine | None) -> int:
    return 0 if engine is None else engine.active_count
