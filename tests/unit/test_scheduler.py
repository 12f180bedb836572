"""The scheduler with a fake replica pool: dispatch, retries after a lost replica, failures."""

from __future__ import annotations

import asyncio
from itertools import pairwise

import numpy as np
import pytest
from rerank_server.errors import (
    DeadlineExceededError,
    ModelError,
    NoReplicaError,
    OverloadedError,
    ReplicaLostError,
)
from rerank_server.families.base import ModelSpec, Row, TokenBatch
from rerank_server.metrics import Metrics
from rerank_server.scheduling.batcher import PairQueue
from rerank_server.scheduling.scheduler import Scheduler

SPEC = ModelSpec("tiny", "cross-encoder", 64, 64, 4, pad_token_id=0, token_columns=("token_type_ids",))


class FakePool:
    """Replicas that take batches and score only when told to."""

    def __init__(self, replicas: int = 2, slots: int = 1) -> None:
        self.slots = slots
        self.free = {r: slots for r in range(replicas)}
        self.ready_count = replicas
        self.sent: list[tuple[int, int, TokenBatch]] = []  # (replica, batch id, batch)
        self.hung: list[tuple[int, int]] = []  # (replica, batch id) the scheduler found hung
        self.found_hung = asyncio.Event()

    @property
    def idle_count(self) -> int:
        return sum(n == self.slots for n in self.free.values()) if self.ready_count else 0

    def idle_replica(self, *, busy_ok: bool = True) -> int | None:
        idle = [r for r, n in self.free.items() if n > 0 and (busy_ok or n == self.slots)]
        return idle[0] if idle and self.ready_count else None

    def busy(self, replica: object) -> bool:
        return self.free[replica] < self.slots  # type: ignore[index]

    def dispatch(self, replica: object, batch_id: int, batch: TokenBatch) -> None:
        assert isinstance(replica, int)
        self.free[replica] -= 1
        self.sent.append((replica, batch_id, batch))

    def finish(self, scheduler: Scheduler, position: int = 0) -> TokenBatch:
        """Score one sent batch: score = the row's first token id."""
        replica, batch_id, batch = self.sent.pop(position)
        self.free[replica] += 1
        scheduler.on_batch_done(batch_id, first_tokens(batch).astype(np.float32), 0.001)
        return batch

    def lose(self, scheduler: Scheduler, position: int = 0) -> None:
        replica, batch_id, _ = self.sent.pop(position)
        self.free[replica] += 1
        scheduler.on_batch_lost(batch_id, "killed")

    def fail(self, scheduler: Scheduler, position: int = 0) -> None:
        """The model raises on one sent batch."""
        replica, batch_id, _ = self.sent.pop(position)
        self.free[replica] += 1
        scheduler.on_batch_failed(batch_id, "IndexError: index out of range in self")

    def replace_hung(self, replica: object, batch_id: int) -> None:
        assert isinstance(replica, int)
        self.hung.append((replica, batch_id))
        self.found_hung.set()


def first_tokens(batch: TokenBatch) -> np.ndarray:
    starts = np.cumsum(batch.lengths) - batch.lengths
    return batch.tokens["input_ids"][starts]


def encoded(first_ids: list[int], length: int = 4, first_index: int = 0) -> list[Row]:
    """Rows of documents first_index, first_index + 1, ...; each row's first token is its score."""
    return [
        Row(
            first_index + position,
            {
                "input_ids": np.array([i] + [1] * (length - 1), dtype=np.int32),
                "token_type_ids": np.zeros(length, dtype=np.int32),
            },
        )
        for position, i in enumerate(first_ids)
    ]


def make(pool: FakePool, *, max_pairs: int = 1000, size: int = 4) -> tuple[Scheduler, Metrics]:
    metrics = Metrics()
    queue = PairQueue(max_batch_tokens=1000, max_batch_size=size, max_pairs=max_pairs, max_wait=0.0)
    return Scheduler(SPEC, queue, pool, metrics.for_model("m")), metrics


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, {"model": "m", **(labels or {})}) or 0.0


