"""The edge's gRPC side: open a Generate stream and know, before answering HTTP, whether the
server accepted it (bad input must become a 400, not an in-band error)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenwire.client.client import (
    CHANNEL_OPTIONS,
    ModelInfo,
    StreamEvent,
    Token,
    event_from_pb,
    model_info_from_pb,
)
from tokenwire.client.errors import from_rpc_error, from_status
from tokenwire.client.failover import MAX_FAILOVERS, RETRYABLE, continued, split_targets
from tokenwire.client.security import ChannelSecurity, aio_channel
from tokenwire.edge.errors import EdgeError, edge_error
from tokenwire.edge.settings import EdgeSettings
from tokenwire.edge.tracing import upstream_metadata
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

GenerateCall = grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse]


class UpstreamStream:
    """An accepted Generate call: iterate its events; cancel() ends it at the server.

    If the call breaks with UNAVAILABLE (its server died or went away), the stream continues
    on the next target with the token ids already received (see tokenwire.client.failover):
    the events go on from the next index as if nothing had happened."""

    def __init__(
        self,
        call: GenerateCall,
        request_id: str,
        on_end: Callable[[UpstreamStream], None],
        *,
        reopen: Callable[[pb.GenerateRequest], Awaitable[GenerateCall]] | None = None,
        request: pb.GenerateRequest | None = None,
        seed: int | None = None,
    ) -> None:
        self._call = call
        self.request_id = request_id
        self._on_end = on_end
        self._reopen = reopen
        self._request = request
        self._seed = seed
        self._delivered: list[int] = []
        self._failovers = 0

    @property
    def request(self) -> pb.GenerateRequest | None:
        """The accepted request (with the id the server took), before any continuation."""
        return self._request

    @property
    def seed(self) -> int | None:
        """The sampling seed the server announced (`x-tokenwire-seed`)."""
        return self._seed

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The generation's events; EdgeError when the call fails where it cannot continue."""
        try:
            while True:
                try:
                    while (message := await self._call.read()) is not grpc.aio.EOF:
                        assert isinstance(message, pb.GenerateResponse)
                        event = event_from_pb(message)
                        if isinstance(event, Token):
                            self._delivered.append(event.id)
                        yield event
                    return
                except grpc.RpcError as error:
                    if not await self._continue(error):
                        raise edge_error(from_rpc_error(error)) from None
        finally:
            self._on_end(self)

    async def _continue(self, error: grpc.RpcError) -> bool:
        """Reopen the call elsewhere after a retryable break; False when it cannot."""
        code: grpc.StatusCode = error.code()
        if self._reopen is None or self._request is None or code not in RETRYABLE:
            return False
        if self._failovers >= MAX_FAILOVERS:
            return False
        self._failovers += 1
        request = continued(self._request, self._delivered, self._seed)
        self._call = await self._reopen(request)
        return True

    def cancel(self) -> None:
        self._call.cancel()
        self._on_end(self)


