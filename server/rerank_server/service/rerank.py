"""The data plane: validate, build rows off the event loop, queue them, combine and rank the scores.

Transport-neutral: takes `RerankQuery`, returns `RerankResult`; the gRPC edge converts protobuf on
either side. It speaks of documents (what users and limits count); the queue counts rows.

Requests take turns at the tokenizer: each tokenizes its documents in slices, one executor job at a
time, so a small request waits for at most one slice of each large one, not for all of it.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial

import numpy as np

from rerank_server.errors import InvalidRequestError, NoReplicaError
from rerank_server.families.base import PairTooLongError, Row, RowOptions
from rerank_server.models.registry import ModelRegistry
from rerank_server.ranking import order
from rerank_server.service.request import (
    MIB,
    Prepared,
    check_reply_size,
    ms_since,
    text_bytes,
    timings_of,
    usage_of,
)
from rerank_server.service.stream import StreamSession
from rerank_server.types import ModelInfo, RankedDocument, RerankQuery, RerankResult

# A tokenizer job holds at most this many documents, or about this many characters (one document
# at least): large enough that slicing costs nothing measurable, small enough to take turns often.
SLICE_DOCUMENTS = 256
SLICE_CHARACTERS = 256 * 1024


@dataclass(frozen=True)
class RequestLimits:
    max_documents: int
    max_stream_top_n: int
    stream_window: int
    chunk_overlap: int = 64
    max_chunks: int = 10
    max_query_chars: int = 20_000
    max_document_chars: int = 200_000
    max_message_bytes: int = 64 * MIB  # the largest reply the server may send


class RerankService:
    def __init__(self, models: ModelRegistry, limits: RequestLimits, tokenize_executor: Executor) -> None:
        self.models = models
        self._limits = limits
        self._executor = tokenize_executor
        self.draining = False  # set on SIGTERM/SIGINT: calls in flight finish, new ones go elsewhere

    def list_models(self) -> list[ModelInfo]:
        return [model.info() for model in self.models]

    async def rerank(self, request: RerankQuery, timeout: float | None) -> RerankResult:
        started = time.perf_counter()
        prepared = self.prepare(request, streaming=False)
        if not request.documents:
            raise InvalidRequestError("documents is empty: send at least one document")
        if len(request.documents) > self._limits.max_documents:
            raise InvalidRequestError(
                f"{len(request.documents)} documents exceed the limit of {self._limits.max_documents} "
                "per Rerank request; use StreamRerank for larger sets"
            )
        if request.return_documents:
            self._check_reply_size(prepared, request.documents)
        scheduler = prepared.model.scheduler
        scheduler.check_room(len(request.documents))
        tokenize_started = time.perf_counter()
        rows = await self.build_rows(prepared, request.documents, first_document=0)
        tokenize_ms = ms_since(tokenize_started)

        raw = np.full(len(request.documents), -np.inf, dtype=np.float32)

        def collect(documents: list[int], scores: list[float]) -> None:
            np.maximum.at(raw, documents, scores)  # a chunked document scores as its best window

        ticket = scheduler.open(collect, timeout)
        try:
            scheduler.submit(ticket, rows)
            await ticket.wait_until_pending_at_most(0)
        finally:
            scheduler.close(ticket)
        scores = prepared.reported(raw).tolist()
        ranked = [
            RankedDocument(i, scores[i], request.documents[i] if request.return_documents else None)
            for i in order(raw, request.top_n).tolist()
        ]
        return RerankResult(
            results=ranked,
            model=prepared.model.name,
            usage=usage_of(rows, len(request.documents)),
            timings=timings_of(ticket, tokenize_ms, started),
        )

    def _check_reply_size(self, prepared: Prepared, documents: Sequence[str]) -> None:
        """Refuse, before any work, a reply whose documents could not be sent: the top_n largest
        (or all) of them, as any top_n may be the best."""
        top_n = prepared.request.top_n
        sizes = [text_bytes(document) for document in documents]
        returned = heapq.nlargest(top_n, sizes) if 0 < top_n < len(sizes) else sizes
        check_reply_size(sum(returned), len(returned), prepared.model.name, self._limits.max_message_bytes)

    def stream_rerank(
        self,
        header: RerankQuery,
        more_documents: AsyncIterator[list[str]],
        timeout: float | None,
        idle_timeout: float | None = None,
    ) -> AsyncGenerator[list[RankedDocument] | RerankResult, None]:
        """Scored documents as they finish, then the final top_n (see StreamSession)."""
        prepared = self.prepare(header, streaming=True)
        session = StreamSession(
            prepared,
            partial(self.build_rows, prepared),
            self._limits.stream_window,
            idle_timeout=idle_timeout,
            max_reply_bytes=self._limits.max_message_bytes,
        )
        return session.run(more_documents, timeout)

    def check_stream(self, header: RerankQuery) -> None:
        """Refuse a stream whose header is invalid, or that no replica could serve, before the
        client sends the rest (a full queue only holds a stream back)."""
        prepared = self.prepare(header, streaming=True)
        prepared.model.scheduler.check_room(len(header.documents), bulk=True)

    def prepare(self, request: RerankQuery, *, streaming: bool) -> Prepared:
        """Validate what does not depend on the documents; resolve the options against the model."""
        if self.draining:
            raise NoReplicaError("the server is draining; retry on another replica")
        model = self.models.get(request.model)
        spec = model.spec
        if not request.query.strip():
            raise InvalidRequestError("query is empty")
        limit = self._limits.max_query_chars
        for name, text in (("query", request.query), ("instruction", request.instruction)):
            if len(text) > limit:
                raise InvalidRequestError(
                    f"the {name} has {len(text)} characters; the limit is {limit} (max_query_chars)"
                )
        if streaming and not 1 <= request.top_n <= self._limits.max_stream_top_n:
            raise InvalidRequestError(
                f"StreamRerank needs top_n between 1 and {self._limits.max_stream_top_n} (got "
                f"{request.top_n}); every score is also streamed in `scored` messages"
            )
        max_length = request.max_length or model.default_max_length
        if max_length > model.max_length_limit:
            raise InvalidRequestError(
                f"max_length {max_length} exceeds the limit of {model.max_length_limit} "
                f"for model {model.name!r}"
            )
        if max_length < spec.min_max_length:
            raise InvalidRequestError(
                f"max_length {max_length} is below {spec.min_max_length}, "
                f"too short to hold the query and document tokens for model {model.name!r}"
            )
        if request.instruction and spec.default_instruction is None:
            raise InvalidRequestError(
                f"model {model.name!r} ({spec.family}) takes no instruction; leave instruction empty"
            )
        cutoff = request.cutoff_layer
        if spec.cutoff_layers is None:
            if cutoff:
                raise InvalidRequestError(
                    f"cutoff_layer is for layerwise models; model {model.name!r} is a {spec.family}: "
                    "leave it 0"
                )
        else:
            low, high = spec.cutoff_layers
            if cutoff and not low <= cutoff <= high:
                raise InvalidRequestError(
                    f"cutoff_layer {cutoff} is outside [{low}, {high}] for model {model.name!r} "
                    "(0 = the last layer)"
                )
            cutoff = cutoff or high
        options = RowOptions(
            max_length=max_length,
            truncation=request.truncation,
            instruction=request.instruction or spec.default_instruction,
            cutoff_layer=cutoff,
            chunk_overlap=self._limits.chunk_overlap,
            max_chunks=self._limits.max_chunks,
        )
        return Prepared(request, model, options)

    async def build_rows(
        self, prepared: Prepared, documents: Sequence[str], first_document: int
    ) -> list[Row]:
        limit = self._limits.max_document_chars
        for position, document in enumerate(documents):
            if len(document) > limit:
                raise InvalidRequestError(
                    f"document {first_document + position} has {len(document)} characters; the limit "
                    f"is {limit} (max_document_chars)"
                )
        loop = asyncio.get_running_loop()
        rows: list[Row] = []
        for start, end in _slices(documents):
            build = partial(
                prepared.model.rows.rows,
                prepared.request.query,
                documents[start:end],
                prepared.options,
                first_document + start,
            )
            try:
                rows += await loop.run_in_executor(self._executor, build)
            except PairTooLongError as exc:
                raise InvalidRequestError(
                    f"{exc}; allow truncation (TRUNCATION_END or TRUNCATION_CHUNK) or raise max_length"
                ) from exc
        return rows


def _slices(documents: Sequence[str]) -> Iterator[tuple[int, int]]:
    """[start, end) of consecutive slices of at most SLICE_DOCUMENTS documents and, past the first
    document, SLICE_CHARACTERS characters."""
    start = 0
    while start < len(documents):
        end, characters = start + 1, len(documents[start])
        while (
            end < len(documents)
            and end - start < SLICE_DOCUMENTS
            and characters + len(documents[end]) <= SLICE_CHARACTERS
        ):
            characters += len(documents[end])
            end += 1
        yield start, end
        start = end