async def test_scores_reach_their_request_across_replicas() -> None:
    pool = FakePool(replicas=2)
    scheduler, metrics = make(pool)
    got: dict[int, float] = {}
    ticket = scheduler.open(lambda idx, sc: got.update(zip(idx, sc, strict=True)), timeout=None)
    scheduler.submit(ticket, encoded([10, 11, 12, 13, 14, 15], first_index=100))
    assert len(pool.sent) == 2  # one batch on each replica
    assert {r for r, _, _ in pool.sent} == {0, 1}
    while pool.sent:
        pool.finish(scheduler)
    await asyncio.wait_for(ticket.wait_until_pending_at_most(0), 1)
    assert got == {100 + i: float(10 + i) for i in range(6)}
    assert sample(metrics, "rerank_pairs_scored_total") == 6


async def test_a_lost_batch_runs_again_once_then_fails_retriably() -> None:
    pool = FakePool(replicas=1)
    scheduler, metrics = make(pool)
    got: dict[int, float] = {}
    ticket = scheduler.open(lambda idx, sc: got.update(zip(idx, sc, strict=True)), timeout=None)
    scheduler.submit(ticket, encoded([5, 6], first_index=0))
    pool.lose(scheduler)
    assert len(pool.sent) == 1  # retried at once
    pool.finish(scheduler)
    await ticket.wait_until_pending_at_most(0)
    assert got == {0: 5.0, 1: 6.0}

    twice = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(twice, encoded([7], first_index=0))
    pool.lose(scheduler)
    pool.lose(scheduler)
    with pytest.raises(ReplicaLostError):
        await twice.wait_until_pending_at_most(0)
    assert sample(metrics, "rerank_batches_lost_total") == 3


async def test_no_live_replica_means_unavailable() -> None:
    pool = FakePool(replicas=1, slots=1)
    scheduler, _ = make(pool, size=1)
    ticket = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(ticket, encoded([1, 2, 3], first_index=0))  # one in flight, two queued
    pool.ready_count = 0
    pool.lose(scheduler)
    scheduler.on_replicas_changed(0)
    with pytest.raises(NoReplicaError):
        await ticket.wait_until_pending_at_most(0)
    late = scheduler.open(lambda idx, sc: None, timeout=None)
    with pytest.raises(NoReplicaError):
        scheduler.submit(late, encoded([1], first_index=0))


async def test_a_stream_waits_out_a_brief_outage_while_interactive_requests_fail_at_once() -> None:
    pool = FakePool(replicas=1, slots=1)
    scheduler, _ = make(pool, size=1)
    got: dict[int, float] = {}
    stream = scheduler.open(lambda idx, sc: got.update(zip(idx, sc, strict=True)), None, bulk=True)
    scheduler.submit(stream, encoded([1, 2], first_index=0))  # one in flight, one queued
    interactive = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(interactive, encoded([3], first_index=0))
    pool.ready_count = 0
    pool.lose(scheduler)  # the replica died holding the stream's batch
    scheduler.on_replicas_changed(0)
    with pytest.raises(NoReplicaError):
        await interactive.wait_until_pending_at_most(0)
    assert stream.error is None
    scheduler.submit(stream, encoded([4], first_index=2))  # the stream's next part is taken too
    pool.ready_count = 1  # the replica is back
    scheduler.on_replicas_changed(1)
    while pool.sent:
        pool.finish(scheduler)
    await asyncio.wait_for(stream.wait_until_pending_at_most(0), 1)
    assert got == {0: 1.0, 1: 2.0, 2: 4.0}


async def test_a_stream_fails_when_no_replica_comes_back_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rerank_server.scheduling.scheduler.BULK_OUTAGE_S", 0.05)
    pool = FakePool(replicas=1, slots=1)
    scheduler, _ = make(pool, size=1)
    stream = scheduler.open(lambda idx, sc: None, None, bulk=True)
    scheduler.submit(stream, encoded([1, 2], first_index=0))
    pool.ready_count = 0
    pool.lose(scheduler)
    scheduler.on_replicas_changed(0)
    with pytest.raises(NoReplicaError, match="came back"):
        await asyncio.wait_for(stream.wait_until_pending_at_most(0), 5)


