"""StreamSession over a real Scheduler and a fake replica pool: every score once, then the top_n; the
window of documents in flight; parts held back while the queue is full; failures, an idle client, a
reply too large and cancellation end the stream and close the request's ticket."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, cast
from unittest import mock

import numpy as np
import pytest
from rerank_server.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NoReplicaError,
    ReplicaLostError,
    RerankServerError,
)
from rerank_server.families.base import ModelSpec, Row, RowOptions, TokenBatch, sigmoid
from rerank_server.metrics import Metrics
from rerank_server.models.registry import ServedModel
from rerank_server.scheduling import scheduler as scheduler_module
from rerank_server.scheduling.batcher import PairQueue
from rerank_server.scheduling.scheduler import Scheduler, ScoreSink, Ticket
from rerank_server.service.request import REPLY_BYTES, RESULT_BYTES, Prepared
from rerank_server.service.stream import StreamSession
from rerank_server.types import RankedDocument, RerankQuery, RerankResult, Usage

SPEC = ModelSpec("tiny", "cross-encoder", 64, 64, 4, pad_token_id=0)
ROW_LENGTH = 4


class FakePool:
    """One-slot replicas that score when told to (or soon after dispatch, with auto): score = a
    row's first token id."""

    def __init__(self, replicas: int = 1, *, auto: bool = False) -> None:
        self.free = dict.fromkeys(range(replicas), True)
        self.ready_count = replicas
        self.auto = auto
        self.scheduler: Scheduler | None = None
        self.sent: list[tuple[int, int, TokenBatch]] = []  # (replica, batch id, batch)

    @property
    def idle_count(self) -> int:
        return sum(self.free.values()) if self.ready_count else 0

    def idle_replica(self, *, busy_ok: bool = True) -> int | None:  # one slot: idle is empty
        idle = [r for r, free in self.free.items() if free]
        return idle[0] if idle and self.ready_count else None

    def busy(self, replica: object) -> bool:
        return not self.free[replica]  # type: ignore[index]

    def dispatch(self, replica: object, batch_id: int, batch: TokenBatch) -> None:
        assert isinstance(replica, int)
        self.free[replica] = False
        self.sent.append((replica, batch_id, batch))
        if self.auto:
            asyncio.get_running_loop().call_soon(self.finish)

    def finish(self, position: int = 0) -> None:
        replica, batch_id, batch = self.sent.pop(position)
        self.free[replica] = True
        assert self.scheduler is not None
        self.scheduler.on_batch_done(batch_id, first_tokens(batch).astype(np.float32), 0.001)

    def finish_token(self, token: int) -> None:
        """Score the batch holding the row whose first token is `token`."""
        self.finish(next(i for i, (_, _, b) in enumerate(self.sent) if token in first_tokens(b)))

    def lose(self, position: int = 0) -> None:
        replica, batch_id, _ = self.sent.pop(position)
        self.free[replica] = True
        assert self.scheduler is not None
        self.scheduler.on_batch_lost(batch_id, "killed")

    @property
    def rows(self) -> int:
        return sum(batch.rows for _, _, batch in self.sent)


def first_tokens(batch: TokenBatch) -> np.ndarray:
    starts = np.cumsum(batch.lengths) - batch.lengths
    return batch.tokens["input_ids"][starts]


def doc(name: str, *raw: int, truncated: bool = False) -> str:
    """A document whose windows score `raw` (one row per score); `!` marks it truncated."""
    return f"{name}:{','.join(map(str, raw))}{'!' if truncated else ''}"


class FakeRows:
    """A row builder that reads each document's window scores from its text."""

    spec = SPEC

    def rows(self, query: str, documents: Sequence[str], options: RowOptions, first: int) -> list[Row]:
        rows = []
        for position, text in enumerate(documents):
            scores = text.split(":")[1]
            for raw in scores.rstrip("!").split(","):
                tokens = np.array([int(raw)] + [1] * (ROW_LENGTH - 1), dtype=np.int32)
                rows.append(Row(first + position, {"input_ids": tokens}, truncated=scores.endswith("!")))
        return rows

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        return sigmoid(raw)


