"""Protobuf <-> the server's own types; nothing past the edge sees protobuf."""

from __future__ import annotations

from collections.abc import Iterable

from rerank.v1 import reranker_pb2 as pb

from rerank_server.errors import InvalidRequestError
from rerank_server.types import ModelInfo, RankedDocument, RerankQuery, RerankResult, Truncation

_TRUNCATION = {
    pb.TRUNCATION_UNSPECIFIED: Truncation.END,
    pb.TRUNCATION_END: Truncation.END,
    pb.TRUNCATION_NONE: Truncation.NONE,
    pb.TRUNCATION_CHUNK: Truncation.CHUNK,
}


def rerank_query(request: pb.RerankRequest) -> RerankQuery:
    truncation = _TRUNCATION.get(request.truncation)
    if truncation is None:
        raise InvalidRequestError(f"unknown truncation value {request.truncation}")
    return RerankQuery(
        query=request.query,
        documents=documents(request.documents),
        model=request.model,
        top_n=request.top_n,
        return_documents=request.return_documents,
        raw_scores=request.raw_scores,
        max_length=request.max_length,
        truncation=truncation,
        instruction=request.instruction,
        cutoff_layer=request.cutoff_layer,
    )


def documents(texts: Iterable[str]) -> list[str]:
    """Protobuf's strings as Python ones, one at a time: run in a thread (see `servicer`), this
    lets the event loop's thread take the GIL between documents, where `list()` would hold it for
    the whole message (about 40 ms for 64 MiB)."""
    return [text for text in texts]


def ranked_documents(results: list[RankedDocument]) -> list[pb.RankedDocument]:
    return [pb.RankedDocument(index=r.index, score=r.score, document=r.document) for r in results]


def rerank_response(result: RerankResult) -> pb.RerankResponse:
    usage, timings = result.usage, result.timings
    return pb.RerankResponse(
        results=ranked_documents(result.results),
        model=result.model,
        usage=pb.Usage(
            documents=usage.documents,
            tokens=usage.tokens,
            truncated=usage.truncated,
            chunked=usage.chunked,
            windows=usage.windows,
        ),
        timings=pb.Timings(
            tokenize_ms=timings.tokenize_ms,
            queue_ms=timings.queue_ms,
            inference_ms=timings.inference_ms,
            total_ms=timings.total_ms,
        ),
    )


def stream_response(event: list[RankedDocument] | RerankResult) -> pb.StreamRerankResponse:
    if isinstance(event, RerankResult):
        return pb.StreamRerankResponse(final=rerank_response(event))
    return pb.StreamRerankResponse(scored=pb.ScoredChunk(results=ranked_documents(event)))


def list_models_response(models: list[ModelInfo]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                name=m.name,
                family=m.family,
                max_length=m.max_length,
                max_length_limit=m.max_length_limit,
                dtype=m.dtype,
                devices=m.devices,
                replicas=m.replicas,
                ready_replicas=m.ready_replicas,
                ready=m.ready,
                takes_instruction=m.takes_instruction,
                default_instruction=m.default_instruction,
                min_cutoff_layer=m.min_cutoff_layer,
                max_cutoff_layer=m.max_cutoff_layer,
            )
            for m in models
        ]
    )