async def test_closing_a_request_keeps_its_queued_pairs_from_the_model() -> None:
    pool = FakePool(replicas=1, slots=1)
    scheduler, metrics = make(pool, size=2)
    ticket = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(ticket, encoded(list(range(10))))
    assert len(pool.sent) == 1
    scheduler.close(ticket)
    pool.finish(scheduler)
    assert pool.sent == []  # nothing else was dispatched
    assert sample(metrics, "rerank_pairs_dropped_total", {"reason": "cancelled"}) == 8
    assert sample(metrics, "rerank_pairs_scored_total") == 2


async def test_an_expired_deadline_fails_the_request_and_drops_its_pairs() -> None:
    pool = FakePool(replicas=1, slots=1)
    scheduler, metrics = make(pool, size=1)
    blocker = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(blocker, encoded([1, 2], first_index=0))
    hurried = scheduler.open(lambda idx, sc: None, timeout=0.01)
    scheduler.submit(hurried, encoded([3, 4, 5], first_index=0))
    await asyncio.sleep(0.02)
    pool.finish(scheduler)
    with pytest.raises(DeadlineExceededError):
        await hurried.wait_until_pending_at_most(0)
    assert sample(metrics, "rerank_pairs_dropped_total", {"reason": "deadline"}) == 3
    assert all(first_tokens(batch)[0] in (1, 2) for _, _, batch in pool.sent)


async def test_a_full_queue_fails_fast() -> None:
    pool = FakePool(replicas=1, slots=0)
    scheduler, _ = make(pool, max_pairs=5)
    ticket = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(ticket, encoded([1, 2, 3], first_index=0))
    other = scheduler.open(lambda idx, sc: None, timeout=None)
    with pytest.raises(OverloadedError):
        scheduler.submit(other, encoded([1, 2, 3], first_index=0))


async def test_a_chunked_documents_rows_report_their_document() -> None:
    pool = FakePool(replicas=1)
    scheduler, _ = make(pool)
    got: list[tuple[int, float]] = []
    ticket = scheduler.open(lambda idx, sc: got.extend(zip(idx, sc, strict=True)), timeout=None)
    rows = [*encoded([3, 4], first_index=7), *encoded([5], first_index=7)]  # document 7 has two windows
    scheduler.submit(ticket, rows)
    assert ticket.pending == 3
    pool.finish(scheduler)
    assert sorted(got) == [(7, 3.0), (7, 5.0), (8, 4.0)]
    assert ticket.pending == 0


async def test_batches_are_packed_rows_with_their_lengths() -> None:
    pool = FakePool(replicas=1)
    scheduler, _ = make(pool)
    ticket = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(ticket, [*encoded([5], length=3), *encoded([8], length=1, first_index=1)])
    (_, _, batch) = pool.sent[0]
    np.testing.assert_array_equal(batch.lengths, [3, 1])
    np.testing.assert_array_equal(batch.tokens["input_ids"], [5, 1, 1, 8])
    np.testing.assert_array_equal(batch.padded("input_ids", 99), [[5, 1, 1], [8, 99, 99]])
    np.testing.assert_array_equal(batch.mask(), [[True, True, True], [True, False, False]])
    assert set(batch.tokens) == {"input_ids", "token_type_ids"}


async def test_stopping_fails_queued_and_in_flight_requests() -> None:
    pool = FakePool(replicas=1, slots=1)
    scheduler, _ = make(pool, size=1)
    running = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(running, encoded([1], first_index=0))
    waiting = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(waiting, encoded([2], first_index=0))
    scheduler.fail_all(NoReplicaError("stopping"))
    for ticket in (running, waiting):
        with pytest.raises(NoReplicaError, match="stopping"):
            await ticket.wait_until_pending_at_most(0)