class RecordingScheduler(Scheduler):
    def open(
        self,
        on_scores: ScoreSink,
        timeout: float | None,
        on_failure: Callable[[RerankServerError], None] | None = None,
        *,
        bulk: bool = False,
    ) -> Ticket:
        self.ticket = super().open(on_scores, timeout, on_failure, bulk=bulk)
        return self.ticket


class Rig:
    def __init__(
        self,
        pool: FakePool,
        header: list[str],
        *,
        window: int = 64,
        size: int = 1,
        max_pairs: int = 1000,
        idle_timeout: float | None = None,
        max_reply_bytes: int | None = None,
        **query: Any,
    ) -> None:
        self.pool = pool
        self.queue = PairQueue(max_batch_tokens=1000, max_batch_size=size, max_pairs=max_pairs, max_wait=0.0)
        self.scheduler = RecordingScheduler(SPEC, self.queue, pool, Metrics().for_model("m"))
        pool.scheduler = self.scheduler
        model = ServedModel("m", SPEC, "float32", ("cpu:0",), 64, 64, FakeRows(), self.scheduler, lambda: 1)
        self.prepared = Prepared(RerankQuery("q", header, **query), model, RowOptions(64))

        async def build(documents: Sequence[str], first: int) -> list[Row]:
            await asyncio.sleep(0)  # the hop to the tokenizer's executor
            return model.rows.rows("q", documents, self.prepared.options, first)

        self.session = StreamSession(
            self.prepared, build, window, idle_timeout=idle_timeout, max_reply_bytes=max_reply_bytes
        )

    def run(self, client: Client) -> AsyncGenerator[list[RankedDocument] | RerankResult, None]:
        return cast(AsyncGenerator[Any, None], self.session.run(client.stream(), None))

    @property
    def rows_held(self) -> int:
        """Rows of this stream queued or in a replica."""
        return len(self.queue) + self.pool.rows


class Client:
    """The client's stream of documents after the header; keep_open: it never half-closes."""

    def __init__(self, *messages: list[str], keep_open: bool = False) -> None:
        self.messages = messages
        self.keep_open = keep_open
        self.finished = False

    async def stream(self) -> AsyncIterator[list[str]]:
        try:
            for message in self.messages:
                yield message
            if self.keep_open:
                await asyncio.Event().wait()
        finally:
            self.finished = True


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


def sig(raw: float) -> float:
    return float(sigmoid(np.array([raw], dtype=np.float32))[0])


def scored(event: object) -> list[RankedDocument]:
    assert isinstance(event, list), event
    return event


async def test_every_score_once_then_the_top_n_by_raw_score_with_texts_and_usage() -> None:
    # sigmoid saturates: 30 and 40 both report 1.0, so only the raw score tells them apart.
    texts = [doc("a", 30), doc("b", 3, 40, 7), doc("c", 2), doc("d", 40)]
    texts += [doc("e", 5, truncated=True), doc("f", 30), doc("g", 1)]
    rig = Rig(FakePool(2, auto=True), texts[:2], size=2, top_n=4, return_documents=True)
    events = [e async for e in rig.run(Client(texts[2:5], [], texts[5:]))]
    *updates, final = events
    sent = [r for e in updates for r in scored(e)]
    assert Counter(r.index for r in sent) == Counter(range(7))
    best = [30, 40, 2, 40, 5, 30, 1]
    assert {r.index: r.score for r in sent} == {i: sig(b) for i, b in enumerate(best)}
    assert all(r.document is None for r in sent)
    assert isinstance(final, RerankResult)
    assert [r.index for r in final.results] == [1, 3, 0, 5]
    assert [r.document for r in final.results] == [texts[1], texts[3], texts[0], texts[5]]
    assert [r.score for r in final.results] == [1.0, 1.0, 1.0, 1.0]
    assert final.model == "m"
    assert final.usage == Usage(documents=7, tokens=9 * ROW_LENGTH, truncated=1, chunked=1, windows=9)
    assert rig.scheduler.ticket.closed
    assert rig.scheduler.ticket.bulk  # a stream yields to interactive calls


