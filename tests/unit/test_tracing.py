"""A call's span: under its caller's trace context, with its gRPC attributes and counts (never its text),
and tokenize, queue and inference children; OpenTelemetry loaded only when tracing is on."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from rerank_server.logs import CallRecord
from rerank_server.tracing import (
    DEFAULT_SERVICE_NAME,
    INSTALL_TRACING,
    CallTracer,
    TracingUnavailableError,
    service_resource,
    start_tracing,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
MARKER = "trace-text-3e9a"


@pytest.fixture
def exported() -> Iterator[tuple[CallTracer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = CallTracer(provider)
    yield tracer, exporter
    tracer.shutdown()


def answered(**facts: object) -> CallRecord:
    record = CallRecord("Rerank", "req-1", "ipv4:127.0.0.1:5000", model="m", documents=3, tokens=40)
    record.keep_text(f"what does {MARKER} eat?", [f"{MARKER} eats bamboo"])
    record.tokenize_ms, record.queue_ms, record.inference_ms = 1.0, 2.0, 3.0
    for name, value in facts.items():
        setattr(record, name, value)
    return record


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def test_a_call_is_a_server_span_under_its_callers_trace_with_its_phases_as_children(
    exported: tuple[CallTracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = exported
    span = tracer.start("Rerank", {"traceparent": TRACEPARENT, "x-request-id": "req-1"})
    assert span.trace_id == TRACE_ID
    time.sleep(0.02)  # longer than the phases, so none is cut to fit the call
    span.end(answered())
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"rerank.v1.Reranker/Rerank", "tokenize", "queue", "inference"}
    call = spans["rerank.v1.Reranker/Rerank"]
    assert call.kind == SpanKind.SERVER
    assert format(call.context.trace_id, "032x") == TRACE_ID
    assert call.parent is not None and format(call.parent.span_id, "016x") == PARENT_ID
    assert call.parent.is_remote
    assert dict(call.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "rerank.v1.Reranker",
        "rpc.method": "Rerank",
        "rpc.grpc.status_code": 0,
        "rerank.model": "m",
        "rerank.documents": 3,
        "rerank.tokens": 40,
        "rerank.request_id": "req-1",
    }
    assert call.status.status_code == StatusCode.UNSET
    phases = [spans[name] for name in ("tokenize", "queue", "inference")]
    for phase in phases:
        assert phase.parent is not None and phase.parent.span_id == call.context.span_id
        assert phase.context.trace_id == call.context.trace_id
    assert [p.end_time - p.start_time for p in phases] == [1_000_000, 2_000_000, 3_000_000]  # type: ignore[operator]
    # End to end, the last ending with the call.
    assert phases[0].end_time == phases[1].start_time and phases[1].end_time == phases[2].start_time
    assert phases[2].end_time == call.end_time
    assert call.start_time is not None and phases[0].start_time is not None
    assert phases[0].start_time >= call.start_time


def test_phases_longer_than_the_call_are_cut_to_fit_inside_it(
    exported: tuple[CallTracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = exported
    tracer.start("StreamRerank", {}).end(answered(method="StreamRerank", tokenize_ms=5e3, queue_ms=5e3))
    spans = by_name(exporter.get_finished_spans())
    call = spans["rerank.v1.Reranker/StreamRerank"]
    for name in ("tokenize", "queue", "inference"):
        assert call.start_time <= spans[name].start_time <= spans[name].end_time <= call.end_time  # type: ignore[operator]


def test_without_a_trace_context_a_call_starts_its_own_trace(
    exported: tuple[CallTracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = exported
    span = tracer.start("StreamRerank", {"traceparent": "not a trace context"})
    span.end(answered(method="StreamRerank"))
    call = by_name(exporter.get_finished_spans())["rerank.v1.Reranker/StreamRerank"]
    assert call.parent is None
    assert format(call.context.trace_id, "032x") == span.trace_id != "0" * 32


@pytest.mark.parametrize(
    ("code", "number", "error"), [("INVALID_ARGUMENT", 3, False), ("INTERNAL", 13, True)]
)
def test_a_failed_call_has_its_code_no_phases_and_is_an_error_only_when_the_server_failed(
    exported: tuple[CallTracer, InMemorySpanExporter], code: str, number: int, error: bool
) -> None:
    tracer, exporter = exported
    tracer.start("Rerank", {}).end(answered(code=code, tokens=0))
    [call] = exporter.get_finished_spans()
    assert (call.attributes or {})["rpc.grpc.status_code"] == number
    assert call.status.status_code == (StatusCode.ERROR if error else StatusCode.UNSET)


def test_spans_hold_no_query_or_document_text(exported: tuple[CallTracer, InMemorySpanExporter]) -> None:
    tracer, exporter = exported
    tracer.start("Rerank", {"traceparent": TRACEPARENT}).end(answered())
    for span in exporter.get_finished_spans():
        assert MARKER not in span.to_json()


def test_the_service_name_is_rerank_server_unless_otel_service_name_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert service_resource().attributes["service.name"] == DEFAULT_SERVICE_NAME
    monkeypatch.setenv("OTEL_SERVICE_NAME", "reranker-eu")
    assert service_resource().attributes["service.name"] == "reranker-eu"


def test_without_the_exporter_installed_tracing_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    with pytest.raises(TracingUnavailableError, match="pip install") as refused:
        start_tracing()
    assert INSTALL_TRACING in str(refused.value)
    assert 'pip install "rerank-serving[tracing]"' in str(refused.value)


def test_the_server_imports_no_opentelemetry_unless_tracing_is_on() -> None:
    script = (
        "import sys\n"
        "import rerank_server.main, rerank_server.app, rerank_server.edge.servicer\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_tracing_without_opentelemetry_stops_the_server_at_start(bert_cross_encoder_dir: Path) -> None:
    script = (
        "import sys\n"
        "sys.modules['opentelemetry.sdk.trace'] = None  # as if the tracing extra were not installed\n"
        "from rerank_server.main import main\n"
        f"sys.exit(main(['--model', {str(bert_cross_encoder_dir)!r}, '--tracing', '--port', '0',\n"
        "    '--metrics-port', '0', '--log-format', 'text']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    missing = "needs OpenTelemetry (opentelemetry.sdk.trace is not installed)"
    assert f'{missing}: pip install "rerank-serving[tracing]"' in done.stderr
    assert "listening" not in done.stderr


def test_an_http_call_is_a_span_named_by_its_route(exported: tuple[CallTracer, InMemorySpanExporter]) -> None:
    tracer, exporter = exported
    span = tracer.start("POST /v2/rerank", {"traceparent": TRACEPARENT})
    span.end(answered(method="POST /v2/rerank"))
    call = by_name(exporter.get_finished_spans())["POST /v2/rerank"]
    assert format(call.context.trace_id, "032x") == TRACE_ID
    attributes = dict(call.attributes or {})
    assert (attributes["http.request.method"], attributes["http.route"]) == ("POST", "/v2/rerank")
    assert "rpc.system" not in attributes
