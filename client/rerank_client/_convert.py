"""Conversions between wire messages and the typed results, in one place so both clients agree."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rerank.v1 import reranker_pb2 as pb

from rerank_client.types import ModelInfo, RankedDocument, RerankResult, Timings, Truncation, Usage

# END goes as UNSPECIFIED, the server's documented default, as it did before the enum had CHUNK.
_WIRE_TRUNCATION = {
    Truncation.END: pb.TRUNCATION_UNSPECIFIED,
    Truncation.NONE: pb.TRUNCATION_NONE,
    Truncation.CHUNK: pb.TRUNCATION_CHUNK,
}


# What the server may send and take by default (its --max-message-mb): gRPC's own 4 MiB receive
# limit would fail a large reply (return_documents) only after the server did all the work.
MESSAGE_LIMIT = 64 * 1024 * 1024


def channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The caller's channel options over the client's defaults (message limits as the server's)."""
    merged: dict[str, Any] = {
        "grpc.max_receive_message_length": MESSAGE_LIMIT,
        "grpc.max_send_message_length": MESSAGE_LIMIT,
    }
    merged.update(dict(options))
    return list(merged.items())


def truncation(value: Truncation | str) -> Truncation:
    """`value` as a Truncation; an unknown one raises ValueError here, before any document is read."""
    try:
        return Truncation(value)
    except ValueError:
        choices = ", ".join(repr(t.value) for t in Truncation)
        raise ValueError(f"truncation must be one of {choices}, got {value!r}") from None


def rerank_request(
    query: str,
    documents: Iterable[str],
    *,
    top_n: int,
    model: str,
    return_documents: bool,
    raw_scores: bool,
    max_length: int,
    truncation: Truncation,
    instruction: str,
    cutoff_layer: int,
) -> pb.RerankRequest:
    """The request for Rerank, or the header of a StreamRerank (then `documents` is its first chunk)."""
    return pb.RerankRequest(
        model=model,
        query=query,
        documents=documents,
        top_n=top_n,
        return_documents=return_documents,
        raw_scores=raw_scores,
        max_length=max_length,
        truncation=_WIRE_TRUNCATION[truncation],
        instruction=instruction,
        cutoff_layer=cutoff_layer,
    )


def documents_chunk(documents: Iterable[str]) -> pb.StreamRerankRequest:
    """A StreamRerank message carrying more documents after the header."""
    return pb.StreamRerankRequest(documents=pb.DocumentChunk(documents=documents))


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


def reject_bare_string(documents: object) -> None:
    """A str is an iterable of str: passed as `documents` it would rerank its characters."""
    if isinstance(documents, str):
        raise TypeError("documents must be a collection of strings, not a single str")