async def test_bulk_batches_are_cut_to_the_measured_speed_and_skip_busy_replicas() -> None:
    pool = FakePool(replicas=1, slots=2)
    metrics = Metrics()
    queue = PairQueue(max_batch_tokens=1000, max_batch_size=100, max_pairs=1000, max_wait=0.0)
    scheduler = Scheduler(SPEC, queue, pool, metrics.for_model("m"), bulk_batch_s=0.1)
    stream = scheduler.open(lambda idx, sc: None, timeout=None, bulk=True)
    scheduler.submit(stream, encoded(list(range(1, 41)), length=10))
    # Untimed yet: at most FIRST_BULK_TOKENS; and one batch only, though the replica has two slots.
    assert [batch.rows for _, _, batch in pool.sent] == [40]
    assert sample(metrics, "rerank_batch_real_tokens_total") == 400
    replica, batch_id, batch = pool.sent.pop()
    pool.free[replica] += 1
    scheduler.on_batch_done(batch_id, first_tokens(batch).astype(np.float32), 0.4)  # 400 tokens in 0.4 s
    assert scheduler.tokens_per_s == pytest.approx(1000)
    assert scheduler.bulk_max_tokens() == 100  # 0.1 s of work
    scheduler.submit(stream, encoded(list(range(1, 41)), length=10, first_index=40))
    assert [batch.rows for _, _, batch in pool.sent] == [10]  # 100 tokens, one batch in flight

    call = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(call, encoded([7, 8, 9], length=10))
    (_, _, interactive) = pool.sent[-1]  # beside the bulk batch, in the second slot
    assert len(pool.sent) == 2 and interactive.rows == 3


async def test_an_idle_replica_takes_what_is_queued_at_once_a_busy_one_waits_for_more() -> None:
    pool = FakePool(replicas=1, slots=2)
    metrics = Metrics()
    queue = PairQueue(max_batch_tokens=1000, max_batch_size=100, max_pairs=1000, max_wait=0.05)
    scheduler = Scheduler(SPEC, queue, pool, metrics.for_model("m"))
    first = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(first, encoded([1, 2]))
    assert [batch.rows for _, _, batch in pool.sent] == [2]  # idle: no wait for a fuller batch
    second = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(second, encoded([3]))
    assert len(pool.sent) == 1  # busy: the batch waits for more pairs, as it would wait anyway
    third = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(third, encoded([4, 5]))
    await asyncio.sleep(0.1)
    assert [batch.rows for _, _, batch in pool.sent] == [2, 3]  # both, together, after max_wait


def make_watched(pool: FakePool, floor_s: float, factor: float = 10.0) -> tuple[Scheduler, Metrics]:
    metrics = Metrics()
    queue = PairQueue(max_batch_tokens=1000, max_batch_size=4, max_pairs=1000, max_wait=0.0)
    scheduler = Scheduler(
        SPEC, queue, pool, metrics.for_model("m"), batch_timeout_factor=factor, batch_timeout_floor_s=floor_s
    )
    return scheduler, metrics


async def test_a_hung_batch_has_its_replica_replaced_and_runs_once_more_elsewhere() -> None:
    pool = FakePool(replicas=2)
    scheduler, metrics = make_watched(pool, floor_s=0.1)
    got: dict[int, float] = {}
    ticket = scheduler.open(lambda idx, sc: got.update(zip(idx, sc, strict=True)), timeout=None)
    scheduler.submit(ticket, encoded([5], first_index=0))
    [(replica, batch_id, _)] = pool.sent
    await asyncio.wait_for(pool.found_hung.wait(), 10)
    assert pool.hung == [(replica, batch_id)]
    pool.lose(scheduler)  # what the pool reports once it has killed the worker
    [(_, rerun, _)] = pool.sent
    assert rerun != batch_id
    pool.finish(scheduler)
    await asyncio.wait_for(ticket.wait_until_pending_at_most(0), 1)
    assert got == {0: 5.0}
    assert pool.hung == [(replica, batch_id)]  # the batch that came back is timed no more
    assert sample(metrics, "rerank_batches_lost_total") == 1


async def test_a_batch_behind_another_is_timed_from_when_that_one_finishes() -> None:
    pool = FakePool(replicas=1, slots=2)
    scheduler, _ = make_watched(pool, floor_s=1.0, factor=1.5)  # 1.5 s each until a speed is known
    first = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(first, encoded([1]))
    second = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(second, encoded([2]))
    [_, (_, waiting, _)] = pool.sent  # both on the one replica: the second waits for the first
    await asyncio.sleep(1.0)
    pool.finish(scheduler)
    await asyncio.sleep(0.8)
    assert pool.hung == []  # 1.8 s since it was sent, but only 0.8 s since it could start
    await asyncio.wait_for(pool.found_hung.wait(), 10)
    assert pool.hung == [(0, waiting)]


