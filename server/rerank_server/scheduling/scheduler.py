"""The scheduler: requests' pairs in, batches out to idle replicas, scores back to requests.

Event driven on the server's event loop: every change (pairs queued, a replica
freed or ready, a batch's wait elapsed) pumps the queue into idle replicas. A replica with
nothing in flight takes what is queued at once; an unfilled batch for a busy one waits up to
max_wait for more pairs, time it would spend waiting for the replica anyway.

Bulk work (streams) is kept short in time so that interactive requests get through it: a bulk
batch holds about `bulk_batch_s` of work at the replicas' measured speed (padded tokens per
second), and goes only to a replica with nothing in flight, so a new interactive request waits at
most for one such batch.
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

    def idle_replica(self, *, busy_ok: bool = True) -> object | None:
        """A ready replica with room for a batch; with busy_ok False, only one with none in flight."""
        ...

    def busy(self, replica: object) -> bool:
        """Whether the replica has a batch in flight (a new one would wait for it anyway)."""
        ...

    def dispatch(self, replica: object, batch_id: int, batch: TokenBatch) -> None: ...


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


# Until a batch has been timed, a bulk batch holds at most this many padded tokens.
FIRST_BULK_TOKENS = 2048
# Weight of the latest batch in the replicas' speed (padded tokens per second), a moving average.
SPEED_WEIGHT = 0.2


class Scheduler:
    def __init__(
        self,
        spec: ModelSpec,
        queue: PairQueue,
        replicas: Replicas,
        metrics: ModelMetrics,
        bulk_batch_s: float = 0.1,
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
        A bulk request's pairs wait while interactive ones are queued."""
        now = self.now()
        return Ticket(None if timeout is None else now + timeout, on_scores, now, on_failure, bulk)

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

    def bulk_max_tokens(self) -> int:
        """The padded tokens a bulk batch may hold: about bulk_batch_s of one replica's work."""
        if self.tokens_per_s is None:
            return FIRST_BULK_TOKENS
        return max(1, int(self.tokens_per_s * self._bulk_batch_s))

    def pump(self) -> None:
        """Fill idle replicas with batches while there is work."""
        while (replica := self._replicas.idle_replica(busy_ok=self._queue.has_interactive())) is not None:
            # An unfilled batch waits for more pairs only where it would wait for the replica anyway.
            plan = self._queue.next_batch(
                self.now(),
                flush=not self._replicas.busy(replica),
                spread=self._replicas.idle_count,
                bulk_max_tokens=self.bulk_max_tokens(),
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
        padded = batch.rows * batch.width
        self._in_flight[batch_id] = (pairs, padded)
        self._metrics.batches.inc()
        self._metrics.batch_pairs.observe(batch.rows)
        self._metrics.batch_tokens.observe(padded)
        self._metrics.batch_real_tokens.inc(len(batch.tokens["input_ids"]))
        self._replicas.dispatch(replica, batch_id, batch)

    # Called by the worker pool, on the event loop.

    def on_batch_done(self, batch_id: int, scores: npt.NDArray[np.float32], seconds: float) -> None:
        done = self._in_flight.pop(batch_id, None)
        if done is None:
            return
        pairs, padded = done
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
        """A replica died (or failed) holding a batch: run its pairs again once, elsewhere."""
        lost = self._in_flight.pop(batch_id, None)
        if lost is None:
            return
        pairs = lost[0]
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
        for pairs, _ in self._in_flight.values():
            for pair in pairs:
                _ticket(pair.owner).fail(error)
        self._in_flight.clear()
        self._metrics.queued_pairs.set(0)


def _ticket(owner: PairOwner) -> Ticket:
    """The queue holds only this scheduler's tickets as owners."""
    return cast(Ticket, owner)
