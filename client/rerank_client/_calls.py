"""What each call sends, checked before anything is sent, and how a stream's replies are read.

Shared by the blocking and the asyncio client, so both check, send and read alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grpc
from rerank.v1 import reranker_pb2 as pb

from rerank_client import _convert
from rerank_client.errors import InternalError
from rerank_client.types import RankedDocument, RerankResult, Truncation

# END goes as UNSPECIFIED, the server's documented default, as it did before the enum had CHUNK.
_WIRE_TRUNCATION = {
    Truncation.END: pb.TRUNCATION_UNSPECIFIED,
    Truncation.NONE: pb.TRUNCATION_NONE,
    Truncation.CHUNK: pb.TRUNCATION_CHUNK,
}

OnScored = Callable[[list[RankedDocument]], object]


def rerank_request(
    query: str,
    documents: Iterable[str],
    *,
    top_n: int,
    model: str,
    return_documents: bool,
    raw_scores: bool,
    max_length: int,
    truncation: Truncation | str,
    instruction: str,
    cutoff_layer: int,
) -> pb.RerankRequest:
    """The request of Rerank, checked; for a StreamRerank, its options (stream_header adds documents)."""
    _reject_bare_string(documents)
    return pb.RerankRequest(
        model=model,
        query=query,
        documents=documents,
        top_n=top_n,
        return_documents=return_documents,
        raw_scores=raw_scores,
        max_length=max_length,
        truncation=_WIRE_TRUNCATION[_truncation(truncation)],
        instruction=instruction,
        cutoff_layer=cutoff_layer,
    )


def check_stream(documents: object, chunk_size: int) -> None:
    """Refuse a stream's arguments before any document is read."""
    _reject_bare_string(documents)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")


def stream_header(request: pb.RerankRequest, first_chunk: list[str]) -> pb.StreamRerankRequest:
    """The first message of a StreamRerank: the options of `request` and the first documents."""
    request.documents.extend(first_chunk)
    return pb.StreamRerankRequest(header=request)


def documents_chunk(documents: Iterable[str]) -> pb.StreamRerankRequest:
    """A StreamRerank message carrying more documents after the header."""
    return pb.StreamRerankRequest(documents=pb.DocumentChunk(documents=documents))


class StreamReplies:
    """The replies of one StreamRerank, over its attempts: scored batches go to `on_scored`, the final
    result is kept."""

    def __init__(self, on_scored: OnScored | None) -> None:
        self._on_scored = on_scored
        self._final: pb.RerankResponse | None = None
        self.responded = False  # once true, the stream is under way: it is not retried

    def take(self, reply: pb.StreamRerankResponse) -> object:
        """Keep the final result, or pass scored documents to `on_scored` and return what it returned
        (the asyncio client awaits it when it is awaitable)."""
        self.responded = True
        if reply.HasField("final"):
            self._final = reply.final
        elif self._on_scored is not None:
            return self._on_scored(_convert.ranked_documents(reply.scored.results))
        return None

    def result(self) -> RerankResult:
        """The final result; the server ending the stream without one broke the protocol."""
        if self._final is None:
            raise InternalError(
                grpc.StatusCode.INTERNAL, "the server ended StreamRerank without its final response"
            )
        return _convert.rerank_result(self._final)


def _truncation(value: Truncation | str) -> Truncation:
    """`value` as a Truncation; an unknown one raises ValueError here, before any document is read."""
    try:
        return Truncation(value)
    except ValueError:
        choices = ", ".join(repr(t.value) for t in Truncation)
        raise ValueError(f"truncation must be one of {choices}, got {value!r}") from None


def _reject_bare_string(documents: object) -> None:
    """A str is an iterable of str: passed as `documents` it would rerank its characters."""
    if isinstance(documents, str):
        raise TypeError("documents must be a collection of strings, not a single str")
