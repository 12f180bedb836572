"""The scheduler: requests' pairs in, batches out to idle replicas, scores back to requests.

Event driven on the server's event loop: every change (pairs queued, a replica
freed or ready, a batch's wait elapsed) pumps the queue into idle replicas. A replica with
nothing in flight takes what is queued at once; an unfilled batch for a busy one waits up to
max_wait for more pairs, time it would spend waiting for the replica anyway.

Bulk work (streams) is kept short in time so that interactive requests get through it: a bulk
batch holds about `bulk_batch_s` of work at the replicas' measured speed (padded tokens per
second), and goes only to a replica with nothing in flight, so a new interactive request waits at
most for one such batch. Interactive work comes first, but it must not starve streams: once bulk
work has had no batch for `bulk_batch_s / BULK_MIN_SHARE` (1 s by default) while interactive pairs
are queued, the next batch interactive work would have had (in a busy replica or not) is one bulk
batch instead. Under sustained interactive load streams so get about BULK_MIN_SHARE of one
replica, and an interactive request waits at most one bulk batch more.

Faults: a batch running far longer than its size predicts marks its replica hung (the watchdog),
which the pool then replaces, and the batch runs once more elsewhere, as after any lost replica. A
batch the model raises on runs again as one batch per request, so only the request at fault fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from itertools import count
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from rerank_server.errors import (
    DeadlineExceededError,
    ModelError,
    NoReplicaError,
    ReplicaLostError,
    RerankServerError,
)
from rerank_server.families.base import ModelSpec, Row, TokenBatch, pack_rows
from rerank_server.scheduling.batcher import PairOwner, PairQueue, QueuedRow
from rerank_server.scheduling.watchdog import BatchWatchdog

if TYPE_CHECKING:
    import numpy.typing as npt

    from rerank_server.metrics import ModelMetrics

log = logging.getLogger(__name__)

ScoreSink = Callable[[list[int], list[float]], None]


class Replicas(Protocol):
    """What the scheduler needs of the worker pool."""

    @property
    def ready_count(self) -> int: ...

    @property
    def idle_count(self) -> int:
        """Ready replicas with no batch at all: they would sit still without work."""
        ...

    def idle_replica(self, *, busy_ok: bool = True) -> object | None:
        """A ready replica with room for a batch; with busy_ok False, only one with none in flight."""
        ...

    def busy(self, replica: object) -> bool:
        """Whether the replica has a batch in flight (a new one would wait for it anyway)."""
        ...

    def dispatch(self, replica: object, batch_id: int, batch: TokenBatch) -> None: ...

    def replace_hung(self, replica: object, batch_id: int) -> None:
        """End the replica's worker, still running `batch_id` far past its time; its batches come
        back lost."""
        ...


class Ticket:
    """One request's handle: its rows in flight, and the scores as they come back (by document)."""

    def __init__(
        self,
        deadline: float | None,
        on_scores: ScoreSink,
        now: float,
        on_failure: Callable[[RerankServerError], None] | None = None,
        bulk: bool = False,
    ) -> None:
        self.deadline = deadline
        self.bulk = bulk
        self.closed = False
        self.error: RerankServerError | None = None
        self.pending = 0
        self.opened_at = now
        self.first_dispatch_at: float | None = None
        self.last_score_at: float | None = None
        self._on_scores = on_scores
        self._on_failure = on_failure
        # Set whenever scores arrive or the request fails; whoever waits on the ticket clears it.
        self.changed = asyncio.Event()

    def deliver(self, indices: list[int], scores: list[float], now: float) -> None:
        self.pending -= len(indices)
        self.last_score_at = now
        self._on_scores(indices, scores)
        self.changed.set()

    def fail(self, error: RerankServerError) -> None:
        if self.error is None and not self.closed:
            self.error = error
            self.changed.set()
            if self._on_failure is not None:
                self._on_failure(error)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    async def wait_until_pending_at_most(self, limit: int) -> None:
        """Wait until at most `limit` pairs are unscored; raise the request's error if it failed."""
        while self.error is None and self.pending > limit:
            self.changed.clear()
            await self.changed.wait()
        self.raise_if_failed()