@pytest.mark.parametrize("raw_scores", [True, False])
async def test_a_chunked_document_is_sent_once_after_its_last_window_with_its_best(raw_scores: bool) -> None:
    rig = Rig(FakePool(4), [doc("a", 2, 8, 5), doc("b", 4)], top_n=2, raw_scores=raw_scores)
    agen = rig.run(Client())
    reported = (lambda raw: float(raw)) if raw_scores else sig
    nxt = asyncio.ensure_future(agen.__anext__())
    await settle()
    assert len(rig.pool.sent) == 4  # every window in a replica
    rig.pool.finish_token(8)
    await settle()
    assert not nxt.done()
    rig.pool.finish_token(4)
    await settle()
    assert nxt.result() == [RankedDocument(1, reported(4))]
    nxt = asyncio.ensure_future(agen.__anext__())
    rig.pool.finish_token(2)
    await settle()
    assert not nxt.done()  # one window of document 0 is still unscored
    rig.pool.finish_token(5)
    await settle()
    assert nxt.result() == [RankedDocument(0, reported(8))]
    final = await agen.__anext__()
    assert isinstance(final, RerankResult)
    assert [(r.index, r.score) for r in final.results] == [(0, reported(8)), (1, reported(4))]
    assert final.usage.windows == 4 and final.usage.chunked == 1
    with pytest.raises(StopAsyncIteration):
        await agen.__anext__()


async def test_the_window_bounds_documents_in_flight_and_the_reader_waits_for_the_consumer() -> None:
    window, step = 8, 2
    texts = [doc(f"d{i}", i, 50 + i) if i % 3 == 0 else doc(f"d{i}", i) for i in range(20)]
    rig = Rig(FakePool(2), [], window=window, size=2, top_n=3)
    agen = rig.run(Client(texts))
    got: list[RankedDocument] = []

    def check() -> None:
        assert rig.session.in_flight <= window
        assert rig.rows_held == rig.scheduler.ticket.pending <= 2 * window

    nxt = asyncio.ensure_future(agen.__anext__())
    await settle()
    assert rig.session.usage.documents == rig.session.in_flight == window  # stopped reading
    check()
    while not nxt.done():
        rig.pool.finish()
        await settle()
        check()
    got.extend(scored(nxt.result()))
    await settle()  # the reader refills the window
    check()
    read = rig.session.usage.documents
    while rig.pool.sent:  # score everything in flight, but consume nothing
        rig.pool.finish()
        await settle()
        check()
    assert rig.rows_held == 0 and rig.session.usage.documents == read  # the reader waits
    while rig.session.in_flight + step > window:  # queued events: this never suspends
        got.extend(scored(await agen.__anext__()))
    assert rig.session.usage.documents == read
    await settle()
    assert rig.session.usage.documents > read  # room again: the reader resumed
    nxt = asyncio.ensure_future(agen.__anext__())
    while True:
        await settle()
        check()
        if nxt.done():
            event = nxt.result()
            if isinstance(event, RerankResult):
                break
            got.extend(scored(event))
            nxt = asyncio.ensure_future(agen.__anext__())
        else:
            rig.pool.finish()
    assert Counter(r.index for r in got) == Counter(range(20))
    assert [r.index for r in event.results] == [18, 15, 12]
    assert event.usage.documents == 20 and event.usage.windows == 27


async def test_a_stream_without_documents_is_invalid() -> None:
    rig = Rig(FakePool(1), [], top_n=1)
    with pytest.raises(InvalidRequestError, match="no documents"):
        async for _ in rig.run(Client([], [])):
            pass
    assert rig.scheduler.ticket.closed


def replicas_gone(pool: FakePool, scheduler: Scheduler) -> None:
    """No replica, and none comes back: past the outage a stream may wait out (here none), it fails."""
    pool.ready_count = 0
    with mock.patch.object(scheduler_module, "BULK_OUTAGE_S", 0.0):
        scheduler.on_replicas_changed(0)


def lost_twice(pool: FakePool, scheduler: Scheduler) -> None:
    pool.lose()
    pool.lose()  # the same rows, retried on the freed replica


def stopping(pool: FakePool, scheduler: Scheduler) -> None:
    scheduler.fail_all(NoReplicaError("the server is stopping"))


FAILURES = [(replicas_gone, NoReplicaError), (lost_twice, ReplicaLostError), (stopping, NoReplicaError)]


