"""The data plane: validate, tokenize off the event loop, queue pairs, rank the scores.

Transport-neutral: takes `RerankQuery`, returns `RerankResult`; the gRPC edge
converts protobuf on either side.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from rerank_client.types import ModelInfo, RankedDocument, RerankResult, Timings, Usage

from rerank_server.errors import InvalidRequestError, ModelNotFoundError
from rerank_server.models.base import EncodedPair, ModelSpec, PairEncoder, PairTooLongError
from rerank_server.ranking import TopN, rank
from rerank_server.scheduling.scheduler import Scheduler, Ticket
from rerank_server.types import RerankQuery


@dataclass(frozen=True)
class ServedModel:
    """The model as clients see it, and the limits its requests are held to."""

    name: str
    spec: ModelSpec
    dtype: str
    devices: tuple[str, ...]
    default_max_length: int
    max_length_limit: int


@dataclass(frozen=True)
class RequestLimits:
    max_documents: int
    max_stream_top_n: int
    stream_window: int


class RerankService:
    def __init__(
        self,
        model: ServedModel,
        encoder: PairEncoder,
        scheduler: Scheduler,
        limits: RequestLimits,
        tokenize_executor: Executor,
        ready_replicas: Callable[[], int],
    ) -> None:
        self.model = model
        self._encoder = encoder
        self._scheduler = scheduler
        self._limits = limits
        self._executor = tokenize_executor
        self._ready_replicas = ready_replicas

    def list_models(self) -> list[ModelInfo]:
        ready = self._ready_replicas()
        return [
            ModelInfo(
                name=self.model.name,
                family=self.model.spec.family,
                max_length=self.model.default_max_length,
                max_length_limit=self.model.max_length_limit,
                dtype=self.model.dtype,
                devices=list(self.model.devices),
                replicas=len(self.model.devices),
                ready_replicas=ready,
                ready=ready > 0,
            )
        ]

    async def rerank(self, request: RerankQuery, timeout: float | None) -> RerankResult:
        started = time.perf_counter()
        max_length = self._check(request, streaming=False)
        if not request.documents:
            raise InvalidRequestError("documents is empty: send at least one document")
        if len(request.documents) > self._limits.max_documents:
            raise InvalidRequestError(
                f"{len(request.documents)} documents exceed the limit of {self._limits.max_documents} "
                "per Rerank request; use StreamRerank for larger sets"
            )
        self._scheduler.check_room(len(request.documents))
        tokenize_started = time.perf_counter()
        pairs = await self._encode(request, request.documents, max_length, first_index=0)
        tokenize_ms = _ms_since(tokenize_started)

        raw = np.zeros(len(pairs), dtype=np.float32)

        def collect(indices: list[int], scores: list[float]) -> None:
            raw[indices] = scores

        ticket = self._scheduler.open(collect, timeout)
        try:
            self._scheduler.submit(ticket, pairs, 0)
            await ticket.wait_until_pending_at_most(0)
        finally:
            self._scheduler.close(ticket)
        scores = self._wire_scores(raw, request.raw_scores)
        ranked = rank(
            (
                RankedDocument(i, score, request.documents[i] if request.return_documents else None)
                for i, score in enumerate(scores)
            ),
            request.top_n,
        )
        return RerankResult(
            results=ranked,
            model=self.model.name,
            usage=_usage(pairs),
            timings=_timings(ticket, tokenize_ms, started),
        )

    async def stream_rerank(
        self, header: RerankQuery, more_documents: AsyncIterator[list[str]], timeout: float | None
    ) -> AsyncIterator[list[RankedDocument] | RerankResult]:
        """Yield scored documents as they finish, then the final top_n.

        At most `stream_window` documents are held at once (queued, in a model, or scored but not
        yet sent); past that the server stops reading and gRPC flow control holds the client back.
        """
        started = time.perf_counter()
        max_length = self._check(header, streaming=True)
        window = self._limits.stream_window
        top = TopN(header.top_n)
        texts: dict[int, str] = {}  # documents in flight, kept only to return them in the top_n
        events: asyncio.Queue[list[RankedDocument] | BaseException | None] = asyncio.Queue()
        unsent = 0  # scored, not yet yielded
        totals = _StreamTotals()
        # Submit in quarters of the window, so replicas have work while earlier parts finish.
        step = max(1, window // 4)

        def collect(indices: list[int], raw_scores: list[float]) -> None:
            nonlocal unsent
            scores = self._wire_scores(np.asarray(raw_scores, dtype=np.float32), header.raw_scores)
            chunk = [RankedDocument(i, s) for i, s in zip(indices, scores, strict=True)]
            for result in chunk:
                top.offer(RankedDocument(result.index, result.score, texts.pop(result.index, None)))
            unsent += len(chunk)
            events.put_nowait(chunk)

        ticket = self._scheduler.open(collect, timeout)

        async def read_all() -> None:
            try:
                async for documents in _prepend(header.documents, more_documents):
                    for start in range(0, len(documents), step):
                        part = documents[start : start + step]
                        while ticket.pending + unsent + len(part) > window and (ticket.pending or unsent):
                            ticket.raise_if_failed()
                            ticket.changed.clear()
                            await ticket.changed.wait()
                        first = totals.usage.documents
                        began = time.perf_counter()
                        pairs = await self._encode(header, part, max_length, first_index=first)
                        totals.tokenize_ms += _ms_since(began)
                        if header.return_documents:
                            texts.update(zip(range(first, first + len(part)), part, strict=True))
                        self._scheduler.submit(ticket, pairs, first, admit_over_limit=first > 0)
                        totals.add(_usage(pairs))
                if totals.usage.documents == 0:
                    raise InvalidRequestError("the stream carried no documents")
                await ticket.wait_until_pending_at_most(0)
                events.put_nowait(None)
            except BaseException as exc:  # handed to the response side, which raises it
                events.put_nowait(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

        reader = asyncio.create_task(read_all())
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                unsent -= len(event)
                ticket.changed.set()  # room in the window: wake the reader
                yield event
        finally:
            reader.cancel()
            self._scheduler.close(ticket)
        yield RerankResult(
            results=top.results(),
            model=self.model.name,
            usage=totals.usage,
            timings=_timings(ticket, totals.tokenize_ms, started),
        )

    def check_stream(self, header: RerankQuery) -> None:
        """Refuse a stream whose header is invalid, or whose first documents the queue cannot take,
        before the client sends the rest."""
        self._check(header, streaming=True)
        self._scheduler.check_room(len(header.documents))

    def _check(self, request: RerankQuery, *, streaming: bool) -> int:
        """Validate what does not depend on the documents; return the pair's max_length."""
        if request.model not in ("", self.model.name):
            raise ModelNotFoundError(
                f"model {request.model!r} is not served here; served: {self.model.name!r}"
            )
        if not request.query.strip():
            raise InvalidRequestError("query is empty")
        if streaming and not 1 <= request.top_n <= self._limits.max_stream_top_n:
            raise InvalidRequestError(
                f"StreamRerank needs top_n between 1 and {self._limits.max_stream_top_n} (got "
                f"{request.top_n}); every score is also streamed in `scored` messages"
            )
        if request.max_length == 0:
            return self.model.default_max_length
        if request.max_length > self.model.max_length_limit:
            raise InvalidRequestError(
                f"max_length {request.max_length} exceeds the limit of {self.model.max_length_limit} "
                f"for model {self.model.name!r}"
            )
        if request.max_length < self.model.spec.min_max_length:
            raise InvalidRequestError(
                f"max_length {request.max_length} is below {self.model.spec.min_max_length}, "
                "too short to hold the query and document tokens"
            )
        return request.max_length

    async def _encode(
        self, request: RerankQuery, documents: Sequence[str], max_length: int, *, first_index: int
    ) -> list[EncodedPair]:
        encode = partial(
            self._encoder.encode,
            request.query,
            documents,
            max_length=max_length,
            truncate=request.truncate,
            first_index=first_index,
        )
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, encode)
        except PairTooLongError as exc:
            raise InvalidRequestError(f"{exc}; allow truncation or raise max_length") from exc

    def _wire_scores(self, raw: np.ndarray, raw_scores: bool) -> list[float]:
        """Scores as the client will read them (float32), so ranking ties match what it sees."""
        if raw_scores:
            return raw.astype(np.float32).tolist()
        normalize = self._encoder.normalize
        return np.asarray([normalize(float(s)) for s in raw], dtype=np.float32).tolist()