async def test_a_batchs_time_budget_is_its_predicted_time_times_the_factor_never_under_the_floor() -> None:
    pool = FakePool(replicas=1)
    scheduler, _ = make_watched(pool, floor_s=2.0, factor=10.0)
    assert scheduler.batch_budget(100_000) == 20.0  # no speed measured yet: the floor x the factor
    ticket = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(ticket, encoded([1, 2], length=50))
    replica, batch_id, batch = pool.sent.pop()
    pool.free[replica] += 1
    scheduler.on_batch_done(batch_id, first_tokens(batch).astype(np.float32), 0.1)  # 1000 tokens/s
    assert scheduler.batch_budget(1000) == pytest.approx(10.0)
    assert scheduler.batch_budget(100) == 2.0


async def test_a_model_failure_runs_the_batchs_requests_apart_so_only_the_one_at_fault_fails() -> None:
    pool = FakePool(replicas=1)
    scheduler, metrics = make(pool)
    got: dict[int, float] = {}
    healthy = scheduler.open(lambda idx, sc: got.update(zip(idx, sc, strict=True)), timeout=None)
    poisoned = scheduler.open(lambda idx, sc: None, timeout=None)
    pool.free[0] = 0  # busy: both requests wait, then share one batch
    scheduler.submit(healthy, encoded([3, 4], first_index=0))
    scheduler.submit(poisoned, encoded([9], first_index=0))
    pool.free[0] = 1
    scheduler.pump()
    [(_, _, shared)] = pool.sent
    assert sorted(first_tokens(shared).tolist()) == [3, 4, 9]
    pool.fail(scheduler)
    [(_, _, apart)] = pool.sent  # one request per batch now
    assert sorted(first_tokens(apart).tolist()) == [3, 4]
    pool.finish(scheduler)
    [(_, _, alone)] = pool.sent
    assert first_tokens(alone).tolist() == [9]
    pool.fail(scheduler)
    with pytest.raises(ModelError, match=r"^the model failed on this request$"):
        await poisoned.wait_until_pending_at_most(0)
    await asyncio.wait_for(healthy.wait_until_pending_at_most(0), 1)
    assert got == {0: 3.0, 1: 4.0}
    assert pool.sent == []  # no endless retries
    assert sample(metrics, "rerank_batches_failed_total") == 2


async def test_a_failed_batch_of_one_request_fails_it_at_once_and_drops_its_queued_pairs() -> None:
    pool = FakePool(replicas=1)
    scheduler, metrics = make(pool, size=2)
    ticket = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(ticket, encoded([1, 2, 3, 4]))
    pool.fail(scheduler)
    with pytest.raises(ModelError):
        await ticket.wait_until_pending_at_most(0)
    assert pool.sent == []
    assert sample(metrics, "rerank_queued_pairs") == 0  # its other pairs never reach a model
    assert sample(metrics, "rerank_batches_failed_total") == 1
    later = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(later, encoded([5]))  # the replica serves on
    pool.finish(scheduler)
    await asyncio.wait_for(later.wait_until_pending_at_most(0), 1)


async def test_a_request_run_apart_stays_apart_when_its_replica_is_lost() -> None:
    pool = FakePool(replicas=1)
    scheduler, _ = make(pool)
    first = scheduler.open(lambda idx, sc: None, timeout=None)
    second = scheduler.open(lambda idx, sc: None, timeout=None)
    pool.free[0] = 0
    scheduler.submit(first, encoded([1]))
    scheduler.submit(second, encoded([2]))
    pool.free[0] = 1
    scheduler.pump()
    pool.fail(scheduler)
    pool.lose(scheduler)  # the first request's batch apart: its rerun is apart too
    assert [first_tokens(batch).tolist() for _, _, batch in pool.sent] == [[1]]
    pool.fail(scheduler)
    with pytest.raises(ModelError):
        await first.wait_until_pending_at_most(0)
    pool.finish(scheduler)
    await asyncio.wait_for(second.wait_until_pending_at_most(0), 1)


