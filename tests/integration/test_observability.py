"""Logs, request ids and traces of the real server: one JSON log line per call named by the caller's
request id (returned as `x-request-id` metadata, on failure too), no request text unless asked for,
and OpenTelemetry spans exported over OTLP to a collector, under the caller's trace."""

from __future__ import annotations

import json
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from rerank.v1 import reranker_pb2 as pb
from rerank.v1 import reranker_pb2_grpc as pb_grpc
from rerank_client import RerankerClient

from integration.conftest import StartServer
from integration.server_process import ServerProcess

pytestmark = pytest.mark.integration

REQUEST_ID = "x-request-id"
MARKER = "okapi-marker-93c1"
QUERY = f"what does the {MARKER} eat?"
DOCUMENTS = [f"The {MARKER} eats leaves.", "Paris is in France.", "Bamboo grows fast."]
SERVICE_NAME = "rerank-under-test"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector: keeps every span it is sent, with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Span]] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(resource, span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str, spans: int, timeout: float = 30) -> list[tuple[dict[str, Any], Span]]:
        """The spans of one trace, once `spans` of them arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [(r, s) for r, s in self.spans if s.trace_id.hex() == trace_id]
            if len(found) >= spans:
                return found
            time.sleep(0.05)
        raise TimeoutError(f"{len(found)} of {spans} spans of trace {trace_id} within {timeout} s")


def attributes(pairs: Any) -> dict[str, Any]:
    def value(any_value: AnyValue) -> Any:
        return getattr(any_value, any_value.WhichOneof("value"))

    return {pair.key: value(pair.value) for pair in pairs}


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


@pytest.fixture(scope="module")
def traced(
    collector: tuple[Collector, int], bert_cross_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server logging JSON, tracing to the collector; stopped cleanly after the module."""
    _, port = collector
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": SERVICE_NAME,
    }
    args = ["--model", f"tiny={bert_cross_encoder_dir}", "--log-format", "json", "--tracing"]
    log = tmp_path_factory.mktemp("observability") / "server.log"
    with ServerProcess(args, log, env=env) as server:
        server.wait_serving()
        yield server
        assert server.stop(signal.SIGTERM) == 0, server.log()
        assert server.orphans == [], f"workers outlived the server:\n{server.log()}"
        assert server.leftover_shared_memory() == [], "shared memory left in /dev/shm"


