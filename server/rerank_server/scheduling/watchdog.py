"""Finds hung workers: a batch still running long past the time its size predicts.

A replica runs its batches in the order they were sent, so only its oldest unfinished batch is
running; the ones behind it wait, and the clock of each starts when the one ahead finishes. One
timer, for the earliest deadline of any replica's running batch, is all it takes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class BatchWatchdog:
    """Times every replica's running batch against its budget; calls `on_hung(replica, batch_id,
    budget_s)` once for a batch still running past it (the replica is then the pool's to replace)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_hung: Callable[[object, int, float], None]
    ) -> None:
        self._loop = loop
        self._on_hung = on_hung
        self._batches: dict[object, deque[tuple[int, float]]] = {}  # replica -> (batch id, budget s)
        self._replica_of: dict[int, object] = {}
        self._deadlines: dict[object, float] = {}  # replica -> when its running batch is overdue
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, replica: object, batch_id: int, budget_s: float) -> None:
        """A batch was sent to `replica`; it may run `budget_s` once the batches ahead of it finish."""
        batches = self._batches.setdefault(replica, deque())
        batches.append((batch_id, budget_s))
        self._replica_of[batch_id] = replica
        if len(batches) == 1:
            self._start_next(replica)

    def finished(self, batch_id: int) -> None:
        """The batch came back (done, failed or lost); the next one on its replica starts."""
        replica = self._replica_of.pop(batch_id, None)
        if replica is None:
            return
        batches = self._batches[replica]
        running = batches[0][0] == batch_id
        batches.remove(next(entry for entry in batches if entry[0] == batch_id))
        if not batches:
            del self._batches[replica]
        if running:
            self._deadlines.pop(replica, None)
            self._start_next(replica)

    def _start_next(self, replica: object) -> None:
        batches = self._batches.get(replica)
        if batches:
            self._deadlines[replica] = self._loop.time() + batches[0][1]
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._deadlines:
            self._timer = self._loop.call_at(min(self._deadlines.values()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._loop.time()
        overdue = [replica for replica, deadline in self._deadlines.items() if deadline <= now]
        for replica in overdue:
            # Timed no more: its batches come back lost once the pool has replaced it.
            del self._deadlines[replica]
        self._arm()
        for replica in overdue:
            self._on_hung(replica, *self._batches[replica][0])

    def clear(self) -> None:
        """Forget every batch (the server is stopping)."""
        self._batches.clear()
        self._replica_of.clear()
        self._deadlines.clear()
        self._arm()
