"""Replicas for failover tests: gRPC servers in front of a real one. A slow replica's Tokenize
and Cancel answers take a chosen time, then come from the real server or end UNAVAILABLE (a
replica going away); its model info is the real server's, answered at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc


class Relay(pb_grpc.GenerationServiceServicer):
    """A gRPC server on loopback in front of a real one (`_stub` calls it); subclasses answer
    the methods they relay."""

    def __init__(self, target: str) -> None:
        self._channels: list[grpc.aio.Channel] = []
        self._stub = self._stub_of(target)
        self._server = grpc.aio.server()
        pb_grpc.add_GenerationServiceServicer_to_server(self, self._server)
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def _stub_of(self, target: str) -> pb_grpc.GenerationServiceStub:
        """A stub on a channel of its own to `target`, closed by stop()."""
        channel = grpc.aio.insecure_channel(target)
        self._channels.append(channel)
        return pb_grpc.GenerationServiceStub(channel)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop(0)
        for channel in self._channels:
            await channel.close()


class GoneReplica(Relay):
    """Every Tokenize and GetModelInfo ends UNAVAILABLE at once (a replica going away),
    counted in `asked`."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.asked = 0

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TokenizeResponse:
        self.asked += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelInfoResponse:
        self.asked += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")


class SlowReplica(Relay):
    """Tokenize and Cancel take `delay_s`, then end UNAVAILABLE (with `gives_up`) or relay
    the real server's answer."""

    def __init__(self, target: str, delay_s: float, *, gives_up: bool) -> None:
        super().__init__(target)
        self._delay_s = delay_s
        self._gives_up = gives_up

    async def _wait(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await asyncio.sleep(self._delay_s)
        if self._gives_up:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TokenizeResponse:
        await self._wait(context)
        return await self._stub.Tokenize(request)

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CancelResponse:
        await self._wait(context)
        return await self._stub.Cancel(request)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelInfoResponse:
        return await self._stub.GetModelInfo(request)


class SlowOpening(Relay):
    """A replica whose Generate answers (its initial metadata) only after `delay_s`, as a
    server tokenizing a long prompt does (only for the requests `slow` picks, where given);
    the rest it relays at once."""

    def __init__(
        self,
        target: str,
        delay_s: float,
        slow: Callable[[pb.GenerateRequest], bool] | None = None,
    ) -> None:
        super().__init__(target)
        self._delay_s = delay_s
        self._slow = slow
        self.started = 0
        """Generate calls begun."""
        self.left_early = 0
        """Generate calls their caller cancelled before the answer (none of them reached the
        real server)."""

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.started += 1
        try:
            if self._slow is None or self._slow(request):
                await asyncio.sleep(self._delay_s)
        except asyncio.CancelledError:
            self.left_early += 1
            raise
        call = self._stub.Generate(request)
        await context.send_initial_metadata(tuple(await call.initial_metadata()))
        async for reply in call:
            yield reply

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CancelResponse:
        return await self._stub.Cancel(request)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelInfoResponse:
        return await self._stub.GetModelInfo(request)