@dataclass
class _StreamTotals:
    usage: Usage = field(default_factory=Usage)
    tokenize_ms: float = 0.0

    def add(self, usage: Usage) -> None:
        self.usage = Usage(
            self.usage.documents + usage.documents,
            self.usage.tokens + usage.tokens,
            self.usage.truncated + usage.truncated,
        )


async def _prepend(first: list[str], rest: AsyncIterator[list[str]]) -> AsyncIterator[list[str]]:
    if first:
        yield first
    async for documents in rest:
        if documents:
            yield documents


def _usage(pairs: Sequence[EncodedPair]) -> Usage:
    return Usage(
        documents=len(pairs),
        tokens=sum(len(p.input_ids) for p in pairs),
        truncated=sum(p.truncated for p in pairs),
    )


def _timings(ticket: Ticket, tokenize_ms: float, started: float) -> Timings:
    dispatched = ticket.first_dispatch_at
    queue_ms = 1000 * (dispatched - ticket.opened_at) if dispatched is not None else 0.0
    inference_ms = (
        1000 * (ticket.last_score_at - dispatched)
        if dispatched is not None and ticket.last_score_at is not None
        else 0.0
    )
    return Timings(tokenize_ms, queue_ms, inference_ms, _ms_since(started))


def _ms_since(start: float) -> float:
    return 1000 * (time.perf_counter() - start)
