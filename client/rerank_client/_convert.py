"""The typed results of the server's replies, in one place so both clients agree."""

from __future__ import annotations

from collections.abc import Iterable

from rerank.v1 import reranker_pb2 as pb

from rerank_client.types import ModelInfo, RankedDocument, RerankResult, Timings, Usage


def ranked_documents(messages: Iterable[pb.RankedDocument]) -> list[RankedDocument]:
    """Typed results; `document` stays None unless the server set it (return_documents)."""
    return [
        RankedDocument(
            index=message.index,
            score=message.score,
            document=message.document if message.HasField("document") else None,
        )
        for message in messages
    ]


def rerank_result(message: pb.RerankResponse) -> RerankResult:
    """The typed result of Rerank, or of StreamRerank's final message."""
    usage, timings = message.usage, message.timings
    return RerankResult(
        results=ranked_documents(message.results),
        model=message.model,
        usage=Usage(
            documents=usage.documents,
            tokens=usage.tokens,
            truncated=usage.truncated,
            chunked=usage.chunked,
            windows=usage.windows,
        ),
        timings=Timings(
            tokenize_ms=timings.tokenize_ms,
            queue_ms=timings.queue_ms,
            inference_ms=timings.inference_ms,
            total_ms=timings.total_ms,
        ),
    )


def model_info(message: pb.ModelInfo) -> ModelInfo:
    """One served model, as ListModels describes it."""
    return ModelInfo(
        name=message.name,
        family=message.family,
        max_length=message.max_length,
        max_length_limit=message.max_length_limit,
        dtype=message.dtype,
        devices=list(message.devices),
        replicas=message.replicas,
        ready_replicas=message.ready_replicas,
        ready=message.ready,
        takes_instruction=message.takes_instruction,
        default_instruction=message.default_instruction,
        min_cutoff_layer=message.min_cutoff_layer,
        max_cutoff_layer=message.max_cutoff_layer,
    )
