"""Traces: OpenTelemetry spans of Generate calls, laid from timings the engine records anyway.

The engine knows nothing of tracing (an import-linter contract). The rpc layer opens one server
span per Generate call, continuing the caller's W3C `traceparent` (gRPC metadata) when there is
one. When the stream ends, its queue, prefill and decode spans are laid under it from the Usage
event's timings: arithmetic on recorded timestamps, with no work per token. Attribute names
follow the OpenTelemetry GenAI semantic conventions (`gen_ai.*`).

With no OTLP endpoint the provider has no processor: spans still get ids (for the log lines and
for the server spans of a trace the edge started) but are dropped when they end.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import ClassVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from tokenwire.common.tracing import ProcessTracing
from tokenwire.server.domain import GenerationRequest, UsageEvent

SERVICE_NAME = "tokenwire-server"
GENERATE_SPAN = "tokenwire.v1.GenerationService/Generate"
QUEUE_SPAN, PREFILL_SPAN, DECODE_SPAN = "queue", "prefill", "decode"
# Finish reasons that are the server's failure, not the caller's choice or a normal end.
_FAILED = frozenset({"error", "deadline_exceeded"})
_W3C = TraceContextTextMapPropagator()


@dataclasses.dataclass(frozen=True, slots=True)
class Tracing(ProcessTracing):
    """The server's own tracer provider and exporter."""

    service: ClassVar[str] = SERVICE_NAME
    scope: ClassVar[str] = "tokenwire.server"


class GenerateSpan:
    """The server span of one Generate call and, once the stream ends, its phases."""

    def __init__(
        self,
        tracer: trace.Tracer,
        metadata: Iterable[tuple[str, str | bytes]],
        *,
        phases: bool = True,
    ) -> None:
        """phases: lay the queue, prefill and decode spans (pointless when nothing exports)."""
        # Only the W3C keys, and only text values: a malformed traceparent starts a new trace.
        carrier = {k: v for k, v in metadata if k in _W3C.fields and isinstance(v, str)}
        self._tracer = tracer
        self._phases_wanted = phases
        self._wall_ns, self._mono = time.time_ns(), time.monotonic()
        self.span = tracer.start_span(
            GENERATE_SPAN,
            context=_W3C.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system.name": "grpc",
                "rpc.method": GENERATE_SPAN,
                "gen_ai.operation.name": "text_completion",
                "gen_ai.provider.name": "tokenwire",
            },
            start_time=self._wall_ns,
        )

    def log_ids(self) -> dict[str, str]:
        """trace_id and span_id as W3C writes them, for the request's log lines."""
        ids = self.span.get_span_context()
        return {"trace_id": f"{ids.trace_id:032x}", "span_id": f"{ids.span_id:016x}"}

    def accepted(self, request: GenerationRequest, request_id: str, model: str) -> None:
        """The request as the engine will run it (checked values, never the prompt)."""
        sampling = request.sampling
        attributes: dict[str, AttributeValue] = {
            "gen_ai.request.model": model,
            "gen_ai.response.model": model,
            "gen_ai.response.id": request_id,
            "gen_ai.request.temperature": sampling.temperature,
            "gen_ai.request.top_p": sampling.top_p,
        }
        if request.max_tokens:
            attributes["gen_ai.request.max_tokens"] = request.max_tokens
        if sampling.top_k:
            attributes["gen_ai.request.top_k"] = sampling.top_k
        if sampling.seed is not None:
            attributes["gen_ai.request.seed"] = sampling.seed
        if sampling.presence_penalty:
            attributes["gen_ai.request.presence_penalty"] = sampling.presence_penalty
        if sampling.frequency_penalty:
            attributes["gen_ai.request.frequency_penalty"] = sampling.frequency_penalty
        if request.stop:
            attributes["gen_ai.request.stop_sequences"] = list(request.stop)
        self.span.set_attributes(attributes)

    def refused(self, code: str, error_type: str, message: str) -> None:
        """The call ended with a status other than OK (refused, or failed while streaming)."""
        self.span.set_attributes({"rpc.response.status_code": code, "error.type": error_type})
        self.span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"))
        self.span.end()

    def finished(self, reason: str, usage: UsageEvent | None, arrived_at: float) -> None:
        """End the span with the stream's outcome; lay its phases when Usage was seen.

        arrived_at: the engine's time.monotonic() of the request's arrival, which the Usage
        event's timings count from."""
        self.span.set_attribute("gen_ai.response.finish_reasons", [reason])
        if usage is not None:
            self.span.set_attributes(
                {
                    "gen_ai.usage.input_tokens": usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": usage.completion_tokens,
                }
            )
            if self._phases_wanted:
                self._phases(usage, arrived_at)
        if reason in _FAILED:
            self.span.set_attribute("error.type", reason)
            self.span.set_status(Status(StatusCode.ERROR, reason))
        self.span.end()

    def _phases(self, usage: UsageEvent, arrived_at: float) -> None:
        """queue: arrival to prefill start; prefill: to the first token; decode: to the end.

        A stream that generated no token here has neither prefill nor decode span."""
        start = self._ns(arrived_at)
        queued = start + _ns(usage.queue_time_s)
        self._child(QUEUE_SPAN, start, queued)
        # Not completion_tokens: a continued stream's counts its continuation_ids too, tokens
        # generated elsewhere; time to first token is 0 where none was generated here.
        if usage.time_to_first_token_s > 0:
            first = start + _ns(usage.time_to_first_token_s)
            self._child(PREFILL_SPAN, queued, first)
            self._child(DECODE_SPAN, first, start + _ns(usage.total_time_s))

    def _child(self, name: str, start_ns: int, end_ns: int) -> None:
        parent = trace.set_span_in_context(self.span)
        child = self._tracer.start_span(name, context=parent, start_time=start_ns)
        child.end(end_time=max(start_ns, end_ns))

    def _ns(self, monotonic: float) -> int:
        """A time.monotonic() reading as wall-clock nanoseconds (spans carry epoch times)."""
        return self._wall_ns + _ns(monotonic - self._mono)


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)