class Upstream:
    """Channels to the server: one per target of a comma-separated list (streams fail over
    across them), or one to every replica with a dns:/// target."""

    def __init__(
        self, target: str, timeout_s: float = 600.0, security: ChannelSecurity | None = None
    ) -> None:
        self._security = security or ChannelSecurity()
        self._metadata = self._security.metadata()
        self._channels = [
            aio_channel(t, self._security, CHANNEL_OPTIONS) for t in split_targets(target)
        ]
        self._stubs = [pb_grpc.GenerationServiceStub(c) for c in self._channels]
        self._healths = [health_pb2_grpc.HealthStub(c) for c in self._channels]
        self._next = 0
        self._timeout_s = timeout_s
        self._info: ModelInfo | None = None
        self._ready_at = 0.0
        self._open: set[UpstreamStream] = set()

    @classmethod
    def from_settings(cls, settings: EdgeSettings) -> Upstream:
        """The upstream channel the edge's settings describe (key, TLS files)."""
        return cls(settings.grpc_target, settings.upstream_timeout_s, upstream_security(settings))

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def connect(self, limit_s: float) -> bool:
        """Open the connection early so the first request does not pay for it."""
        try:
            await asyncio.wait_for(self._channels[self._next].channel_ready(), limit_s)
        except TimeoutError:
            return False
        return True

    def _call(self, request: pb.GenerateRequest, request_id: str) -> GenerateCall:
        return self._stubs[self._next].Generate(
            request,
            timeout=self._timeout_s,
            # The traceparent of the edge request's span: the server continues its trace.
            metadata=(("x-request-id", request_id), *self._metadata, *upstream_metadata()),
        )

    async def _reopen(self, request: pb.GenerateRequest) -> GenerateCall:
        """The continuation of a broken stream, on the next target."""
        self._next = (self._next + 1) % len(self._stubs)
        return self._call(request, request.request_id)

    async def open(self, request: pb.GenerateRequest, request_id: str) -> UpstreamStream:
        """Start a stream; raise EdgeError when the server refuses it."""
        call = self._call(request, request_id)
        try:
            header = dict(await call.initial_metadata())
        except grpc.RpcError as error:
            raise edge_error(from_rpc_error(error)) from None
        except asyncio.CancelledError:
            call.cancel()  # the HTTP client left before the server answered
            raise
        if "x-request-id" not in header:
            # A refusal is trailers-only: no header, only a status with its details.
            raise await _refusal(call)
        accepted_id = str(header.get("x-request-id", request_id))
        seed = header.get("x-tokenwire-seed")
        again = pb.GenerateRequest()
        again.CopyFrom(request)
        again.request_id = accepted_id
        stream = UpstreamStream(
            call,
            accepted_id,
            self._ended,
            reopen=self._reopen,
            request=again,
            seed=int(str(seed)) if seed is not None else None,
        )
        self._open.add(stream)
        return stream

    def _ended(self, stream: UpstreamStream) -> None:
        self._open.discard(stream)

    def cancel_all(self) -> None:
        """Cancel every Generate call still open (the end of a drain's grace)."""
        for stream in list(self._open):
            stream.cancel()

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            try:
                reply = await self._stubs[self._next].GetModelInfo(
                    pb.GetModelInfoRequest(), timeout=10, metadata=self._metadata
                )
            except grpc.RpcError as error:
                raise edge_error(from_rpc_error(error)) from None
            self._info = model_info_from_pb(reply)
        return self._info

    async def ready(self) -> bool:
        """True when the server reports SERVING (cached for half a second)."""
        if time.monotonic() - self._ready_at < 0.5:
            return True
        try:
            reply = await self._healths[self._next].Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError:
            return False
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            self._ready_at = time.monotonic()
            return True
        return False

    async def cancel(self, request_id: str) -> bool:
        """Cancel on every target (a stream may have moved); True if any had it."""
        found = False
        for stub in self._stubs:
            try:
                reply = await stub.Cancel(
                    pb.CancelRequest(request_id=request_id), timeout=10, metadata=self._metadata
                )
            except grpc.RpcError as error:
                if len(self._stubs) == 1:
                    raise edge_error(from_rpc_error(error)) from None
                continue
            found = found or reply.cancelled
        return found


def upstream_security(settings: EdgeSettings) -> ChannelSecurity:
    """Key and TLS for the upstream channel; raises SecurityError for inconsistent files."""
    key = settings.upstream_api_key or (settings.api_keys[0] if settings.api_keys else "")
    return ChannelSecurity(
        api_key=key,
        tls=settings.upstream_tls,
        tls_ca=_path(settings.upstream_tls_ca),
        tls_cert=_path(settings.upstream_tls_cert),
        tls_key=_path(settings.upstream_tls_key),
    )


def _path(value: str) -> Path | None:
    return Path(value) if value else None


async def _refusal(call: GenerateCall) -> EdgeError:
    """The EdgeError of a call that ended before sending headers, with field/retry details."""
    code = await call.code()
    if code == grpc.StatusCode.OK:
        return EdgeError(502, "UNKNOWN", "the server ended the stream without a response")
    trailers = await call.trailing_metadata()
    return edge_error(from_status(code, await call.details() or "", trailers))