def call_line(server: ServerProcess, request_id: str, timeout: float = 30) -> dict[str, Any]:
    """The call's JSON log line (written as the call ends, so perhaps after its answer arrived)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if request_id in line and line.endswith("}"):  # a whole line, not one being written
                record = json.loads(line)
                if record["logger"] == "rerank_server.calls" and record["request_id"] == request_id:
                    return dict(record)
        time.sleep(0.05)
    raise TimeoutError(f"no log line for call {request_id} within {timeout} s:\n{server.log()[-3000:]}")


def new_id() -> str:
    return f"obs-{uuid.uuid4().hex}"


def returned_id(metadata: Any) -> str:
    [value] = [value for key, value in metadata or () if key == REQUEST_ID]
    return str(value)


def is_generated(request_id: str) -> bool:
    return len(request_id) == 32 and all(c in "0123456789abcdef" for c in request_id)


def stub(server: ServerProcess) -> tuple[grpc.Channel, pb_grpc.RerankerStub]:
    channel = grpc.insecure_channel(server.target)
    return channel, pb_grpc.RerankerStub(channel)


def stream_messages(documents: list[str]) -> Iterator[pb.StreamRerankRequest]:
    yield pb.StreamRerankRequest(header=pb.RerankRequest(query=QUERY, documents=documents[:1], top_n=2))
    yield pb.StreamRerankRequest(documents=pb.DocumentChunk(documents=documents[1:]))


def test_the_request_id_sent_comes_back_and_names_the_calls_log_line(traced: ServerProcess) -> None:
    sent = new_id()
    channel, reranker = stub(traced)
    with channel:
        response, call = reranker.Rerank.with_call(
            pb.RerankRequest(query=QUERY, documents=DOCUMENTS), metadata=[(REQUEST_ID, sent)], timeout=60
        )
    assert returned_id(call.trailing_metadata()) == sent
    line = call_line(traced, sent)
    assert (line["level"], line["message"], line["method"], line["code"]) == ("INFO", "call", "Rerank", "OK")
    assert (line["model"], line["documents"], line["tokens"]) == ("tiny", 3, response.usage.tokens)
    assert response.usage.tokens > 0
    for phase in ("tokenize_ms", "queue_ms", "inference_ms"):
        assert line[phase] == pytest.approx(getattr(response.timings, phase), abs=0.01)
    assert line["total_ms"] >= line["inference_ms"] > 0
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    assert is_generated(line["trace_id"])  # tracing is on: the line names the call's trace

    by_client = new_id()  # the client's own metadata option names the call just the same
    with RerankerClient(traced.target, metadata=[(REQUEST_ID, by_client)], timeout=60) as client:
        client.rerank(QUERY, DOCUMENTS, top_n=1)
    assert call_line(traced, by_client)["code"] == "OK"


@pytest.mark.parametrize("sent", [None, "not a sane id", "x" * 129], ids=["none", "spaces", "too-long"])
def test_a_call_without_a_sane_request_id_gets_a_fresh_one(traced: ServerProcess, sent: str | None) -> None:
    channel, reranker = stub(traced)
    with channel:
        _, call = reranker.Rerank.with_call(
            pb.RerankRequest(query=QUERY, documents=DOCUMENTS),
            metadata=[(REQUEST_ID, sent)] if sent else None,
            timeout=60,
        )
    generated = returned_id(call.trailing_metadata())
    assert is_generated(generated) and generated != sent
    assert call_line(traced, generated)["code"] == "OK"


def test_a_failed_call_gets_its_id_back_and_its_log_line(traced: ServerProcess) -> None:
    invalid, unserved = new_id(), new_id()
    channel, reranker = stub(traced)
    with channel:
        with pytest.raises(grpc.RpcError) as refused:
            reranker.Rerank(
                pb.RerankRequest(query=" ", documents=DOCUMENTS), metadata=[(REQUEST_ID, invalid)]
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert returned_id(refused.value.trailing_metadata()) == invalid
        with pytest.raises(grpc.RpcError) as not_found:
            reranker.Rerank(
                pb.RerankRequest(query=QUERY, documents=DOCUMENTS, model=f"no-{MARKER}"),
                metadata=[(REQUEST_ID, unserved)],
            )
        assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
        assert returned_id(not_found.value.trailing_metadata()) == unserved
    line = call_line(traced, invalid)
    assert (line["code"], line["model"], line["documents"], line["tokens"]) == (
        "INVALID_ARGUMENT",
        "tiny",
        3,
        0,
    )
    line = call_line(traced, unserved)
    assert (line["code"], line["model"]) == ("NOT_FOUND", "")  # never the caller's unchecked name
    assert traced.metric("rerank_requests_total", {"code": "NOT_FOUND", "model": ""}) >= 1
    assert traced.metric("rerank_requests_total", {"code": "OK", "model": "tiny", "method": "Rerank"}) >= 1
    assert traced.metric("rerank_request_duration_seconds_count", {"model": "tiny"}) >= 1


def test_a_stream_returns_its_id_when_accepted_and_at_its_end(traced: ServerProcess) -> None:
    sent = new_id()
    channel, reranker = stub(traced)
    with channel:
        responses = reranker.StreamRerank(stream_messages(DOCUMENTS * 3), metadata=[(REQUEST_ID, sent)])
        assert returned_id(responses.initial_metadata()) == sent
        final = [r for r in responses if r.WhichOneof("kind") == "final"]
        assert returned_id(responses.trailing_metadata()) == sent
    assert len(final) == 1
    line = call_line(traced, sent)
    assert (line["method"], line["code"], line["model"], line["documents"]) == (
        "StreamRerank",
        "OK",
        "tiny",
        9,
    )
    assert line["tokens"] == final[0].final.usage.tokens > 0


def test_a_calls_spans_reach_the_collector_under_the_callers_trace(
    traced: ServerProcess, collector: tuple[Collector, int]
) -> None:
    spans, _ = collector
    trace_id, parent_id, sent = secrets.token_hex(16), secrets.token_hex(8), new_id()
    channel, reranker = stub(traced)
    with channel:
        reranker.Rerank(
            pb.RerankRequest(query=QUERY, documents=DOCUMENTS),
            metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01"), (REQUEST_ID, sent)],
            timeout=60,
        )
    received = spans.trace(trace_id, 4)
    by_name = {span.name: span for _, span in received}
    assert set(by_name) == {"rerank.v1.Reranker/Rerank", "tokenize", "queue", "inference"}
    call = by_name["rerank.v1.Reranker/Rerank"]
    assert call.kind == Span.SpanKind.SPAN_KIND_SERVER
    assert call.parent_span_id.hex() == parent_id
    for phase in ("tokenize", "queue", "inference"):
        assert by_name[phase].parent_span_id == call.span_id
    assert attributes(call.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "rerank.v1.Reranker",
        "rpc.method": "Rerank",
        "rpc.grpc.status_code": 0,
        "rerank.model": "tiny",
        "rerank.documents": 3,
        "rerank.tokens": call_line(traced, sent)["tokens"],
        "rerank.request_id": sent,
    }
    assert {resource["service.name"] for resource, _ in received} == {SERVICE_NAME}
    assert call_line(traced, sent)["trace_id"] == trace_id
    assert all(MARKER not in str(span) for _, span in received)


def test_no_request_text_reaches_the_log_and_every_line_is_json(traced: ServerProcess) -> None:
    ids = [new_id() for _ in range(3)]
    channel, reranker = stub(traced)
    with channel:
        reranker.Rerank(pb.RerankRequest(query=QUERY, documents=DOCUMENTS), metadata=[(REQUEST_ID, ids[0])])
        list(reranker.StreamRerank(stream_messages(DOCUMENTS), metadata=[(REQUEST_ID, ids[1])]))
        with pytest.raises(grpc.RpcError):
            too_long = pb.RerankRequest(query=QUERY, documents=DOCUMENTS, max_length=1_000_000)
            reranker.Rerank(too_long, metadata=[(REQUEST_ID, ids[2])])
    for request_id in ids:
        call_line(traced, request_id)
    log = traced.log()
    assert MARKER not in log
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(record.get("replica") == "m0/0" for record in records)  # the workers log JSON too


def test_request_text_is_logged_only_when_asked_for_and_cut_short(
    start_server: StartServer, bert_cross_encoder_dir: Path
) -> None:
    server = start_server(
        "--model", str(bert_cross_encoder_dir), "--log-format", "json", "--log-request-text"
    )
    documents = [f"{MARKER} {i} " + "leaf " * 100 for i in range(5)]
    sent = new_id()
    with RerankerClient(server.target, metadata=[(REQUEST_ID, sent)], timeout=60) as client:
        client.rerank(QUERY, documents)
    line = call_line(server, sent)
    assert line["query"] == QUERY
    assert line["first_documents"] == [document[:200] for document in documents[:3]]
