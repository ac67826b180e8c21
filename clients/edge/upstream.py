"""The edge's gRPC side: open a Generate stream and know, before answering HTTP, whether the
server accepted it (bad input must become a 400, not an in-band error)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenwire.client import failover
from tokenwire.client.client import CANCEL_TIMEOUT_S, cancel_everywhere, channel_options
from tokenwire.client.errors import ModelMismatch, TokenwireError, from_rpc_error, from_status
from tokenwire.client.failover import CutShort, Resumption, ServedModel, Targets
from tokenwire.client.messages import (
    ModelInfo,
    StreamEvent,
    Usage,
    event_from_pb,
    model_info_from_pb,
)
from tokenwire.client.security import ChannelSecurity, aio_channel
from tokenwire.client.targets import split_targets
from tokenwire.common import request_ids
from tokenwire.edge.errors import EdgeError, edge_error
from tokenwire.edge.settings import EdgeSettings
from tokenwire.edge.tracing import upstream_metadata
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

GenerateCall = grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse]
OWNER_TAG = 16
"""Characters of a caller's principal (its key's fingerprint) that scope its ids upstream."""
Reopen = Callable[[Resumption, grpc.StatusCode], Awaitable[GenerateCall]]
Reply = TypeVar("Reply")
log = structlog.get_logger("tokenwire.edge")


@dataclasses.dataclass(frozen=True, slots=True)
class Failover:
    """A stream whose call broke and that went on on another target."""

    request_id: str
    route: str
    """The route of the request that opened the stream (the metric's label)."""
    code: str
    """The gRPC status the broken call ended with (UNAVAILABLE: its server died or left)."""
    from_index: int
    """Tokens delivered before the break: the index of the first one the new call sends."""
    target: str
    """The target the stream went on on, as configured (an address: no key, no certificate)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Delivered:
    """What a stream begun elsewhere delivered: its token ids, the seed and the max_tokens
    its server announced, the model whose tokens they are (None where it is not known), and
    whether its Usage was delivered (the stream broke between its Usage and its Completion)."""

    ids: tuple[int, ...]
    seed: int | None
    model: ServedModel | None
    budget: int | None
    usage: bool = False


class UpstreamStream:
    """An accepted Generate call: iterate its events; cancel() ends it at the server.

    If the call breaks with UNAVAILABLE (its server died or went away), the stream continues
    on the next target with the token ids already received (see tokenwire.client.failover):
    the events go on from the next index as if nothing had happened, or, where the next target
    serves another model or the deadline has passed, end with that error."""

    def __init__(
        self,
        call: GenerateCall,
        resume: Resumption,
        on_end: Callable[[UpstreamStream], None],
        *,
        reopen: Reopen | None = None,
        ask_cancel: Callable[[str], Awaitable[bool]] | None = None,
        caller_id: str = "",
    ) -> None:
        self._call = call
        self._resume = resume
        self._server_id = resume.first.request_id
        """The id the stream goes by at the server (scoped by its caller, see upstream_id)."""
        self.request_id = caller_id or self._server_id
        """The id the caller chose, which every answer of the edge shows."""
        self._on_end = on_end
        self._reopen = reopen
        self._ask_cancel = ask_cancel
        self._cancelled = False

    @property
    def request(self) -> pb.GenerateRequest | None:
        """The accepted request (with the id the server took), before any continuation."""
        return self._resume.first

    @property
    def seed(self) -> int | None:
        """The sampling seed the server announced (`x-tokenwire-seed`)."""
        return self._resume.seed

    @property
    def budget(self) -> int | None:
        """The max_tokens the server gave the stream (`x-tokenwire-max-tokens`)."""
        return self._resume.budget

    @property
    def model(self) -> ServedModel | None:
        """The model whose tokens the stream delivers (`x-tokenwire-model`), when known."""
        return self._resume.model

    async def events(self) -> AsyncGenerator[StreamEvent, None]:
        """The generation's events; EdgeError when the call fails where it cannot continue."""
        try:
            while True:
                try:
                    while (message := await self._call.read()) is not grpc.aio.EOF:
                        assert isinstance(message, pb.GenerateResponse)
                        passed = self._resume.admit(message)
                        ended = passed is not message and self._resume.completed
                        if ended:
                            # The stream had ended before its continuation (cancelled), which
                            # would otherwise generate on: cancelled before its Completion goes
                            # out, which a reader may take as the end and read no further.
                            self._call.cancel()
                        if passed is not None:
                            yield self._as_caller_sees(event_from_pb(passed))
                        if ended:
                            return
                    if not self._resume.completed:
                        raise CutShort
                    return
                except grpc.RpcError as error:
                    if self._resume.completed:
                        return  # the call broke after the stream's end: nothing is missing
                    await self._continue(error)
        except TokenwireError as error:
            raise edge_error(error) from None
        finally:
            self._on_end(self)

    def _as_caller_sees(self, event: StreamEvent) -> StreamEvent:
        """Usage names the caller's id, not the server's scoped one."""
        if isinstance(event, Usage) and event.request_id == self._server_id:
            return dataclasses.replace(event, request_id=self.request_id)
        return event

    async def _continue(self, error: grpc.RpcError) -> None:
        """Reopen the call elsewhere after a retryable break; raise when it cannot."""
        if self._reopen is None or not self._resume.may_continue(error.code()):
            raise self._resume.ending(from_rpc_error(error)) from None
        call = await self._reopen(self._resume, error.code())
        if self._cancelled:
            call.cancel()  # cancel() came while the stream was moving to this call
        self._call = call

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()
        self._on_end(self)

    async def cancel_at_server(self) -> bool:
        """Ask the server to cancel the generation: its stream then ends as over gRPC, with
        its Usage and a cancelled Completion. False where the server could not be asked or
        had no such stream running."""
        if self._ask_cancel is None:
            return False
        try:
            return await self._ask_cancel(self._server_id)
        except EdgeError:
            return False


class Upstream:
    """Channels to the server: one per target of a comma-separated list (streams open on the
    next target when one is down, and fail over across them), or one to every replica with a
    dns:/// target. Each failover is logged (`edge.stream_failover`) and given to
    `on_failover`."""

    def __init__(
        self,
        target: str,
        timeout_s: float = 600.0,
        security: ChannelSecurity | None = None,
        on_failover: Callable[[Failover], None] | None = None,
    ) -> None:
        self._on_failover = on_failover
        self._security = security or ChannelSecurity()
        self._metadata = self._security.metadata()
        self._targets = Targets(split_targets(target))
        self._channels = [
            aio_channel(t, self._security, channel_options(len(self._targets.names)))
            for t in self._targets.names
        ]
        self._stubs = [pb_grpc.GenerationServiceStub(c) for c in self._channels]
        self._healths = [health_pb2_grpc.HealthStub(c) for c in self._channels]
        self._timeout_s = timeout_s
        self._info: ModelInfo | None = None
        self._ready_at = 0.0
        self._open: set[UpstreamStream] = set()
        self._opening: set[GenerateCall] = set()
        """Calls still waiting for their server's answer (accepted or refused)."""
        self._stopping = False
        """cancel_all has run: the edge is stopping."""

    @classmethod
    def from_settings(
        cls, settings: EdgeSettings, on_failover: Callable[[Failover], None] | None = None
    ) -> Upstream:
        """The upstream channel the edge's settings describe (key, TLS files)."""
        return cls(
            settings.grpc_target,
            settings.upstream_timeout_s,
            upstream_security(settings),
            on_failover,
        )

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def connect(self, limit_s: float) -> bool:
        """Open the connections early so the first request does not pay for them; True once
        any target is connected."""
        waits = [asyncio.ensure_future(channel.channel_ready()) for channel in self._channels]
        try:
            done, _ = await asyncio.wait(
                waits, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for wait in waits:
                wait.cancel()
        return bool(done)

    def _call(self, resume: Resumption, request_id: str) -> GenerateCall:
        return self._stubs[resume.target].Generate(
            resume.request(),
            timeout=resume.timeout_s(),
            # The traceparent of the edge request's span: the server continues its trace.
            metadata=(("x-request-id", request_id), *self._metadata, *upstream_metadata()),
        )

    async def open(
        self,
        request: pb.GenerateRequest,
        request_id: str,
        after: Delivered | None = None,
        *,
        route: str,
        owner: str | None,
    ) -> UpstreamStream:
        """Start a stream on the first target that accepts it (one that answers UNAVAILABLE
        passes it to the next); raise EdgeError when the server refuses it. The stream's
        failovers share its deadline and count for `route`. With `after`, the stream continues
        a generation another edge began: from its delivered ids and seed, on the same model
        only; after a delivered Usage, no second one is passed on, and a continuation that
        generates on ends as cancelled (see Resumption.admit). `owner` is the caller's
        principal: the server sees the id scoped by it."""
        server_id = upstream_id(request_id, owner)
        request = _with_id(request, server_id)
        resume = Resumption.start(request, self._timeout_s, self._targets.next)
        if after is not None:
            resume.delivered, resume.seed, resume.begun = list(after.ids), after.seed, True
            resume.budget, resume.usage_delivered = after.budget, after.usage
            resume.model, resume.model_target = after.model, "the edge that began the stream"
        try:
            call = await self._accepted(resume, server_id)
        except TokenwireError as error:
            raise edge_error(error) from None
        resume.first = _with_id(request, resume.request_id or server_id)
        stream = UpstreamStream(
            call,
            resume,
            self._ended,
            reopen=functools.partial(self._reopen, route),
            ask_cancel=self.cancel,
            caller_id=request_id,
        )
        self._open.add(stream)
        return stream

    async def _reopen(self, route: str, resume: Resumption, code: grpc.StatusCode) -> GenerateCall:
        """The continuation of a stream broken with `code`, on the next target that accepts
        it: a failover, logged and reported."""
        self._targets.move_on(resume, grpc.StatusCode.UNAVAILABLE)
        await asyncio.sleep(resume.backoff_s)
        call = await self._accepted(resume, resume.request_id)
        failover = Failover(
            request_id=resume.request_id,
            route=route,
            code=code.name,
            from_index=len(resume.delivered),
            target=self._targets.names[resume.target],
        )
        log.warning("edge.stream_failover", **dataclasses.asdict(failover))
        if self._on_failover is not None:
            self._on_failover(failover)
        return call

    async def _accepted(self, resume: Resumption, request_id: str) -> GenerateCall:
        """A call that resume.target, or the next one after each UNAVAILABLE, accepted;
        the TokenwireError of the refusal that ends the attempts."""
        while True:
            try:
                outcome = await self._attempt(resume, request_id)
            except ModelMismatch as mismatch:
                outcome = mismatch  # a target serving another model passes it on too
            if not isinstance(outcome, TokenwireError):
                return outcome
            if not resume.may_continue(outcome.code):
                raise resume.ending(outcome)
            self._targets.move_on(resume, outcome.code)
            await asyncio.sleep(resume.backoff_s)

    async def _attempt(self, resume: Resumption, request_id: str) -> GenerateCall | TokenwireError:
        """One Generate call on resume.target: the call if accepted, else why not."""
        try:
            if self._targets.several:
                await self._confirm_model(resume)
        except grpc.RpcError as error:
            return from_rpc_error(error)
        call = self._call(resume, request_id)
        self._opening.add(call)
        try:
            header = dict(await call.initial_metadata())
        except grpc.RpcError as error:
            broken = from_rpc_error(error)
            resume.broke(broken)
            return broken
        except asyncio.CancelledError:
            call.cancel()  # the HTTP client left before the server answered
            raise
        finally:
            self._opening.discard(call)
        if self._stopping and "x-request-id" not in header:
            raise EdgeError(503, "UNAVAILABLE", "the edge is shutting down; retry", retry_after_s=1)
        if "x-request-id" not in header:
            # A refusal is trailers-only: no header, only a status with its details (one
            # without them is a lost connection, after which the server may run the stream).
            refused = await _refusal(call)
            resume.broke(refused)
            return refused
        try:
            resume.see_metadata(header.items(), self._targets.names[resume.target])
        except TokenwireError:
            call.cancel()  # another model than the stream's: none of its events goes out
            raise
        return call

    async def _confirm_model(self, resume: Resumption) -> None:
        """ModelMismatch unless resume.target may carry on the stream (see failover.Targets)."""
        served = self._targets.model(resume)
        if served is None:
            try:
                reply = await self._stubs[resume.target].GetModelInfo(
                    pb.GetModelInfoRequest(),
                    timeout=resume.model_check_s(),
                    metadata=self._metadata,
                )
            except grpc.RpcError as error:
                raise resume.unanswered(error, self._targets.names[resume.target]) from None
            served = self._targets.remember(resume.target, reply)
        resume.confirm_model(self._targets.names[resume.target], served)

    def _ended(self, stream: UpstreamStream) -> None:
        self._open.discard(stream)

    def cancel_all(self) -> None:
        """Cancel every Generate call still open or still waiting for its server's answer
        (the end of a drain's grace): a request whose stream is opening gets a 503."""
        self._stopping = True
        for stream in list(self._open):
            stream.cancel()
        for call in list(self._opening):
            call.cancel()

    @property
    def known_model_info(self) -> ModelInfo | None:
        """The served model where it has been asked already (None before), without a call."""
        return self._info

    async def model_info(self) -> ModelInfo:
        """The served model, asked once."""
        if self._info is None:
            self._info = model_info_from_pb(await self._model_reply())
        return self._info

    async def _model_reply(self) -> pb.GetModelInfoResponse:
        """GetModelInfo of the first target that answers, from the next one on; a target that
        takes connections and never answers within MODEL_CHECK_S is passed over too."""
        index, reply = await self._first_answer(
            lambda i, timeout: self._stubs[i].GetModelInfo(
                pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata
            )
        )
        self._targets.remember(index, reply)
        return reply

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        """Tokenize on the first target that answers, as model_info asks, within the
        upstream timeout (one for all the targets it tries); EdgeError when it fails."""
        _, reply = await self._first_answer(
            lambda i, timeout: self._stubs[i].Tokenize(
                request, timeout=timeout, metadata=self._metadata
            ),
            time.monotonic() + self._timeout_s,
        )
        return reply

    async def detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        """Detokenize, as tokenize asks."""
        _, reply = await self._first_answer(
            lambda i, timeout: self._stubs[i].Detokenize(
                request, timeout=timeout, metadata=self._metadata
            ),
            time.monotonic() + self._timeout_s,
        )
        return reply

    async def _first_answer(
        self, ask: Callable[[int, float], Awaitable[Reply]], deadline: float | None = None
    ) -> tuple[int, Reply]:
        """The first target's answer to ask(index, timeout) and its index, from the next
        target on, before `deadline` (time.monotonic()): one that is UNAVAILABLE, or that does
        not answer within MODEL_CHECK_S while others are left (failover.attempt_s), passes the
        call to the next; EdgeError for any other failure, or for the last one. With no
        deadline (the model check) every target has MODEL_CHECK_S, the last one too."""
        index, left = self._targets.next, len(self._stubs)
        while True:
            left -= 1
            until = time.monotonic() + failover.MODEL_CHECK_S if deadline is None else deadline
            try:
                return index, await ask(index, failover.attempt_s(until, left))
            except grpc.RpcError as failed:
                if deadline is None:  # the model check: its time running out is UNAVAILABLE
                    failed = failover.checked(failed, self._targets.names[index])
                code = failover.moves_on(failed, until, left)
                if code is None:
                    raise edge_error(from_rpc_error(failed)) from None
                index = self._targets.skip(index, code)

    async def ready(self) -> bool:
        """True when any target reports SERVING (cached for half a second): a stream opens
        on the next target when one is down."""
        if time.monotonic() - self._ready_at < 0.5:
            return True
        checks = [asyncio.ensure_future(_serving(health)) for health in self._healths]
        try:
            for check in asyncio.as_completed(checks):
                if await check:
                    self._ready_at = time.monotonic()
                    return True
        finally:
            for check in checks:
                check.cancel()
        return False

    async def cancel(self, request_id: str) -> bool:
        """Cancel on every target at once (a stream may have moved); True as soon as one had
        it (the others' answers are not waited for), False once none had it; EdgeError where
        no target could be asked."""
        try:
            return await cancel_everywhere(
                self._stubs, request_id, CANCEL_TIMEOUT_S, self._metadata
            )
        except TokenwireError as error:
            raise edge_error(error) from None


def upstream_id(request_id: str, owner: str | None) -> str:
    """The id a caller's request goes by at the server. All of the edge's callers reach the
    server with the edge's one key, so where the edge has keys of its own each caller's ids are
    scoped by its principal: two callers' ids never meet at a server, and a caller's cancel
    (sent to every replica, or to whichever one a dns:/// balancer picks) can find its own
    stream only. An id too long to carry its scope goes by a digest of itself."""
    if owner is None:
        return request_id
    scoped = f"{owner[:OWNER_TAG]}:{request_id}"
    if request_ids.carried(scoped):
        return scoped
    return f"{owner[:OWNER_TAG]}:#{hashlib.sha256(request_id.encode()).hexdigest()}"


def _with_id(request: pb.GenerateRequest, request_id: str) -> pb.GenerateRequest:
    named = pb.GenerateRequest()
    named.CopyFrom(request)
    named.request_id = request_id
    return named


async def _serving(health: health_pb2_grpc.HealthStub) -> bool:
    try:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def upstream_security(settings: EdgeSettings) -> ChannelSecurity:
    """Key and TLS for the upstream channel; raises SecurityError for inconsistent files."""
    api_keys = settings.all_api_keys()
    key = settings.upstream_api_key or (api_keys[0] if api_keys else "")
    return ChannelSecurity(
        api_key=key,
        tls=settings.upstream_tls,
        tls_ca=_path(settings.upstream_tls_ca),
        tls_cert=_path(settings.upstream_tls_cert),
        tls_key=_path(settings.upstream_tls_key),
    )


def _path(value: str) -> Path | None:
    return Path(value) if value else None


async def _refusal(call: GenerateCall) -> TokenwireError:
    """The error of a call that ended before sending headers, with field/retry details."""
    code = await call.code()
    if code == grpc.StatusCode.OK:
        raise EdgeError(502, "UNKNOWN", "the server ended the stream without a response")
    trailers = await call.trailing_metadata()
    return from_status(code, await call.details() or "", trailers)
