"""Dynamic, token-budgeted batching with fairness across requests; pure logic, no I/O.

Each request's pending pairs are kept sorted by length (longest first), so a
batch cut from one request holds pairs of similar length and pads little.
Requests take turns leading a batch (round robin): a large request is spread
over every free replica, yet a small request that arrives behind it leads the
next batch instead of waiting for the large one to finish. A batch takes pairs
while rows x longest row stays within `max_batch_tokens` and rows within
`max_batch_size`; an unfilled batch waits up to `max_wait` for more pairs.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from rerank_server.errors import OverloadedError
from rerank_server.families.base import Row


class PairOwner(Protocol):
    """The request a pair belongs to, as the batcher sees it."""

    @property
    def deadline(self) -> float | None: ...

    @property
    def closed(self) -> bool: ...


class QueuedRow:
    """One token row waiting for a replica."""

    __slots__ = ("attempts", "enqueued_at", "owner", "row")

    def __init__(self, owner: PairOwner, row: Row, enqueued_at: float) -> None:
        self.owner = owner
        self.row = row
        self.enqueued_at = enqueued_at
        self.attempts = 0

    @property
    def length(self) -> int:
        return self.row.length


@dataclass
class BatchPlan:
    """What `next_batch` decided: pairs to run now, and requests whose pairs were dropped."""

    pairs: list[QueuedRow] = field(default_factory=list)
    expired: list[PairOwner] = field(default_factory=list)
    dropped_pairs: int = 0
    wait_until: float | None = None  # set when the batch is held for more pairs


class PairQueue:
    def __init__(self, max_batch_tokens: int, max_batch_size: int, max_pairs: int, max_wait: float) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_pairs = max_pairs
        self.max_wait = max_wait
        self._by_owner: OrderedDict[PairOwner, deque[QueuedRow]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def check_room(self, pairs: int) -> None:
        """Raise OverloadedError when `pairs` more would pass the queue's bound."""
        if self._size + pairs > self.max_pairs:
            raise OverloadedError(
                f"queue full: {self._size} pairs queued, {pairs} more would pass the limit "
                f"of {self.max_pairs}; retry later"
            )

    def push(self, owner: PairOwner, pairs: Iterable[QueuedRow], *, admit_over_limit: bool = False) -> None:
        """Queue a request's pairs, all or none: past the bound it raises OverloadedError at once."""
        ordered = sorted(pairs, key=lambda p: p.length, reverse=True)
        if not ordered:
            return
        if not admit_over_limit:
            self.check_room(len(ordered))
        added = len(ordered)
        queued = self._by_owner.get(owner)
        if queued:
            ordered = sorted([*queued, *ordered], key=lambda p: p.length, reverse=True)
        self._by_owner[owner] = deque(ordered)
        self._size += added

    def requeue(self, pairs: Iterable[QueuedRow]) -> None:
        """Put back pairs a lost replica held, ahead of their owners' other pairs."""
        by_owner: dict[PairOwner, list[QueuedRow]] = {}
        for pair in pairs:
            by_owner.setdefault(pair.owner, []).append(pair)
        for owner, owned in by_owner.items():
            queue = self._by_owner.setdefault(owner, deque())
            queue.extendleft(reversed(owned))
            self._by_owner.move_to_end(owner, last=False)
            self._size += len(owned)

    def drop(self, owner: PairOwner) -> int:
        """Forget an owner's pending pairs (cancelled, failed); returns how many."""
        queue = self._by_owner.pop(owner, None)
        count = len(queue) if queue else 0
        self._size -= count
        return count

    def drain(self) -> list[PairOwner]:
        """Drop everything; returns the owners that had pairs queued."""
        owners = list(self._by_owner)
        self._by_owner.clear()
        self._size = 0
        return owners

    def oldest_enqueued_at(self) -> float | None:
        return min((q[0].enqueued_at for q in self._by_owner.values() if q), default=None)

    def next_batch(self, now: float, *, flush: bool = False, spread: int = 1) -> BatchPlan:
        """Cut the next batch. Pairs of closed or expired owners are dropped, never batched.

        `spread` idle replicas share the queued pairs: a batch takes at most its share, so a
        request that would fit one batch still runs on every idle replica at once. A batch that
        is not full is held (empty plan with `wait_until`) until its oldest pair has waited
        `max_wait`, unless `flush` is set.
        """
        plan = BatchPlan()
        for owner in list(self._by_owner):
            if owner.closed or (owner.deadline is not None and owner.deadline <= now):
                plan.dropped_pairs += self.drop(owner)
                if not owner.closed:
                    plan.expired.append(owner)

        share = -(-self._size // spread) if spread > 1 else self.max_batch_size  # ceil(size / spread)
        max_rows = min(self.max_batch_size, share)
        rows = longest = 0
        taken: list[tuple[PairOwner, int]] = []
        full = False
        for owner, queue in self._by_owner.items():
            count = 0
            for pair in queue:
                new_longest = max(longest, pair.length)
                if rows + 1 > max_rows or (rows + 1) * new_longest > self.max_batch_tokens:
                    full = True
                    break
                rows, longest, count = rows + 1, new_longest, count + 1
            if count:
                taken.append((owner, count))
            if full:
                break
        if not taken:
            return plan

        oldest = self.oldest_enqueued_at()
        if oldest is not None and not (full or flush or now >= oldest + self.max_wait):
            plan.wait_until = oldest + self.max_wait
            return plan

        for owner, count in taken:
            queue = self._by_owner[owner]
            plan.pairs.extend(queue.popleft() for _ in range(count))
            if queue:
                self._by_owner.move_to_end(owner)
            else:
                del self._by_owner[owner]
        self._size -= len(plan.pairs)
        # The lead request goes to the back so the next batch is led by another request.
        lead = taken[0][0]
        if lead in self._by_owner:
            self._by_owner.move_to_end(lead)
        return plan