async def test_a_call_that_would_wait_too_long_at_the_measured_speed_is_refused_before_tokenizing() -> None:
    pool = FakePool(replicas=2)
    metrics = Metrics()
    queue = PairQueue(max_batch_tokens=1000, max_batch_size=100, max_pairs=1000, max_wait=0.0, max_delay=0.5)
    scheduler = Scheduler(SPEC, queue, pool, metrics.for_model("m"))
    timed = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(timed, encoded([1] * 10, length=40))
    for replica, batch_id, batch in list(pool.sent):  # 200 tokens in 0.2 s on each: 1000 tokens/s
        pool.sent.remove((replica, batch_id, batch))
        scheduler.on_batch_done(batch_id, first_tokens(batch).astype(np.float32), 0.2)
    assert scheduler.tokens_per_s == pytest.approx(1000)
    pool.free = {0: 0, 1: 0}  # both replicas busy: what comes next stays queued
    waiting = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(waiting, encoded([1] * 24, length=40))  # 960 tokens: 0.48 s at 2 x 1000 tokens/s
    scheduler.check_room(10)
    stream = scheduler.open(lambda idx, sc: None, timeout=None, bulk=True)
    scheduler.submit(stream, encoded([1] * 100, length=40))  # bulk work waits behind calls
    scheduler.check_room(10)
    pool.ready_count = 1  # one replica left: the same work takes twice as long
    with pytest.raises(OverloadedError, match=r"about 960 ms .* 500 ms \(max_queue_delay_ms\)"):
        scheduler.check_room(10)
    scheduler.check_room(10, bulk=True)  # a stream is never refused for the wait: it waits for room


async def test_a_bulk_request_waits_for_room_and_goes_on_as_the_queue_drains() -> None:
    pool = FakePool(replicas=1)
    metrics = Metrics()
    queue = PairQueue(max_batch_tokens=1000, max_batch_size=2, max_pairs=8, max_wait=0.0)
    scheduler = Scheduler(SPEC, queue, pool, metrics.for_model("m"))
    stream = scheduler.open(lambda idx, sc: None, timeout=None, bulk=True)
    await scheduler.wait_for_room(stream, encoded([1] * 20))  # an empty queue takes any part
    scheduler.submit(stream, encoded([1] * 20))
    assert len(queue) == 18  # one batch of 2 in the replica
    part = encoded([2] * 2, first_index=20)
    waiting = asyncio.ensure_future(scheduler.wait_for_room(stream, part))
    while len(queue) + 2 > 4:  # half the queue's bound is the streams'
        await asyncio.sleep(0.01)
        assert not waiting.done()
        pool.finish(scheduler)
    await asyncio.wait_for(waiting, 1)
    scheduler.submit(stream, part)
    assert len(queue) == 4

    call = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(call, encoded([3] * 4))  # a call may fill the rest
    waiting = asyncio.ensure_future(scheduler.wait_for_room(stream, part))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    scheduler.fail_all(NoReplicaError("the server is stopping"))
    with pytest.raises(NoReplicaError, match="stopping"):
        await asyncio.wait_for(waiting, 1)


async def test_closing_a_request_frees_room_for_a_waiting_stream() -> None:
    pool = FakePool(replicas=1, slots=0)  # nothing leaves the queue but by closing
    metrics = Metrics()
    queue = PairQueue(max_batch_tokens=1000, max_batch_size=2, max_pairs=8, max_wait=0.0)
    scheduler = Scheduler(SPEC, queue, pool, metrics.for_model("m"))
    first = scheduler.open(lambda idx, sc: None, timeout=None, bulk=True)
    scheduler.submit(first, encoded([1] * 4))
    second = scheduler.open(lambda idx, sc: None, timeout=None, bulk=True)
    waiting = asyncio.ensure_future(scheduler.wait_for_room(second, encoded([2])))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    scheduler.close(first)
    await asyncio.wait_for(waiting, 1)
    assert sample(metrics, "rerank_pairs_dropped_total", {"reason": "cancelled"}) == 4