@pytest.mark.parametrize(("fail", "error"), FAILURES)
@pytest.mark.parametrize("reader", ["held by the window", "client done", "client still sending"])
async def test_a_failure_surfaces_and_closes_the_ticket(
    fail: Callable[[FakePool, Scheduler], None], error: type[Exception], reader: str
) -> None:
    window = 4 if reader == "held by the window" else 64
    texts = [doc(f"d{i}", 10 + i) for i in range(8)]
    rig = Rig(FakePool(1), texts, window=window, top_n=2)
    agen = rig.run(Client(keep_open=reader == "client still sending"))
    nxt = asyncio.ensure_future(agen.__anext__())
    await settle()
    assert len(rig.queue) > 0  # rows queued behind the one in the replica
    fail(rig.pool, rig.scheduler)
    await asyncio.wait({nxt}, timeout=0.5)
    if not nxt.done():
        nxt.cancel()
        await asyncio.gather(nxt, return_exceptions=True)
        pytest.fail(f"{error.__name__} never reached the consumer ({reader})")
    with pytest.raises(error):
        nxt.result()
    assert rig.scheduler.ticket.closed
    assert len(rig.queue) == 0
    rig.pool.ready_count = 1
    while rig.pool.sent:
        rig.pool.finish()
    rig.scheduler.pump()
    assert rig.pool.sent == []  # nothing of the failed stream reaches a replica
    with pytest.raises(StopAsyncIteration):
        await agen.__anext__()


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_the_consumer_going_away_closes_the_ticket(how: str) -> None:
    texts = [doc(f"d{i}", 10 + i) for i in range(4)]
    rig = Rig(FakePool(1), texts, top_n=2)
    client = Client(keep_open=True)
    agen = rig.run(client)
    nxt = asyncio.ensure_future(agen.__anext__())
    await settle()
    rig.pool.finish()
    await settle()
    assert nxt.result() == [RankedDocument(0, sig(10))]
    assert len(rig.queue) == 2 and len(rig.pool.sent) == 1
    if how == "aclose":
        await agen.aclose()
    else:
        nxt = asyncio.ensure_future(agen.__anext__())
        await settle()
        nxt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await nxt
    await settle()
    assert rig.scheduler.ticket.closed
    assert len(rig.queue) == 0
    assert client.finished  # the reader stopped reading the client's stream
    rig.pool.finish()  # the batch already in a replica
    assert rig.pool.sent == []  # and nothing more of this stream is dispatched


@pytest.mark.parametrize("idle_timeout", [None, 30.0], ids=["no-idle-timeout", "idle-timeout"])
async def test_a_failure_reaches_the_consumer_at_once_while_the_reader_waits_for_the_client(
    idle_timeout: float | None,
) -> None:
    texts = [doc(f"d{i}", 10 + i) for i in range(4)]
    rig = Rig(FakePool(1), texts, top_n=2, idle_timeout=idle_timeout)
    client = Client(keep_open=True)
    agen = rig.run(client)
    nxt = asyncio.ensure_future(agen.__anext__())
    await settle()
    assert rig.session.usage.documents == 4 and not client.finished  # the reader waits for the client
    assert len(rig.queue) == 3
    replicas_gone(rig.pool, rig.scheduler)
    await settle()  # a few turns of the loop, no timer: at once
    assert nxt.done()
    with pytest.raises(NoReplicaError):
        nxt.result()
    assert rig.scheduler.ticket.closed and len(rig.queue) == 0
    assert client.finished  # and the reader stopped waiting for the client


async def test_parts_wait_for_room_in_the_queue_and_the_stream_goes_on() -> None:
    texts = [doc(f"d{i}", i) for i in range(24)]
    # Parts of 4 documents; streams may fill half the queue's bound of 8 pairs.
    rig = Rig(FakePool(1), [], window=16, max_pairs=8, top_n=3)
    agen = rig.run(Client(texts))
    nxt = asyncio.ensure_future(agen.__anext__())
    await settle()
    assert (len(rig.queue), rig.pool.rows) == (3, 1)
    assert rig.session.usage.documents == 4  # the next part waits, though the window has room
    got: list[RankedDocument] = []
    most_queued = 0
    while True:
        await settle()
        most_queued = max(most_queued, len(rig.queue))
        if nxt.done():
            event = nxt.result()
            if isinstance(event, RerankResult):
                break
            got.extend(scored(event))
            nxt = asyncio.ensure_future(agen.__anext__())
        else:
            assert rig.pool.sent, "the stream stopped with nothing in a replica"
            rig.pool.finish()
    assert most_queued == 4
    assert Counter(r.index for r in got) == Counter(range(24))
    assert [r.index for r in event.results] == [23, 22, 21]


