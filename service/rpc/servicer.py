"""GenerationService: streams a request's events as they leave the engine."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

from service.domain import (
    CompletionEvent,
    FinishReason,
    TokenEvent,
    TokenwireError,
    Unavailable,
    UsageEvent,
)
from service.engine import Engine, EngineStopped, GenerationHandle
from service.rpc import convert
from service.rpc.errors import abort
from service.telemetry import ms, percentile

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
    def __init__(self, slot: EngineSlot, *, log_content: bool = False) -> None:
        self._slot = slot
        self._log_content = log_content

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        structlog.contextvars.clear_contextvars()
        try:
            request_id = convert.choose_request_id(
                request.request_id, _metadata(context, "x-request-id")
            )
            structlog.contextvars.bind_contextvars(request_id=request_id, peer=context.peer())
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            engine = self._slot.get()
            handle = engine.submit(convert.request_from_pb(request, request_id, deadline))
        except TokenwireError as exc:
            log.info("request.rejected", error=str(exc), code=type(exc).__name__)
            await abort(context, exc)
            return
        summary = _StreamSummary(handle, request if self._log_content else None)
        try:
            # Headers go out only once the request is accepted: until then a failure is
            # trailers-only, which clients may retry transparently (UNAVAILABLE).
            await context.send_initial_metadata((("x-request-id", request_id),))
            async for event in handle.events():
                summary.see(event)
                yield convert.event_to_pb(event)
        except EngineStopped as exc:
            summary.failed = True
            await abort(context, exc)
        finally:
            # Reached without a completion when the client cancelled, the deadline passed or
            # the stream failed: make sure the engine frees the slot at its next step.
            if not summary.completed:
                # 10 ms of slack: grpc may cancel a hair before our own clock says so.
                expired = deadline is not None and time.monotonic() >= deadline - 0.01
                reason = FinishReason.DEADLINE_EXCEEDED if expired else FinishReason.CANCELLED
                handle.cancel(reason)
                if not summary.failed:
                    summary.reason = reason.value
            summary.log()

    async def GetModelInfo(
        self,
        request: pb.GetModelInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetModelInfoRequest, pb.GetModelInfoResponse],
    ) -> pb.GetModelInfoResponse:
        try:
            return convert.model_info_to_pb(self._slot.get())
        except TokenwireError as exc:
            await abort(context, exc)
            raise

    async def Cancel(
        self,
        request: pb.CancelRequest,
        context: grpc.aio.ServicerContext[pb.CancelRequest, pb.CancelResponse],
    ) -> pb.CancelResponse:
        try:
            cancelled = self._slot.get().cancel(request.request_id)
        except TokenwireError as exc:
            await abort(context, exc)
            raise
        log.info("request.cancel", target=request.request_id, found=cancelled)
        return pb.CancelResponse(cancelled=cancelled)


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

    def see(self, event: TokenEvent | UsageEvent | CompletionEvent) -> None:
        if isinstance(event, TokenEvent):
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
            fields |= {
                "queue_ms": ms(self.usage.queue_time_s),
                "ttft_ms": ms(self.usage.time_to_first_token_s),
                "duration_ms": ms(self.usage.total_time_s),
            }
        record = self.handle.record()
        if record is not None:
            gaps = record.inter_token_latencies
            fields |= {
                "itl_p50_ms": ms(percentile(gaps, 50)),
                "itl_p95_ms": ms(percentile(gaps, 95)),
            }
        if self.content_of is not None:
            fields |= {"prompt": self.content_of.prompt, "completion": "".join(self.text)}
        log.info("request.finished", **fields)
