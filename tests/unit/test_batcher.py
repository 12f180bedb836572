"""The batcher alone: budgets, length grouping, fairness, waiting, backpressure, bounds, dropping."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from rerank_server.errors import OverloadedError
from rerank_server.families.base import Row
from rerank_server.scheduling.batcher import BULK_SHARE, PairQueue, QueuedRow


@dataclass(eq=False)
class Owner:
    name: str
    deadline: float | None = None
    closed: bool = False
    bulk: bool = False


def row(document: int, length: int) -> Row:
    return Row(document, {"input_ids": np.full(length, 7, dtype=np.int32)})


def pairs(owner: Owner, lengths: list[int], at: float = 0.0) -> list[QueuedRow]:
    return [QueuedRow(owner, row(i, n), at) for i, n in enumerate(lengths)]


def make_queue(
    tokens: int = 1000,
    size: int = 100,
    max_pairs: int = 10_000,
    wait: float = 0.01,
    max_tokens: int | None = None,
    max_delay: float = 0.0,
) -> PairQueue:
    return PairQueue(
        max_batch_tokens=tokens,
        max_batch_size=size,
        max_pairs=max_pairs,
        max_wait=wait,
        max_tokens=max_tokens,
        max_delay=max_delay,
    )


def padded_tokens(batch: list[QueuedRow]) -> int:
    return len(batch) * max(p.length for p in batch)


def test_batches_stay_within_token_budget_and_size() -> None:
    queue = make_queue(tokens=256, size=10)
    a = Owner("a")
    queue.push(a, pairs(a, [10, 50, 30, 64, 5, 20, 40, 60, 7, 33, 12, 64, 64, 64]))
    seen = 0
    while len(queue):
        batch = queue.next_batch(1.0).pairs
        assert batch
        assert padded_tokens(batch) <= 256
        assert len(batch) <= 10
        seen += len(batch)
    assert seen == 14


def test_pairs_of_similar_length_are_batched_together() -> None:
    queue = make_queue(tokens=400, size=4)
    a = Owner("a")
    lengths = [100, 5, 98, 6, 99, 4, 97, 7]
    queue.push(a, pairs(a, lengths))
    first = queue.next_batch(1.0).pairs
    second = queue.next_batch(1.0).pairs
    assert sorted(p.length for p in first) == [97, 98, 99, 100]
    assert sorted(p.length for p in second) == [4, 5, 6, 7]


def test_a_small_request_is_not_starved_behind_a_large_one() -> None:
    queue = make_queue(tokens=10 * 32, size=32)
    big, small = Owner("big"), Owner("small")
    queue.push(big, pairs(big, [10] * 1000))
    queue.push(small, pairs(small, [10] * 3))
    first = queue.next_batch(1.0).pairs
    second = queue.next_batch(1.0).pairs
    assert {p.owner for p in first} == {big}
    assert [p.owner for p in second][:3] == [small, small, small]
    # The large request fills what the small one leaves of the batch.
    assert len(second) == 32


def test_a_large_request_is_split_into_many_batches() -> None:
    queue = make_queue(tokens=64 * 16, size=64)
    big = Owner("big")
    queue.push(big, pairs(big, [16] * 640))
    batches = [queue.next_batch(1.0).pairs for _ in range(10)]
    assert all(len(b) == 64 for b in batches)
    assert len(queue) == 0
    assert sorted(p.row.document for b in batches for p in b) == list(range(640))


def test_an_unfilled_batch_waits_at_most_max_wait() -> None:
    queue = make_queue(tokens=1000, size=100, wait=0.010)
    a = Owner("a")
    queue.push(a, pairs(a, [10, 10], at=5.0))
    held = queue.next_batch(5.004)
    assert held.pairs == []
    assert held.wait_until == pytest.approx(5.010)
    assert len(queue) == 2
    assert len(queue.next_batch(5.010).pairs) == 2


def test_a_full_batch_goes_at_once_and_flush_does_not_wait() -> None:
    queue = make_queue(tokens=100, size=100, wait=10.0)
    a = Owner("a")
    queue.push(a, pairs(a, [10] * 15, at=0.0))
    assert len(queue.next_batch(0.0).pairs) == 10  # full: no waiting
    assert queue.next_batch(0.0).pairs == []  # five left, not full: held
    assert len(queue.next_batch(0.0, flush=True).pairs) == 5


def test_a_full_queue_refuses_the_whole_request_at_once() -> None:
    queue = make_queue(max_pairs=10)
    a, b = Owner("a"), Owner("b")
    queue.push(a, pairs(a, [5] * 8))
    with pytest.raises(OverloadedError, match="queue full"):
        queue.push(b, pairs(b, [5] * 3))
    assert len(queue) == 8
    queue.check_room(2)
    with pytest.raises(OverloadedError, match="max_queued_pairs"):
        queue.check_room(3)


def test_pairs_of_expired_or_closed_requests_never_reach_a_batch() -> None:
    queue = make_queue(tokens=10_000, size=1000, wait=0.0)
    live, expired, cancelled = Owner("live"), Owner("expired", deadline=2.0), Owner("cancelled")
    queue.push(live, pairs(live, [10] * 3))
    queue.push(expired, pairs(expired, [10] * 4))
    queue.push(cancelled, pairs(cancelled, [10] * 5))
    cancelled.closed = True
    plan = queue.next_batch(3.0)
    assert {p.owner for p in plan.pairs} == {live}
    assert plan.expired == [expired]
    assert plan.dropped_pairs == 9
    assert len(queue) == 0


def test_drop_forgets_a_request() -> None:
    queue = make_queue()
    a, b = Owner("a"), Owner("b")
    queue.push(a, pairs(a, [5] * 4))
    queue.push(b, pairs(b, [5] * 2))
    assert queue.drop(a) == 4
    assert queue.drop(a) == 0
    assert {p.owner for p in queue.next_batch(9.0).pairs} == {b}


def test_requeued_pairs_go_first() -> None:
    queue = make_queue(tokens=1000, size=2, wait=0.0)
    a, b = Owner("a"), Owner("b")
    queue.push(a, pairs(a, [5] * 4))
    lost = queue.next_batch(1.0).pairs
    queue.push(b, pairs(b, [5] * 4))
    queue.requeue(lost)
    assert queue.next_batch(1.0).pairs == lost


def test_later_chunks_of_a_stream_join_its_queue_sorted() -> None:
    queue = make_queue(tokens=1000, size=3, wait=0.0)
    a = Owner("a")
    queue.push(a, pairs(a, [5, 50]))
    queue.push(a, [QueuedRow(a, row(2, 40), 0.0)])
    assert [p.length for p in queue.next_batch(1.0).pairs] == [50, 40, 5]


def test_idle_replicas_share_a_request_that_fits_one_batch() -> None:
    queue = make_queue(tokens=10_000, size=100, wait=10.0)
    a = Owner("a")
    queue.push(a, pairs(a, [10] * 20, at=0.0))
    first = queue.next_batch(0.0, spread=2).pairs  # its share: goes at once, not held
    assert len(first) == 10
    assert queue.next_batch(0.0, spread=1).pairs == []  # one replica left: normal batching
    assert len(queue.next_batch(10.0, spread=1).pairs) == 10
    queue.push(a, pairs(a, [10] * 3, at=0.0))
    assert len(queue.next_batch(0.0, spread=4).pairs) == 1


def test_pairs_of_similar_length_share_a_batch_across_requests() -> None:
    queue = make_queue(tokens=1000, size=4, wait=0.0)
    a, b = Owner("a"), Owner("b")
    queue.push(a, pairs(a, [400, 30]))
    queue.push(b, pairs(b, [390, 40]))
    first = queue.next_batch(1.0).pairs
    assert [(p.owner.name, p.length) for p in first] == [("a", 400), ("b", 390)]
    second = queue.next_batch(1.0).pairs  # led by b now
    assert [(p.owner.name, p.length) for p in second] == [("b", 40), ("a", 30)]


def test_a_much_shorter_pair_waits_for_a_batch_of_its_own_length() -> None:
    queue = make_queue(tokens=10_000, size=100, wait=0.0)
    a = Owner("a")
    queue.push(a, pairs(a, [400, 380, 200, 30, 20, 10]))
    assert [p.length for p in queue.next_batch(1.0).pairs] == [400, 380]  # 200: 220 padding, 82% real
    assert [p.length for p in queue.next_batch(1.0).pairs] == [200]
    assert [p.length for p in queue.next_batch(1.0).pairs] == [30, 20, 10]  # 30 padding tokens: joins


def test_batches_of_mixed_lengths_from_many_requests_pad_little() -> None:
    """Every pair leaves exactly once; each batch fits the budget and is at least 90% real tokens,
    or carries at most 128 padding tokens."""
    import random

    rng = random.Random(0)
    queue = make_queue(tokens=4096, size=32, wait=0.0)
    owners = [Owner(f"o{i}") for i in range(8)]
    for owner in owners:
        lengths = [min(512, max(8, round(rng.lognormvariate(4.3, 0.8)))) for _ in range(20)]
        queue.push(owner, pairs(owner, lengths))
    seen = []
    while len(queue):
        batch = queue.next_batch(1.0).pairs
        width = max(p.length for p in batch)
        assert len(batch) * width <= 4096 and len(batch) <= 32
        real = sum(p.length for p in batch)
        assert real >= 0.9 * len(batch) * width or len(batch) * width - real <= 128
        seen += [(p.owner.name, p.row.document) for p in batch]
    assert sorted(seen) == sorted((o.name, i) for o in owners for i in range(20))


def test_interactive_pairs_go_first_and_alone_while_bulk_ones_wait() -> None:
    queue = make_queue(tokens=1000, size=100)
    stream, call = Owner("stream", bulk=True), Owner("call")
    queue.push(stream, pairs(stream, [50] * 10))
    queue.push(call, pairs(call, [50, 40, 30]))
    assert queue.has_interactive()
    first = queue.next_batch(1.0, bulk_max_tokens=10_000).pairs
    assert {p.owner for p in first} == {call}  # the stream's pairs of the same width wait
    assert len(first) == 3
    assert not queue.has_interactive()
    assert {p.owner for p in queue.next_batch(1.0).pairs} == {stream}


def test_bulk_work_starved_past_the_bound_gets_one_capped_batch_then_calls_lead_again() -> None:
    queue = make_queue(tokens=1000, size=100, wait=10.0)
    stream, call = Owner("stream", bulk=True), Owner("call")
    assert not queue.bulk_starved(100.0, 1.0)  # no bulk work queued
    queue.push(stream, pairs(stream, [50] * 10, at=1.0))
    queue.push(call, pairs(call, [50] * 60, at=1.0))
    assert not queue.bulk_starved(1.9, 1.0)
    assert queue.bulk_starved(2.0, 1.0)
    starved = queue.next_batch(2.0, bulk_max_tokens=120, bulk_first=True)
    assert [p.owner for p in starved.pairs] == [stream, stream]  # cut to its cap, though calls wait
    assert not queue.bulk_starved(2.9, 1.0)  # a bulk batch restarts the clock
    assert queue.bulk_starved(3.0, 1.0)
    assert {p.owner for p in queue.next_batch(2.9, bulk_max_tokens=120).pairs} == {call}
    queue.drop(call)
    assert queue.next_batch(3.0, bulk_max_tokens=1000).pairs == []  # not full: held for max_wait
    assert len(queue.next_batch(3.0, bulk_max_tokens=1000, bulk_first=True).pairs) == 8  # never held


def test_a_bulk_first_batch_is_an_interactive_one_when_no_bulk_pairs_are_left() -> None:
    queue = make_queue(tokens=1000, size=100)
    stream, call = Owner("stream", bulk=True), Owner("call")
    queue.push(stream, pairs(stream, [50] * 2))
    queue.push(call, pairs(call, [50] * 3))
    stream.closed = True
    plan = queue.next_batch(1.0, bulk_max_tokens=60, bulk_first=True)
    assert [p.owner for p in plan.pairs] == [call] * 3
    assert plan.dropped_pairs == 2


def test_bulk_work_coming_into_a_queue_with_none_starts_its_own_clock() -> None:
    queue = make_queue(tokens=1000, size=100)
    first, second, call = Owner("first", bulk=True), Owner("second", bulk=True), Owner("call")
    queue.push(call, pairs(call, [50] * 10, at=0.0))
    queue.push(first, pairs(first, [50] * 4, at=0.0))
    queue.push(second, pairs(second, [50] * 4, at=0.5))  # joins waiting bulk work: its clock
    assert queue.bulk_starved(1.0, 1.0)
    queue.drop(first)
    queue.drop(second)
    later = Owner("later", bulk=True)
    queue.push(later, pairs(later, [50] * 4, at=5.0))
    assert not queue.bulk_starved(5.9, 1.0)
    assert queue.bulk_starved(6.0, 1.0)
    lost = queue.next_batch(6.0, bulk_max_tokens=1000, bulk_first=True).pairs
    assert not queue.has_bulk()
    queue.requeue(lost)  # back from a lost replica: waiting since they were first queued
    assert queue.bulk_starved(6.0, 1.0)


def test_a_bulk_batch_holds_at_most_its_token_cap_and_always_one_pair() -> None:
    queue = make_queue(tokens=1000, size=100)
    stream = Owner("stream", bulk=True)
    queue.push(stream, pairs(stream, [50] * 10))
    assert len(queue.next_batch(1.0, bulk_max_tokens=120).pairs) == 2
    assert len(queue.next_batch(1.0, bulk_max_tokens=10).pairs) == 1  # too small for one: one anyway
    call = Owner("call")
    queue.push(call, pairs(call, [50] * 10))
    assert len(queue.next_batch(1.0, bulk_max_tokens=120).pairs) == 10  # the cap is for bulk only


def test_the_queue_is_bounded_in_tokens_too() -> None:
    queue = make_queue(max_tokens=100)
    a, b = Owner("a"), Owner("b")
    queue.push(a, pairs(a, [30, 30]))
    with pytest.raises(OverloadedError, match=r"60 tokens queued, 50 more .* 100 \(max_queued_tokens\)"):
        queue.push(b, pairs(b, [30, 20]))
    assert (len(queue), queue.tokens) == (2, 60)  # all or none
    queue.check_room(1, 40)
    with pytest.raises(OverloadedError, match="max_queued_tokens"):
        queue.check_room(1, 41)
    queue.push(b, pairs(b, [25, 15]))
    assert queue.tokens == 100


def test_queued_tokens_follow_pairs_in_and_out_by_every_path() -> None:
    queue = make_queue(tokens=100, size=2, wait=0.0)
    call, other, stream = Owner("call"), Owner("other"), Owner("stream", bulk=True)
    queue.push(call, pairs(call, [10, 20, 30]))
    queue.push(other, pairs(other, [5]))
    queue.push(stream, pairs(stream, [40, 7]))
    assert (queue.tokens, queue.interactive_tokens) == (112, 65)
    batch = queue.next_batch(1.0).pairs  # call's 30 and 20
    assert (queue.tokens, queue.interactive_tokens) == (62, 15)
    queue.requeue(batch)
    assert (queue.tokens, queue.interactive_tokens) == (112, 65)
    assert queue.drop(call) == 3
    assert (queue.tokens, queue.interactive_tokens) == (52, 5)
    expired = Owner("expired", deadline=0.5)
    queue.push(expired, pairs(expired, [9]))
    queue.next_batch(1.0)  # drops the expired owner's pair, batches other's
    assert (queue.tokens, queue.interactive_tokens) == (47, 0)
    queue.drain()
    assert (len(queue), queue.tokens, queue.interactive_tokens) == (0, 0, 0)


def test_an_interactive_request_that_would_wait_too_long_is_refused_at_once() -> None:
    queue = make_queue(max_delay=0.05)
    call, stream = Owner("call"), Owner("stream", bulk=True)
    queue.push(stream, pairs(stream, [100] * 50))  # bulk work yields: it does not delay a call
    queue.check_room(1, speed=10_000)
    queue.push(call, pairs(call, [100] * 4))  # 400 tokens: 40 ms at 10,000 tokens/s
    queue.check_room(1, speed=10_000)
    queue.push(call, pairs(call, [100] * 2))
    with pytest.raises(OverloadedError, match=r"about 60 ms .* 50 ms \(max_queue_delay_ms\)"):
        queue.check_room(1, speed=10_000)
    queue.check_room(1, speed=20_000)
    queue.check_room(1, speed=None)  # no speed measured yet: no estimate
    make_queue(max_delay=0.0).check_room(1, speed=1)  # 0: no such limit


def test_bulk_work_fills_at_most_its_share_of_the_bounds_but_always_enters_an_empty_queue() -> None:
    assert BULK_SHARE == 0.5
    queue = make_queue(max_pairs=10, max_tokens=100)
    assert queue.has_bulk_room(1000, 10**6)  # larger than the bounds alone: an empty queue takes it
    call, stream = Owner("call"), Owner("stream", bulk=True)
    queue.push(call, pairs(call, [10] * 4))
    assert queue.has_bulk_room(1, 10)  # 5 pairs, 50 tokens: half of each bound
    assert not queue.has_bulk_room(2, 10)
    assert not queue.has_bulk_room(1, 11)
    with pytest.raises(OverloadedError):
        queue.push(stream, pairs(stream, [10] * 2))
    queue.push(stream, pairs(stream, [10]))
    queue.push(call, pairs(call, [10] * 5))  # interactive requests use the whole bound
    assert (len(queue), queue.tokens) == (10, 100)
