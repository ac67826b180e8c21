"""GenerationService: streams a request's events as they leave the engine."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from tokenwire.common import model_identity
from tokenwire.server.domain import (
    CompletionEvent,
    Event,
    FinishReason,
    InvalidRequest,
    TokenEvent,
    TokenwireError,
    Unavailable,
    UsageEvent,
)
from tokenwire.server.engine import (
    Engine,
    EngineObserver,
    EngineStopped,
    GenerationHandle,
    NullObserver,
)
from tokenwire.server.rpc import convert
from tokenwire.server.rpc.auth import ANONYMOUS, ApiKeys
from tokenwire.server.rpc.errors import abort, log_rejected, to_status, without_value
from tokenwire.server.rpc.handlers import Malformed
from tokenwire.server.rpc.tokens import TokenCalls
from tokenwire.server.telemetry import ms, percentile
from tokenwire.server.telemetry.tracing import GenerateSpan, Tracing
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

log = structlog.get_logger("tokenwire.rpc")

Context = grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse]


class EngineSlot:
    """Holds the engine once it is loaded; requests before then get UNAVAILABLE."""

    def __init__(self) -> None:
        self.engine: Engine | None = None

    def get(self) -> Engine:
        if self.engine is None:
            raise Unavailable("the model is still loading")
        return self.engine


def _metadata(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Generate, GetModelInfo, Cancel, and Tokenize and Detokenize (tokens.TokenCalls). Streams
    belong to the principal that started them."""

    def __init__(
        self,
        slot: EngineSlot,
        *,
        keys: ApiKeys | None = None,
        log_content: bool = False,
        observer: EngineObserver | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._slot = slot
        self._keys = keys or ApiKeys(())
        self._log_content = log_content
        self._observer = observer or NullObserver()
        tracing = tracing or Tracing.from_endpoint("")
        self._tracer = tracing.tracer
        # Without an exporter the Generate span only lends its ids to the logs and the trace.
        self._phases = tracing.exporter is not None
        self.last_arrival = 0.0
        """time.monotonic() of the latest Generate call (the drain waits for a quiet moment)."""
        self.tokens = TokenCalls(slot.get)

    def _principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        # The interceptor has refused unknown keys already; None cannot own anything anyway.
        return self._keys.principal(context.invocation_metadata()) or ANONYMOUS

    async def Generate(
        self, request: pb.GenerateRequest | Malformed, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        structlog.contextvars.clear_contextvars()
        self.last_arrival = time.monotonic()
        # The caller's traceparent (sent by the edge, or by any gRPC client) is the parent.
        span = GenerateSpan(self._tracer, context.invocation_metadata() or (), phases=self._phases)
        structlog.contextvars.bind_contextvars(**span.log_ids())
        try:
            handle, request_id, deadline = await self._submit(request, context, span)
        except TokenwireError as exc:
            log_rejected(exc)
            _span_failed(span, exc)
            await abort(context, exc)
            return
        except asyncio.CancelledError:  # the call ended while a long prompt was tokenized
            remaining = context.time_remaining()
            code = (
                "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0.01 else "CANCELLED"
            )
            ended = "the call ended before the request was accepted"
            log.info("request.rejected", code=code, reason=ended)
            self._observer.request_rejected(code)
            span.refused(code, "CancelledError", ended)
            raise
        logged = request if self._log_content and isinstance(request, pb.GenerateRequest) else None
        summary = _StreamSummary(handle, logged)
        try:
            # Headers go out only once the request is accepted: until then a failure is
            # trailers-only, with its status details (a client tells a refusal from a lost
            # connection by them, and sends the request elsewhere after UNAVAILABLE).
            # The seed lets a client continue this stream elsewhere with the same draws.
            # The model lets a client check that a continuation runs on the same model, and the
            # token budget that a continuation elsewhere asks for the same length.
            await context.send_initial_metadata(
                (
                    ("x-request-id", request_id),
                    ("x-tokenwire-seed", str(handle.seed)),
                    (model_identity.HEADER, convert.model_header(self._slot.get())),
                    ("x-tokenwire-max-tokens", str(handle.max_tokens)),
                )
            )
            async for event in handle.events():
                summary.see(event)
                yield convert.event_to_pb(_with_caller_id(event, request_id))
        except EngineStopped as exc:
            summary.failed = True
            _span_failed(span, exc)
            await abort(context, exc)
        finally:
            # Reached without a completion when the client cancelled, the deadline passed or
            # the stream failed: make sure the engine frees the slot at its next step.
            if not summary.completed:
                # 10 ms of slack: grpc may cancel a hair before our own clock says so.
                expired = deadline is not None and time.monotonic() >= deadline - 0.01
                reason = FinishReason.DEADLINE_EXCEEDED if expired else FinishReason.CANCELLED
                outcome = handle.cancel(reason)
                if not summary.failed:
                    # The engine's own reason where it had finished first: one outcome in the
                    # log, the span and the metrics.
                    summary.reason = "error" if outcome is None else outcome.value
            summary.log()
            if not summary.failed:
                span.finished(summary.reason, summary.usage, handle.arrived_at)

    async def _submit(
        self, request: pb.GenerateRequest | Malformed, context: Context, span: GenerateSpan
    ) -> tuple[GenerationHandle, str, float | None]:
        """Check the request and hand it to the engine under the caller's principal; bind the
        log context. Raises TokenwireError when refused: nothing reaches the engine then.

        Refusals before engine.submit are counted here; the engine counts its own."""
        try:
            if isinstance(request, Malformed):
                raise request.error()
            request_id = convert.choose_request_id(
                request.request_id, _metadata(context, "x-request-id")
            )
            principal = self._principal(context)
            structlog.contextvars.bind_contextvars(request_id=request_id, peer=context.peer())
            if principal != ANONYMOUS:
                structlog.contextvars.bind_contextvars(principal=principal)
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            engine = self._slot.get()
            owned = convert.request_from_pb(request, owned_id(principal, request_id), deadline)
            span.accepted(owned, request_id, engine.model.spec.name)
        except TokenwireError as exc:
            self._observer.request_rejected(type(exc).__name__)
            raise
        try:
            return await engine.submit_async(owned), request_id, deadline
        except InvalidRequest as exc:
            raise _with_caller_value(exc, request_id) from None

    async def GetModelInfo(
        self,
        request: pb.GetModelInfoRequest | Malformed,
        context: grpc.aio.ServicerContext[pb.GetModelInfoRequest, pb.GetModelInfoResponse],
    ) -> pb.GetModelInfoResponse:
        try:
            if isinstance(request, Malformed):
                raise request.error()
            return convert.model_info_to_pb(self._slot.get())
        except TokenwireError as exc:
            await abort(context, exc)
            raise

    async def Cancel(
        self,
        request: pb.CancelRequest | Malformed,
        context: grpc.aio.ServicerContext[pb.CancelRequest, pb.CancelResponse],
    ) -> pb.CancelResponse:
        """Cancel a stream of the caller's own; another principal's id answers as unknown."""
        try:
            if isinstance(request, Malformed):
                raise request.error()
            target = convert.check_request_id(request.request_id)
            engine = self._slot.get()
        except TokenwireError as exc:
            log_rejected(exc)
            await abort(context, exc)
            raise
        principal = self._principal(context)
        cancelled = engine.cancel(owned_id(principal, target))
        log.info("request.cancel", target=target, found=cancelled, principal=principal or None)
        return pb.CancelResponse(cancelled=cancelled)

    async def Tokenize(
        self,
        request: pb.TokenizeRequest | Malformed,
        context: grpc.aio.ServicerContext[pb.TokenizeRequest, pb.TokenizeResponse],
    ) -> pb.TokenizeResponse:
        """A text's token ids, as Generate feeds them to the model."""
        return await self.tokens.tokenize(request, context, self._principal(context))

    async def Detokenize(
        self,
        request: pb.DetokenizeRequest | Malformed,
        context: grpc.aio.ServicerContext[pb.DetokenizeRequest, pb.DetokenizeResponse],
    ) -> pb.DetokenizeResponse:
        """The text of token ids."""
        return await self.tokens.detokenize(request, context, self._principal(context))


def owned_id(principal: str, request_id: str) -> str:
    """The engine's id for a principal's request: ids of different principals never meet,
    so nobody can cancel, or learn of, another principal's stream by its id."""
    return request_id if principal == ANONYMOUS else f"{principal}/{request_id}"


def _with_caller_id(event: Event, request_id: str) -> Event:
    """Usage echoes the id the caller chose, not the engine's principal-scoped one."""
    if isinstance(event, UsageEvent) and event.request_id != request_id:
        return dataclasses.replace(event, request_id=request_id)
    return event


def _with_caller_value(exc: InvalidRequest, request_id: str) -> InvalidRequest:
    """A refusal naming request_id shows the id the caller chose, not the engine's
    principal-scoped one (which would reveal how ids are scoped)."""
    if exc.field == "request_id" and exc.value != request_id:
        return InvalidRequest(exc.field, request_id, exc.reason)
    return exc


def _span_failed(span: GenerateSpan, exc: TokenwireError) -> None:
    """End the call's span with the status the caller gets, and its reason without the
    caller's value: prompts and stop strings are never in a trace."""
    span.refused(to_status(exc).code.name, type(exc).__name__, without_value(exc))


class _StreamSummary:
    """Collects what one stream did, for its single summary log line."""

    def __init__(self, handle: GenerationHandle, content_of: pb.GenerateRequest | None) -> None:
        self.handle = handle
        self.content_of = content_of
        self.tokens = 0
        self.text: list[str] = []
        self.usage: UsageEvent | None = None
        self.reason = "error"
        self.stop_sequence = ""
        self.completed = False
        self.failed = False
        self.first_token_at: float | None = None
        """When the handler got the stream's first token (time.monotonic())."""

    def see(self, event: TokenEvent | UsageEvent | CompletionEvent) -> None:
        if isinstance(event, TokenEvent):
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.tokens += 1
            if self.content_of is not None:
                self.text.append(event.text)
        elif isinstance(event, UsageEvent):
            self.usage = event
        else:
            self.reason = event.finish_reason.value
            self.stop_sequence = event.stop_sequence
            self.completed = True

    def log(self) -> None:
        fields: dict[str, object] = {
            "prompt_tokens": self.handle.prompt_tokens,
            "completion_tokens": self.tokens,
            "finish_reason": self.reason,
        }
        if self.usage is not None:
            # Everything here arrived as events: the loop thread reads no engine state.
            gaps = self.usage.inter_token_latencies_s
            fields |= {
                "queue_ms": ms(self.usage.queue_time_s),
                "duration_ms": ms(self.usage.total_time_s),
            }
            if self.usage.time_to_first_token_s > 0:  # 0: no token was generated here
                fields["ttft_ms"] = ms(self.usage.time_to_first_token_s)
            if gaps:
                fields |= {
                    "itl_p50_ms": ms(percentile(gaps, 50)),
                    "itl_p95_ms": ms(percentile(gaps, 95)),
                }
        else:
            # Ended before its Usage (the caller left or cancelled, or the stream failed): the
            # handler's own view, from the request's arrival to now and to its first token.
            arrived = self.handle.arrived_at
            fields["duration_ms"] = ms(time.monotonic() - arrived)
            if self.first_token_at is not None:
                fields["ttft_ms"] = ms(self.first_token_at - arrived)
        if self.content_of is not None:
            fields |= {"prompt": self.content_of.prompt, "completion": "".join(self.text)}
        log.info("request.finished", **fields)
