"""An in-process Reranker server for client tests: deterministic scores, recorded calls, planned failures.

A document's score is its length, so every expected result can be computed from the inputs.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from rerank.v1 import reranker_pb2 as pb
from rerank.v1 import reranker_pb2_grpc

MODEL = "fake-model"
TIMINGS = pb.Timings(tokenize_ms=1.25, queue_ms=2.5, inference_ms=5.0, total_ms=9.0)
MODELS = (
    pb.ModelInfo(
        name=MODEL,
        family="cross-encoder",
        max_length=512,
        max_length_limit=1024,
        dtype="float32",
        devices=["cpu:0", "cpu:1"],
        replicas=2,
        ready_replicas=1,
        ready=True,
        takes_instruction=True,
        default_instruction="Given a query, find the passages that answer it",
    ),
    pb.ModelInfo(name="other", family="bi-encoder", max_length=256, max_length_limit=256, dtype="bfloat16"),
    pb.ModelInfo(
        name="layerwise",
        family="minicpm-layerwise",
        max_length=1024,
        max_length_limit=8192,
        dtype="bfloat16",
        devices=["cuda:0"],
        replicas=1,
        ready_replicas=1,
        ready=True,
        min_cutoff_layer=8,
        max_cutoff_layer=40,
    ),
)


def score(document: str) -> float:
    return float(len(document))


def ranked(query: str, documents: list[str], request: pb.RerankRequest) -> pb.RerankResponse:
    """What the fake answers for `documents`: sorted by score descending, ties by index."""
    order = sorted(range(len(documents)), key=lambda i: (-score(documents[i]), i))
    if request.top_n:
        order = order[: request.top_n]
    results = [
        pb.RankedDocument(
            index=i, score=score(documents[i]), document=documents[i] if request.return_documents else None
        )
        for i in order
    ]
    tokens = sum(len(query) + len(document) for document in documents)
    # A pair's length is len(query) + len(document); CHUNK splits a long one into that many windows.
    windows = [
        -(-(len(query) + len(d)) // request.max_length) if request.max_length else 1 for d in documents
    ]
    long = sum(n > 1 for n in windows)
    chunk = request.truncation == pb.TRUNCATION_CHUNK
    return pb.RerankResponse(
        results=results,
        model=request.model or MODEL,
        usage=pb.Usage(
            documents=len(documents),
            tokens=tokens,
            truncated=0 if chunk else long,
            chunked=long if chunk else 0,
            windows=sum(windows) if chunk else len(documents),
        ),
        timings=TIMINGS,
    )


@dataclass
class Failure:
    """Abort a call with `code`; StreamRerank first reads `after_messages` messages (and echoes them)."""

    code: grpc.StatusCode
    message: str
    after_messages: int = 0


class FakeReranker(reranker_pb2_grpc.RerankerServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: collections.Counter[str] = collections.Counter()
        self.requests: list[pb.RerankRequest] = []  # Rerank requests, and StreamRerank headers
        self.metadata: list[dict[str, str]] = []
        self.time_remaining: list[float | None] = []
        self.failures: dict[str, list[Failure]] = collections.defaultdict(list)
        self.stream_echo = True  # send a `scored` message per request message
        self.stream_final = True

    def fail(self, method: str, failure: Failure, times: int = 1) -> None:
        """The next `times` calls of `method` fail as `failure` says."""
        self.failures[method].extend([failure] * times)

    def _begin(self, method: str, context: grpc.ServicerContext) -> Failure | None:
        with self.lock:
            self.attempts[method] += 1
            self.metadata.append(dict(context.invocation_metadata()))  # type: ignore[arg-type]
            self.time_remaining.append(context.time_remaining())
            return self.failures[method].pop(0) if self.failures[method] else None

    def Rerank(self, request: pb.RerankRequest, context: grpc.ServicerContext) -> pb.RerankResponse:
        failure = self._begin("Rerank", context)
        self.requests.append(request)
        if failure is not None:
            context.abort(failure.code, failure.message)
        return ranked(request.query, list(request.documents), request)

    def StreamRerank(
        self, request_iterator: Iterator[pb.StreamRerankRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.StreamRerankResponse]:
        failure = self._begin("StreamRerank", context)
        if failure is not None and failure.after_messages == 0:
            # Refuse once the header is read, as rerank-server does: aborting while the client
            # still writes its first message races in gRPC core (grpc issue 36066).
            next(request_iterator, None)
            context.abort(failure.code, failure.message)
        header: pb.RerankRequest | None = None
        documents: list[str] = []
        for n, message in enumerate(request_iterator, start=1):
            if header is None:
                header = message.header
                self.requests.append(header)
                context.send_initial_metadata(())  # accepted, as rerank-server does
                chunk = list(header.documents)
            else:
                chunk = list(message.documents.documents)
            start = len(documents)
            documents.extend(chunk)
            if self.stream_echo:
                scored = [pb.RankedDocument(index=start + i, score=score(d)) for i, d in enumerate(chunk)]
                yield pb.StreamRerankResponse(scored=pb.ScoredChunk(results=scored))
            if failure is not None and failure.after_messages == n:
                # Read the rest first: aborting while the client still writes races in gRPC core,
                # which may then report INTERNAL instead of this status.
                collections.deque(request_iterator, maxlen=0)
                context.abort(failure.code, failure.message)
        if self.stream_final and header is not None:
            yield pb.StreamRerankResponse(final=ranked(header.query, documents, header))

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        failure = self._begin("ListModels", context)
        if failure is not None:
            context.abort(failure.code, failure.message)
        return pb.ListModelsResponse(models=MODELS)


class FakeHealth(health.HealthServicer):
    """The standard health service, whose Check can be told to fail through FakeReranker.fail("Check")."""

    def __init__(self, reranker: FakeReranker) -> None:
        super().__init__()
        self._reranker = reranker

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        failure = self._reranker._begin("Check", context)
        if failure is not None:
            context.abort(failure.code, failure.message)
        return super().Check(request, context)


class FakeServer:
    """A real gRPC server on 127.0.0.1 with FakeReranker and the standard health service."""

    def __init__(self) -> None:
        self.reranker = FakeReranker()
        self.health = FakeHealth(self.reranker)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        # As rerank-server does: a balancing client sends calls only to a server SERVING this service.
        self.health.set("rerank.v1.Reranker", health_pb2.HealthCheckResponse.SERVING)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        reranker_pb2_grpc.add_RerankerServicer_to_server(self.reranker, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)