async def test_a_client_that_sends_nothing_for_the_idle_timeout_ends_the_stream() -> None:
    texts = [doc(f"d{i}", i) for i in range(3)]
    rig = Rig(FakePool(1, auto=True), texts, top_n=2, idle_timeout=0.3)
    client = Client(keep_open=True)
    got: list[RankedDocument] = []
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match=r"sent nothing for 0.3 s .*\(stream_idle_timeout_s\)"):
        async for event in rig.run(client):
            got.extend(scored(event))
    assert 0.25 <= time.monotonic() - started < 10
    assert Counter(r.index for r in got) == Counter(range(3))  # every score went out first
    assert rig.scheduler.ticket.closed and client.finished


async def test_a_client_sending_within_the_idle_timeout_is_not_idle() -> None:
    async def slow_client() -> AsyncIterator[list[str]]:
        for i in range(1, 5):
            await asyncio.sleep(0.15)  # 0.6 s in all: past the idle timeout, each gap within it
            yield [doc(f"d{i}", i)]

    rig = Rig(FakePool(1, auto=True), [doc("d0", 0)], top_n=2, idle_timeout=0.3)
    events = [e async for e in rig.session.run(slow_client(), None)]
    final = events[-1]
    assert isinstance(final, RerankResult)
    assert final.usage.documents == 5


async def test_a_stream_waiting_on_its_own_work_is_not_idle() -> None:
    texts = [doc(f"d{i}", i) for i in range(3)]
    rig = Rig(FakePool(1), texts, top_n=2, idle_timeout=0.2)
    agen = rig.run(Client(keep_open=True))
    nxt = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0.6)  # three idle timeouts, with its pairs unscored all along
    assert not nxt.done()
    got: list[RankedDocument] = []
    while rig.pool.sent:
        rig.pool.finish()
        await settle()
    got.extend(scored(await nxt))
    while len(got) < 3:
        got.extend(scored(await asyncio.wait_for(agen.__anext__(), 1)))
    caught_up = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await asyncio.wait_for(agen.__anext__(), 10)
    assert time.monotonic() - caught_up >= 0.15  # the idle clock starts when its work is done
    assert rig.scheduler.ticket.closed


def sized(name: str, raw: int, size: int) -> str:
    """A document of `size` characters whose window scores `raw`."""
    text = doc(name, raw)
    return doc(name + "x" * (size - len(text)), raw)


async def test_a_stream_fails_as_soon_as_its_top_n_texts_would_pass_the_reply_limit() -> None:
    a, b = sized("a", 5, 600), sized("b", 6, 600)
    big_but_low = sized("c", 1, 3000)  # never in the top 2: its text does not count
    limit = len(a) + len(b) + 2 * RESULT_BYTES + REPLY_BYTES + len("m")  # a and b just fit
    rig = Rig(
        FakePool(1, auto=True), [a, b, big_but_low], top_n=2, return_documents=True, max_reply_bytes=limit
    )
    *_, final = [e async for e in rig.run(Client())]
    assert isinstance(final, RerankResult)
    assert [r.document for r in final.results] == [b, a]

    better_and_longer = sized("d", 9, 700)  # displaces a: 100 bytes over the limit
    rig = Rig(
        FakePool(1, auto=True), [a, b, big_but_low], top_n=2, return_documents=True, max_reply_bytes=limit
    )
    client = Client([better_and_longer], keep_open=True)
    with pytest.raises(InvalidRequestError, match=r"over the limit of .* MiB \(max_message_mb\)"):
        async for _ in rig.run(client):
            pass
    assert rig.scheduler.ticket.closed and len(rig.queue) == 0
    await settle()
    assert client.finished  # failed while the client still sent (it never ends), and stopped reading it