async def test_the_queue_gauges_read_queued_tokens_and_the_time_to_run_the_interactive_ones() -> None:
    pool = FakePool(replicas=2)
    scheduler, metrics = make(pool, size=100)
    metrics.watch_queue("m", lambda: scheduler.queued_tokens, scheduler.queued_work_s)
    timed = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(timed, encoded([1] * 10, length=40))
    assert sample(metrics, "rerank_queued_work_seconds") == 0  # no batch timed yet
    for replica, batch_id, batch in list(pool.sent):  # 200 tokens in 0.2 s on each: 1000 tokens/s
        pool.sent.remove((replica, batch_id, batch))
        scheduler.on_batch_done(batch_id, first_tokens(batch).astype(np.float32), 0.2)
    pool.free = {0: 0, 1: 0}
    waiting = scheduler.open(lambda idx, sc: None, timeout=None)
    scheduler.submit(waiting, encoded([1] * 24, length=40))
    assert sample(metrics, "rerank_queued_tokens") == 960
    assert sample(metrics, "rerank_queued_work_seconds") == pytest.approx(0.48)
    pool.ready_count = 1
    assert sample(metrics, "rerank_queued_work_seconds") == pytest.approx(0.96)
    stream = scheduler.open(lambda idx, sc: None, timeout=None, bulk=True)
    scheduler.submit(stream, encoded([1] * 50, length=40))  # a stream's backlog: not a reason to scale
    assert sample(metrics, "rerank_queued_tokens") == 960 + 2000
    assert sample(metrics, "rerank_queued_work_seconds") == pytest.approx(0.96)
    scheduler.close(waiting)
    scheduler.close(stream)
    assert sample(metrics, "rerank_queued_tokens") == 0


async def test_a_stream_under_sustained_interactive_load_gets_one_short_batch_per_bound_and_no_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One replica (two slots) always has interactive pairs queued; a simulated clock moves on by
    each batch's time at 1000 padded tokens per second."""
    pool = FakePool(replicas=1, slots=2)
    metrics = Metrics()
    queue = PairQueue(max_batch_tokens=1000, max_batch_size=16, max_pairs=100_000, max_wait=0.0)
    scheduler = Scheduler(SPEC, queue, pool, metrics.for_model("m"), bulk_batch_s=0.1)
    clock = [0.0]
    monkeypatch.setattr(scheduler, "now", lambda: clock[0])
    speed = 1000.0
    bulk_runs: list[tuple[float, int]] = []  # (start, padded tokens) of each bulk batch

    def run_next() -> None:
        """The replica runs its oldest batch (slots run in order); the clock moves on by its time."""
        replica, batch_id, batch = pool.sent.pop(0)
        pool.free[replica] += 1
        padded = batch.rows * batch.width
        if set(first_tokens(batch).tolist()) == {2}:  # the stream's rows start with 2, calls' with 1
            bulk_runs.append((clock[0], padded))
        clock[0] += padded / speed
        scheduler.on_batch_done(batch_id, first_tokens(batch).astype(np.float32), padded / speed)

    def keep_calls_queued() -> None:
        while queue.interactive_tokens < 300:  # more than two interactive batches
            call = scheduler.open(lambda idx, sc: None, timeout=None)
            scheduler.submit(call, encoded([1] * 4, length=8))

    keep_calls_queued()
    run_next()  # timed: 1000 tokens per second, so a bulk batch holds 100 tokens
    stream = scheduler.open(lambda idx, sc: None, timeout=None, bulk=True)
    started = clock[0]
    scheduler.submit(stream, encoded([2] * 5000, length=10))
    while clock[0] < started + 20:
        keep_calls_queued()
        assert sum(first_tokens(batch)[0] == 2 for _, _, batch in pool.sent) <= 1  # one bulk batch at most
        run_next()
    starts = [start for start, _ in bulk_runs]
    # The first within the bound (1 s) and the batch it waits behind (128 ms, 16 rows of 8).
    assert started + 1.0 <= starts[0] <= started + 1.0 + 2 * 0.128
    gaps = [b - a for a, b in pairwise(starts)]
    assert all(1.0 <= gap <= 1.0 + 2 * 0.128 for gap in gaps)  # its share, and no more
    assert all(padded <= 100 for _, padded in bulk_runs)  # each about bulk_batch_s: 100 ms
    share = sum(padded for _, padded in bulk_runs) / speed / (clock[0] - started)
    assert 0.08 <= share <= 0.1
