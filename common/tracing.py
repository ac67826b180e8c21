"""The tracer provider a process keeps for itself (never the global one), for the server and
the edge alike; each names its service and instrumentation scope in a subclass.

With no OTLP endpoint the provider has no processor: spans still get ids (for log lines and for
propagation) but are dropped when they end. Used only by processes that trace (the server, the
edge): the client alone never imports it, so it needs no tracing package.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import ClassVar, Self

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

FLUSH_LIMIT_S = 2.0
"""The longest the last export at exit may take. The OTLP exporter retries an unreachable
collector for up to its timeout (10 s), which would otherwise be added to every stop."""


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessTracing:
    """A tracer provider of this process's own and its exporter."""

    service: ClassVar[str] = "tokenwire"
    scope: ClassVar[str] = "tokenwire"

    provider: TracerProvider
    exporter: SpanExporter | None = None

    @classmethod
    def from_endpoint(cls, endpoint: str, version: str = "") -> Self:
        """OTLP/gRPC export to endpoint (batched, off the request path); none when empty.

        The exporter also reads the standard OTEL_EXPORTER_OTLP_* variables (headers,
        certificates, timeout) and the provider OTEL_TRACES_SAMPLER."""
        provider = TracerProvider(resource=cls._resource(version), shutdown_on_exit=bool(endpoint))
        if not endpoint:
            return cls(provider)
        # Imported here: a process without an endpoint never loads the exporter's modules.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, exporter)

    @classmethod
    def to(cls, exporter: SpanExporter, version: str = "") -> Self:
        """Each span handed to exporter as it ends (tests: the SDK's InMemorySpanExporter)."""
        provider = TracerProvider(resource=cls._resource(version), shutdown_on_exit=False)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return cls(provider, exporter)

    @classmethod
    def _resource(cls, version: str) -> Resource:
        attributes = {"service.name": cls.service}
        if version:
            attributes["service.version"] = version
        return Resource.create(attributes)

    @property
    def tracer(self) -> trace.Tracer:
        return self.provider.get_tracer(self.scope)

    def shutdown(self) -> None:
        """Export what is still batched, for at most FLUSH_LIMIT_S, and stop the exporter:
        past the limit its retries end and the spans still batched are dropped."""
        flush = threading.Thread(target=self.provider.shutdown, name="traces-flush", daemon=True)
        flush.start()
        flush.join(FLUSH_LIMIT_S)
        if flush.is_alive() and self.exporter is not None:
            self.exporter.shutdown()  # ends the retry it waits in (or the call in flight)
            flush.join(FLUSH_LIMIT_S)
