"""Run the edge under uvicorn; `tokenwire edge` calls run_edge."""

from __future__ import annotations

import asyncio
import socket

import structlog
import uvicorn

from clients.edge.app import create_app
from clients.edge.settings import EdgeSettings

log = structlog.get_logger("tokenwire.edge")


class EdgeServer:
    """A uvicorn server for the edge app; start() returns once it listens."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            lifespan="on",
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.port = settings.port
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        # proto=IPPROTO_TCP matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets that
        # say so, and an SSE event held back by Nagle waits for a delayed ACK (~40 ms).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.settings.host, self.settings.port))
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                await self._task
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task


async def run_edge(settings: EdgeSettings) -> None:
    edge = EdgeServer(settings)
    port = await edge.start()
    log.info(
        "edge.listening", url=f"http://{settings.host}:{port}/", grpc_target=settings.grpc_target
    )
    assert edge._task is not None
    await edge._task
    log.info("edge.stopped")