# While no replica is ready, bulk work (streams) stays queued this long for one to come back (a
# restart); interactive requests fail at once, so that their clients retry elsewhere.
BULK_OUTAGE_S = 60.0
# Until a batch has been timed, a bulk batch holds at most this many padded tokens.
FIRST_BULK_TOKENS = 2048
# Weight of the latest batch in the replicas' speed (padded tokens per second), a moving average.
SPEED_WEIGHT = 0.2
# Under sustained interactive load, bulk work still gets about this share of one replica's time: one
# bulk batch (bulk_batch_s of work) once bulk work has waited bulk_batch_s / BULK_MIN_SHARE.
BULK_MIN_SHARE = 0.1


class Scheduler:
    def __init__(
        self,
        spec: ModelSpec,
        queue: PairQueue,
        replicas: Replicas,
        metrics: ModelMetrics,
        bulk_batch_s: float = 0.1,
        *,
        batch_timeout_factor: float = 10.0,
        batch_timeout_floor_s: float = 10.0,
    ) -> None:
        self._spec = spec
        self._queue = queue
        self._replicas = replicas
        self._metrics = metrics
        self._bulk_batch_s = bulk_batch_s
        self._loop = asyncio.get_running_loop()
        self._batch_ids = count()
        self._in_flight: dict[int, tuple[list[QueuedRow], int]] = {}  # batch id -> pairs, padded tokens
        self._timer: asyncio.TimerHandle | None = None
        self.tokens_per_s: float | None = None  # one replica's measured speed
        self._waiting_for_room: dict[Ticket, None] = {}  # bulk requests waiting for queue room, in order
        self._batch_timeout_factor = batch_timeout_factor
        self._batch_timeout_floor_s = batch_timeout_floor_s
        self._watchdog = BatchWatchdog(self._loop, self._on_hung)
        self._isolated: deque[list[QueuedRow]] = deque()  # one request's pairs each, to run alone
        self._outage: asyncio.TimerHandle | None = None  # set while no replica is ready
        self._alone: set[int] = set()  # batches in flight that hold one request run apart

    def now(self) -> float:
        return self._loop.time()

    def open(
        self,
        on_scores: ScoreSink,
        timeout: float | None,
        on_failure: Callable[[RerankServerError], None] | None = None,
        *,
        bulk: bool = False,
    ) -> Ticket:
        """A request's ticket; on_failure hears of its failure at once, for callers that are not
        waiting on the ticket when it fails (a stream waiting for the client's next message).
        A bulk request's pairs wait while interactive ones are queued (up to a bound: BULK_MIN_SHARE)."""
        now = self.now()
        return Ticket(None if timeout is None else now + timeout, on_scores, now, on_failure, bulk)

    def submit(self, ticket: Ticket, rows: Sequence[Row]) -> None:
        """Queue a request's rows; raises OverloadedError or NoReplicaError at once (a bulk
        request awaits `wait_for_room` first)."""
        ticket.raise_if_failed()
        if not (ticket.bulk and self._outage is not None):  # a stream's parts wait out an outage
            self._require_a_replica()
        now = self.now()
        queued = [QueuedRow(ticket, row, now) for row in rows]
        self._queue.push(ticket, queued)
        ticket.pending += len(queued)
        self._metrics.queued_pairs.set(len(self._queue))
        self.pump()

    async def wait_for_room(self, ticket: Ticket, rows: Sequence[Row]) -> None:
        """Wait until the queue has room for a bulk request's rows: backpressure on a stream, where
        an interactive request would fail. Raises the request's error if it fails meanwhile."""
        tokens = sum(row.length for row in rows)
        while not self._queue.has_bulk_room(len(rows), tokens):
            ticket.raise_if_failed()
            self._waiting_for_room[ticket] = None
            ticket.changed.clear()
            try:
                await ticket.changed.wait()
            finally:
                self._waiting_for_room.pop(ticket, None)
        ticket.raise_if_failed()

    def _room_freed(self) -> None:
        """Wake the bulk requests waiting for room; each checks again whether it fits."""
        for ticket in self._waiting_for_room:
            ticket.changed.set()

    def check_room(self, pairs: int, *, bulk: bool = False) -> None:
        """Refuse early, before tokenizing, a request the queue cannot take now: an interactive one
        past the queue's bounds, or that would wait too long behind the interactive work queued
        (at the ready replicas' measured speed). Bulk requests wait for room instead."""
        self._require_a_replica()
        if bulk:
            return
        speed = None if self.tokens_per_s is None else self.tokens_per_s * self._replicas.ready_count
        self._queue.check_room(pairs, speed=speed)

    @property
    def queued_tokens(self) -> int:
        return self._queue.tokens

    def queued_work_s(self) -> float:
        """Seconds the ready replicas need for the queued interactive work at their measured speed:
        how long a new Rerank would queue, as streams' work waits behind it (0 until measured; with
        no replica ready, as if one were). A stream's backlog is left out: more replicas would not
        speed up one stream, which one server runs."""
        if self.tokens_per_s is None:
            return 0.0
        return self._queue.interactive_tokens / (self.tokens_per_s * max(1, self._replicas.ready_count))

    def _require_a_replica(self) -> None:
        if self._replicas.ready_count == 0:
            raise NoReplicaError("no model replica is ready; retry shortly")

    def close(self, ticket: Ticket) -> None:
        """The request is over (finished, failed or cancelled): its queued pairs never reach a model."""
        if ticket.closed:
            return
        ticket.closed = True
        dropped = self._queue.drop(ticket)
        if dropped:
            expired = ticket.deadline is not None and ticket.deadline <= self.now()
            self._metrics.pairs_dropped("deadline" if expired else "cancelled").inc(dropped)
            self._metrics.queued_pairs.set(len(self._queue))
            self._room_freed()

    def bulk_max_tokens(self) -> int:
        """The padded tokens a bulk batch may hold: about bulk_batch_s of one replica's work."""
        if self.tokens_per_s is None:
            return FIRST_BULK_TOKENS
        return max(1, int(self.tokens_per_s * self._bulk_batch_s))

    def pump(self) -> None:
        """Fill idle replicas with batches while there is work."""
        self._dispatch_isolated()
        while True:
            now = self.now()
            interactive = self._queue.has_interactive()
            # Starved bulk work takes the next batch interactive work would have had (busy replica or not).
            starved = interactive and self._queue.bulk_starved(now, self._bulk_batch_s / BULK_MIN_SHARE)
            replica = self._replicas.idle_replica(busy_ok=interactive)
            if replica is None:
                break
            # An unfilled batch waits for more pairs only where it would wait for the replica anyway.
            plan = self._queue.next_batch(
                now,
                flush=not self._replicas.busy(replica),
                spread=self._replicas.idle_count,
                bulk_max_tokens=self.bulk_max_tokens(),
                bulk_first=starved,
            )
            for owner in plan.expired:
                _ticket(owner).fail(DeadlineExceededError("deadline passed while queued"))
            if plan.dropped_pairs:
                self._metrics.pairs_dropped("deadline").inc(plan.dropped_pairs)
            if not plan.pairs:
                if plan.wait_until is not None:
                    self._arm_timer(plan.wait_until)
                break
            self._dispatch(replica, plan.pairs)
        self._metrics.queued_pairs.set(len(self._queue))
        self._room_freed()

    def _arm_timer(self, when: float) -> None:
        if self._timer is not None and self._timer.when() <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.pump()

    def _dispatch_isolated(self) -> None:
        """The requests of a batch the model failed on run apart, one per batch, before the queue."""
        while self._isolated and (replica := self._replicas.idle_replica()) is not None:
            pairs = self._isolated.popleft()
            ticket = _ticket(pairs[0].owner)
            if ticket.closed or ticket.error is not None:
                continue
            if ticket.deadline is not None and ticket.deadline <= self.now():
                ticket.fail(DeadlineExceededError("deadline passed while queued"))
                self._metrics.pairs_dropped("deadline").inc(len(pairs))
                continue
            self._dispatch(replica, pairs, alone=True)

    def _dispatch(self, replica: object, pairs: list[QueuedRow], *, alone: bool = False) -> None:
        batch_id = next(self._batch_ids)
        batch = pack_rows([pair.row for pair in pairs], self._spec)
        now = self.now()
        for pair in pairs:
            ticket = _ticket(pair.owner)
            if ticket.first_dispatch_at is None:
                ticket.first_dispatch_at = now
                self._metrics.queue_seconds.observe(now - ticket.opened_at)
        padded = batch.rows * batch.width
        self._in_flight[batch_id] = (pairs, padded)
        self._metrics.batches.inc()
        self._metrics.batch_pairs.observe(batch.rows)
        self._metrics.batch_tokens.observe(padded)
        self._metrics.batch_real_tokens.inc(len(batch.tokens["input_ids"]))
        if alone:
            self._alone.add(batch_id)
        self._watchdog.watch(replica, batch_id, self.batch_budget(padded))
        self._replicas.dispatch(replica, batch_id, batch)

    def batch_budget(self, padded: int) -> float:
        """How long a batch of `padded` tokens may run before its replica counts as hung: its
        predicted time (at the measured speed) times the factor, and never under the floor. Until a
        batch has been timed, the floor times the factor: a large model's first full batch on a
        CPU may take far longer than the floor, and must not be taken for a hang."""
        if self.tokens_per_s is None:
            return self._batch_timeout_floor_s * self._batch_timeout_factor
        return max(self._batch_timeout_floor_s, self._batch_timeout_factor * padded / self.tokens_per_s)

    def _on_hung(self, replica: object, batch_id: int, budget_s: float) -> None:
        log.error("batch %d still runs after %.1f s, its budget: replacing its replica", batch_id, budget_s)
        self._replicas.replace_hung(replica, batch_id)

    def _take_in_flight(self, batch_id: int) -> tuple[list[QueuedRow], int, bool] | None:
        """A batch that came back: its pairs, padded tokens and whether it held one request run apart
        (None if it is no longer awaited)."""
        entry = self._in_flight.pop(batch_id, None)
        if entry is None:
            return None
        self._watchdog.finished(batch_id)
        alone = batch_id in self._alone
        self._alone.discard(batch_id)
        return (*entry, alone)

    # Called by the worker pool, on the event loop.

    def on_batch_done(self, batch_id: int, scores: npt.NDArray[np.float32], seconds: float) -> None:
        done = self._take_in_flight(batch_id)
        if done is None:
            return
        pairs, padded, _ = done
        if seconds > 0:
            speed = padded / seconds
            previous = self.tokens_per_s
            self.tokens_per_s = speed if previous is None else previous + SPEED_WEIGHT * (speed - previous)
        self._metrics.pairs_scored.inc(len(pairs))
        self._metrics.inference_seconds.observe(seconds)
        now = self.now()
        by_ticket: dict[Ticket, tuple[list[int], list[float]]] = {}
        for pair, score in zip(pairs, scores.tolist(), strict=True):
            indices, values = by_ticket.setdefault(_ticket(pair.owner), ([], []))
            indices.append(pair.row.document)
            values.append(score)
        for ticket, (indices, values) in by_ticket.items():
            if not ticket.closed and ticket.error is None:
                ticket.deliver(indices, values, now)
        self.pump()

    def on_batch_lost(self, batch_id: int, reason: str) -> None:
        """A replica died (or hung) holding a batch: run its pairs again once, elsewhere."""
        lost = self._take_in_flight(batch_id)
        if lost is None:
            return
        pairs, _, alone = lost
        self._metrics.batches_lost.inc()
        retry = []
        for pair in pairs:
            ticket = _ticket(pair.owner)
            if ticket.closed or ticket.error is not None:
                continue
            if pair.attempts >= 1:
                ticket.fail(ReplicaLostError(f"model replica lost twice while scoring: {reason}"))
                self._queue.drop(ticket)
            else:
                pair.attempts += 1
                retry.append(pair)
        log.warning("batch %d lost (%s); retrying %d pairs", batch_id, reason, len(retry))
        if alone and retry:
            self._isolated.appendleft(retry)  # still apart: its request may be the one at fault
        else:
            self._queue.requeue(retry)
        self.pump()

    def on_batch_failed(self, batch_id: int, reason: str) -> None:
        """The model raised on a batch. Its requests run again apart, one batch each, so that only
        the one at fault fails (ModelError); a batch of one request fails it at once."""
        failed = self._take_in_flight(batch_id)
        if failed is None:
            return
        pairs, _, alone = failed
        self._metrics.batches_failed.inc()
        by_ticket: dict[Ticket, list[QueuedRow]] = {}
        for pair in pairs:
            ticket = _ticket(pair.owner)
            if not ticket.closed and ticket.error is None:
                by_ticket.setdefault(ticket, []).append(pair)
        if alone or len(by_ticket) == 1:
            # The exception's text goes to the log only: it may echo the request's input.
            log.error("batch %d: the model failed on one request's pairs: %s", batch_id, reason)
            for ticket in by_ticket:
                ticket.fail(ModelError())
                self._queue.drop(ticket)
        elif by_ticket:
            log.warning(
                "batch %d: the model failed (%s); running its %d requests apart",
                batch_id,
                reason,
                len(by_ticket),
            )
            self._isolated.extend(by_ticket.values())
        self.pump()

    def on_replicas_changed(self, ready: int) -> None:
        """No replica ready: interactive requests fail at once (their clients retry elsewhere);
        streams, which cannot be retried once under way, wait up to BULK_OUTAGE_S for a restart."""
        self._metrics.replicas_ready.set(ready)
        if ready == 0:
            failed = [*self._queue.interactive_owners(), *(pairs[0].owner for pairs in self._isolated)]
            for owner in failed:
                self._queue.drop(owner)
                _ticket(owner).fail(NoReplicaError("no model replica is running; retry shortly"))
            self._isolated.clear()
            if self._outage is None:
                self._outage = self._loop.call_later(BULK_OUTAGE_S, self._outage_too_long)
        elif self._outage is not None:
            self._outage.cancel()
            self._outage = None
        self.pump()

    def _outage_too_long(self) -> None:
        self._outage = None
        if self._replicas.ready_count == 0:
            for owner in self._queue.drain():
                _ticket(owner).fail(
                    NoReplicaError(f"no model replica came back within {BULK_OUTAGE_S:g} s; retry later")
                )
            self._metrics.queued_pairs.set(0)

    def fail_all(self, error: RerankServerError) -> None:
        """Fail every request still waiting (the server is stopping)."""
        for owner in self._queue.drain():
            _ticket(owner).fail(error)
        for pairs in [*(pairs for pairs, _ in self._in_flight.values()), *self._isolated]:
            for pair in pairs:
                _ticket(pair.owner).fail(error)
        self._in_flight.clear()
        self._isolated.clear()
        self._alone.clear()
        self._watchdog.clear()
        if self._outage is not None:
            self._outage.cancel()
            self._outage = None
        self._metrics.queued_pairs.set(0)


def _ticket(owner: PairOwner) -> Ticket:
    """The queue holds only this scheduler's tickets as owners."""
    return cast(Ticket, owner)
