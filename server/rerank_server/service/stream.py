"""One StreamRerank: documents in as the client sends them, scored documents out as they finish.

At most `window` documents are held at once (being tokenized, queued, in a model, or scored but not
yet sent); past that the session stops reading and gRPC flow control holds the client back. A part
waits, too, while the queue has no room for it (a stream is bulk work: held back, never refused).
A chunked document is sent once all its windows are scored, with its best window's score.

A stream ends with DEADLINE_EXCEEDED when its client sends nothing for `idle_timeout` while the
session waits for it with nothing of its own in progress; with return_documents, as soon as the
texts of its top_n would make a final reply larger than `max_reply_bytes`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

import numpy as np

from rerank_server.errors import DeadlineExceededError, InvalidRequestError
from rerank_server.families.base import Row
from rerank_server.ranking import TopN
from rerank_server.scheduling.scheduler import Ticket
from rerank_server.service.request import (
    Prepared,
    check_reply_size,
    ms_since,
    text_bytes,
    timings_of,
    usage_of,
)
from rerank_server.types import RankedDocument, RerankResult, Usage

# (documents, index of the first in the stream) -> their rows
RowSource = Callable[[Sequence[str], int], Awaitable[list[Row]]]
StreamEvent = list[RankedDocument] | BaseException | None


class StreamSession:
    def __init__(
        self,
        prepared: Prepared,
        build_rows: RowSource,
        window: int,
        *,
        idle_timeout: float | None = None,
        max_reply_bytes: int | None = None,
    ) -> None:
        self._prepared = prepared
        self._build_rows = build_rows
        self._window = window
        self._idle_timeout = idle_timeout
        self._max_reply_bytes = max_reply_bytes
        # Submit in quarters of the window, so replicas have work while earlier parts finish.
        self._step = max(1, window // 4)
        self._top = TopN(prepared.request.top_n)
        self._top_text_bytes = 0  # texts the top_n holds, for the final reply's size
        self._texts: dict[int, str] = {}  # documents in flight, kept only to return them in the top_n
        self._best: dict[int, float] = {}  # documents in flight: their best window's raw score so far
        self._remaining: dict[int, int] = {}  # documents in flight: windows not scored yet
        self._unsent = 0  # documents scored, not yet yielded
        self._events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._ticket: Ticket | None = None
        self._last_progress = time.monotonic()  # a message in, scores back, or an event taken
        self.usage = Usage()
        self.tokenize_ms = 0.0

    @property
    def in_flight(self) -> int:
        """Documents read and not yet sent back."""
        return len(self._remaining) + self._unsent

    async def run(
        self, more_documents: AsyncIterator[list[str]], timeout: float | None
    ) -> AsyncGenerator[list[RankedDocument] | RerankResult, None]:
        """Yield scored documents as they finish, then the final top_n."""
        started = time.perf_counter()
        scheduler = self._prepared.model.scheduler
        # A failure reaches the response side at once, even while the reader waits on the client.
        ticket = scheduler.open(self._collect, timeout, on_failure=self._events.put_nowait, bulk=True)
        self._ticket = ticket
        reader = asyncio.create_task(self._read_all(ticket, more_documents))
        try:
            while (event := await self._events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                self._unsent -= len(event)
                ticket.changed.set()  # room in the window: wake the reader
                yield event
                self._last_progress = time.monotonic()  # the client reads
        finally:
            reader.cancel()
            scheduler.close(ticket)
        yield RerankResult(
            results=self._top.results(),
            model=self._prepared.model.name,
            usage=self.usage,
            timings=timings_of(ticket, self.tokenize_ms, started),
        )

    def _collect(self, documents: list[int], raw_scores: list[float]) -> None:
        """Scores of rows from the scheduler; a document is done when its last window is."""
        self._last_progress = time.monotonic()
        done: list[int] = []
        done_raw: list[float] = []
        for document, raw in zip(documents, raw_scores, strict=True):
            best = max(self._best.pop(document, -math.inf), raw)
            left = self._remaining.pop(document) - 1
            if left:
                self._best[document], self._remaining[document] = best, left
            else:
                done.append(document)
                done_raw.append(best)
        if not done:
            return
        scores = self._prepared.reported(np.asarray(done_raw, dtype=np.float32)).tolist()
        for document, raw, score in zip(done, done_raw, scores, strict=True):
            text = self._texts.pop(document, None)
            left_out = self._top.offer(raw, RankedDocument(document, score, text))
            if text is not None:
                self._count_top_text(text, left_out)
        self._unsent += len(done)
        self._events.put_nowait([RankedDocument(d, s) for d, s in zip(done, scores, strict=True)])

    def _count_top_text(self, text: str, left_out: RankedDocument | None) -> None:
        """Keep the size of the texts the top_n holds; fail the stream once its final reply could
        not be sent."""
        self._top_text_bytes += text_bytes(text)
        if left_out is not None and left_out.document is not None:
            self._top_text_bytes -= text_bytes(left_out.document)
        if self._max_reply_bytes is None or self._ticket is None:
            return
        request = self._prepared.request
        try:
            check_reply_size(
                self._top_text_bytes, request.top_n, self._prepared.model.name, self._max_reply_bytes
            )
        except InvalidRequestError as exc:
            self._ticket.fail(exc)

    async def _read_all(self, ticket: Ticket, more_documents: AsyncIterator[list[str]]) -> None:
        header = self._prepared.request
        scheduler = self._prepared.model.scheduler
        messages = _prepend(header.documents, more_documents)
        try:
            while (documents := await self._next_message(messages, ticket)) is not None:
                for start in range(0, len(documents), self._step):
                    part = documents[start : start + self._step]
                    while self.in_flight + len(part) > self._window and self.in_flight:
                        ticket.raise_if_failed()
                        ticket.changed.clear()
                        await ticket.changed.wait()
                    first = self.usage.documents
                    began = time.perf_counter()
                    rows = await self._build_rows(part, first)
                    self.tokenize_ms += ms_since(began)
                    await scheduler.wait_for_room(ticket, rows)
                    if header.return_documents:
                        self._texts.update(zip(range(first, first + len(part)), part, strict=True))
                    for row in rows:
                        self._remaining[row.document] = self._remaining.get(row.document, 0) + 1
                    scheduler.submit(ticket, rows)
                    self.usage += usage_of(rows, len(part))
            if self.usage.documents == 0:
                raise InvalidRequestError("the stream carried no documents")
            await ticket.wait_until_pending_at_most(0)
            self._events.put_nowait(None)
        except BaseException as exc:  # handed to the response side, which raises it
            self._events.put_nowait(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _next_message(self, messages: AsyncIterator[list[str]], ticket: Ticket) -> list[str] | None:
        """The client's next documents (None once it is done). The client is idle, and the stream
        ends, when it sends nothing for idle_timeout while the stream has no pairs unscored and no
        scores unsent: waiting on its own work is not idle."""
        if self._idle_timeout is None:
            return await anext(messages, None)
        self._last_progress = time.monotonic()
        arrival = asyncio.ensure_future(anext(messages, None))
        try:
            while True:
                busy = ticket.pending > 0 or self._unsent > 0
                wait = self._idle_timeout
                if not busy:
                    wait = self._last_progress + self._idle_timeout - time.monotonic()
                    if wait <= 0:
                        raise DeadlineExceededError(
                            f"the client sent nothing for {self._idle_timeout:g} s while the stream "
                            "waited for it (stream_idle_timeout_s)"
                        )
                done, _ = await asyncio.wait({arrival}, timeout=wait)
                if done:
                    self._last_progress = time.monotonic()
                    return arrival.result()
        finally:
            arrival.cancel()


async def _prepend(first: list[str], rest: AsyncIterator[list[str]]) -> AsyncIterator[list[str]]:
    if first:
        yield first
    async for documents in rest:
        if documents:
            yield documents
