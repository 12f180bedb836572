"""The scheduler: requests' pairs in, batches out to idle replicas, scores back to requests.

Event driven on the server's event loop: every change (pairs queued, a replica
freed or ready, a batch's wait elapsed) pumps the queue into idle replicas.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from itertools import count
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from rerank_server.errors import (
    DeadlineExceededError,
    NoReplicaError,
    ReplicaLostError,
    RerankServerError,
)
from rerank_server.families.base import ModelSpec, Row, TokenBatch, pack_rows
from rerank_server.scheduling.batcher import PairOwner, PairQueue, QueuedRow

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

    def idle_replica(self) -> object | None: ...

    def dispatch(self, replica: object, batch_id: int, batch: TokenBatch) -> None: ...


class Ticket:
    """One request's handle: its rows in flight, and the scores as they come back (by document)."""

    def __init__(
        self,
        deadline: float | None,
        on_scores: ScoreSink,
        now: float,
        on_failure: Callable[[RerankServerError], None] | None = None,
    ) -> None:
        self.deadline = deadline
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


class Scheduler:
    def __init__(self, spec: ModelSpec, queue: PairQueue, replicas: Replicas, metrics: ModelMetrics) -> None:
        self._spec = spec
        self._queue = queue
        self._replicas = replicas
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._batch_ids = count()
        self._in_flight: dict[int, list[QueuedRow]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def now(self) -> float:
        return self._loop.time()

    def open(
        self,
        on_scores: ScoreSink,
        timeout: float | None,
        on_failure: Callable[[RerankServerError], None] | None = None,
    ) -> Ticket:
        """A request's ticket; on_failure hears of its failure at once, for callers that are not
        waiting on the ticket when it fails (a stream waiting for the client's next message)."""
        now = self.now()
        return Ticket(None if timeout is None else now + timeout, on_scores, now, on_failure)

    def submit(self, ticket: Ticket, rows: Sequence[Row], *, admit_over_limit: bool = False) -> None:
        """Queue a request's rows; raises OverloadedError or NoReplicaError at once."""
        ticket.raise_if_failed()
        self._require_a_replica()
        now = self.now()
        queued = [QueuedRow(ticket, row, now) for row in rows]
        self._queue.push(ticket, queued, admit_over_limit=admit_over_limit)
        ticket.pending += len(queued)
        self._metrics.queued_pairs.set(len(self._queue))
        self.pump()

    def check_room(self, pairs: int) -> None:
        """Refuse early, before tokenizing, a request the queue cannot take now."""
        self._require_a_replica()
        self._queue.check_room(pairs)

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

    def pump(self) -> None:
        """Fill idle replicas with batches while there is work."""
        while (replica := self._replicas.idle_replica()) is not None:
            plan = self._queue.next_batch(self.now(), spread=self._replicas.idle_count)
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

    def _arm_timer(self, when: float) -> None:
        if self._timer is not None and self._timer.when() <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.pump()

    def _dispatch(self, replica: object, pairs: list[QueuedRow]) -> None:
        batch_id = next(self._batch_ids)
        batch = pack_rows([pair.row for pair in pairs], self._spec)
        now = self.now()
        for pair in pairs:
            ticket = _ticket(pair.owner)
            if ticket.first_dispatch_at is None:
                ticket.first_dispatch_at = now
                self._metrics.queue_seconds.observe(now - ticket.opened_at)
        self._in_flight[batch_id] = pairs
        self._metrics.batches.inc()
        self._metrics.batch_pairs.observe(batch.rows)
        self._metrics.batch_tokens.observe(batch.rows * batch.width)
        self._replicas.dispatch(replica, batch_id, batch)

    # Called by the worker pool, on the event loop.

    def on_batch_done(self, batch_id: int, scores: npt.NDArray[np.float32], seconds: float) -> None:
        pairs = self._in_flight.pop(batch_id, None)
        if pairs is None:
            return
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
        """A replica died (or failed) holding a batch: run its pairs again once, elsewhere."""
        pairs = self._in_flight.pop(batch_id, None)
        if pairs is None:
            return
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
        self._queue.requeue(retry)
        self.pump()

    def on_replicas_changed(self, ready: int) -> None:
        self._metrics.replicas_ready.set(ready)
        if ready == 0:
            for owner in self._queue.drain():
                _ticket(owner).fail(NoReplicaError("no model replica is running; retry shortly"))
            self._metrics.queued_pairs.set(0)
        self.pump()

    def fail_all(self, error: RerankServerError) -> None:
        """Fail every request still waiting (the server is stopping)."""
        for owner in self._queue.drain():
            _ticket(owner).fail(error)
        for pairs in self._in_flight.values():
            for pair in pairs:
                _ticket(pair.owner).fail(error)
        self._in_flight.clear()
        self._metrics.queued_pairs.set(0)


def _ticket(owner: PairOwner) -> Ticket:
    """The queue holds only this scheduler's tickets as owners."""
    return cast(Ticket, owner)
