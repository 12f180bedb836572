"""OpenTelemetry spans of calls, exported over OTLP/gRPC (`--tracing`).

OpenTelemetry is imported here only, and only once tracing is on: the server runs without it
installed. The exporter (endpoint, headers, TLS), the batching and the resource are configured by the
standard OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_BSP_SCHEDULE_DELAY, ...); the service
name is OTEL_SERVICE_NAME's, else rerank-server.

Each call is a SERVER span named after its gRPC method (or HTTP route), a child of the trace
context its caller sent (W3C `traceparent` / `tracestate` metadata or headers), with tokenize, queue
and inference children timed by the call's own timings. Spans carry names and counts, never a query
or document.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc

from rerank_server.logs import CallRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

SERVICE = "rerank.v1.Reranker"
DEFAULT_SERVICE_NAME = "rerank-server"
INSTALL_TRACING = 'pip install "rerank-serving[tracing]"'
# Codes that mark a server span as an error (OpenTelemetry's conventions for gRPC servers); the
# others answer the caller's own mistakes.
SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


class TracingUnavailableError(Exception):
    """--tracing without OpenTelemetry installed; the message says what to install."""


def start_tracing() -> CallTracer:
    """A tracer whose spans go, in batches, to the OTLP/gRPC endpoint the OTEL_* variables name."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailableError(
            f"--tracing needs OpenTelemetry ({exc.name} is not installed): {INSTALL_TRACING}"
        ) from exc
    provider = TracerProvider(resource=service_resource())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return CallTracer(provider)


def service_resource() -> Resource:
    """What the spans say they come from: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, with
    rerank-server as the service name where they give none."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


class CallTracer:
    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("rerank_server")

    def start(self, method: str, metadata: Mapping[str, str]) -> CallSpan:
        """The span of a call that begins now, under the trace context in its metadata (if any)."""
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        started = time.time_ns()
        http_method, _, route = method.partition(" ")
        if route:  # an HTTP route, "POST /v2/rerank"
            name, attributes = method, {"http.request.method": http_method, "http.route": route}
        else:
            name = f"{SERVICE}/{method}"
            attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method}
        span = self._tracer.start_span(
            name,
            context=propagate.extract(metadata),
            kind=SpanKind.SERVER,
            start_time=started,
            attributes=attributes,
        )
        return CallSpan(self._tracer, span, started)

    def shutdown(self) -> None:
        """Export the spans still batched, then stop (blocks up to the exporter's timeout)."""
        self._provider.shutdown()


class CallSpan:
    def __init__(self, tracer: Tracer, span: Span, started_ns: int) -> None:
        self._tracer = tracer
        self._span = span
        self._started_ns = started_ns

    @property
    def trace_id(self) -> str:
        return format(self._span.get_span_context().trace_id, "032x")

    def end(self, call: CallRecord) -> None:
        """End the span with what the call came to. A call that succeeded gets tokenize, queue and
        inference children, laid end to end so that the last ends with the call (a stream's phases
        overlap: its children give their total durations, not the moments)."""
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        ended = time.time_ns()
        span = self._span
        span.set_attributes(
            {
                # An HTTP call's too: its status's gRPC equivalent, which its log line shows as well.
                "rpc.grpc.status_code": _status_number(call.code),
                "rerank.model": call.model,
                "rerank.documents": call.documents,
                "rerank.tokens": call.tokens,
                "rerank.request_id": call.request_id,
            }
        )
        if call.code in SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, call.code))
        if call.code == "OK":
            parent = trace.set_span_in_context(span)
            phases = (
                ("tokenize", call.tokenize_ms),
                ("queue", call.queue_ms),
                ("inference", call.inference_ms),
            )
            start = max(self._started_ns, ended - round(sum(ms for _, ms in phases) * 1e6))
            for name, ms in phases:
                end = min(ended, start + round(ms * 1e6))
                self._tracer.start_span(name, context=parent, start_time=start).end(end_time=end)
                start = end
        span.end(end_time=ended)


def _status_number(code: str) -> int:
    """A status code's number (what rpc.grpc.status_code holds) from its name."""
    return int(grpc.StatusCode[code].value[0])
