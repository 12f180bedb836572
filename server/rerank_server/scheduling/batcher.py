"""Dynamic, token-budgeted, length-aware batching with priority and fairness; pure logic, no I/O.

Each request's pending pairs are kept sorted by length (longest first). Requests take turns
leading a batch (round robin): the lead's longest pair sets the batch's width, and the batch takes
the longest pairs that fit that width from every request, so pairs of similar length share a
batch across requests and pad little. A large request is spread over every free replica, yet a
small request that arrives behind it leads the next batch instead of waiting for the large one to
finish. A batch takes pairs while rows x width stays within `max_batch_tokens`, rows within
`max_batch_size`, and real tokens at least `MIN_REAL_SHARE` of the padded ones or its padding
within `PAD_SLACK` tokens (a pair much shorter than the width waits for a batch of its own
length); an unfilled batch waits up to `max_wait` for more pairs.

Interactive requests come before bulk ones (streams): while any interactive pair is queued,
batches hold interactive pairs only, and a bulk batch may be held to fewer tokens (the scheduler
sizes it to a short time), so an interactive request never waits long behind bulk work. So that
streams are not starved by sustained interactive load, the queue keeps the time since bulk work
last got a batch (`bulk_starved`); once that is too long, the scheduler asks for the next batch to
be a bulk one (`next_batch(bulk_first=True)`).

The queue is bounded in pairs and in tokens (its memory). An interactive request past either bound,
or one that would wait longer than `max_delay` behind the interactive work queued ahead of it, is
refused at once. Bulk work waits for room instead, and fills at most `BULK_SHARE` of either bound,
so streams never crowd interactive requests out; a bulk part that alone passes that share is taken
when the queue is empty, so no stream can wait forever.
"""

from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol

from rerank_server.errors import OverloadedError
from rerank_server.families.base import Row

# A batch stops taking pairs where real tokens would fall under this share of its padded tokens,
# unless its padding stays within PAD_SLACK tokens in all (too little to split a batch for).
MIN_REAL_SHARE = 0.9
PAD_SLACK = 128
# Bulk work (streams) may fill this share of the queue's bounds; the rest is kept for interactive calls.
BULK_SHARE = 0.5


class PairOwner(Protocol):
    """The request a pair belongs to, as the batcher sees it."""

    @property
    def deadline(self) -> float | None: ...

    @property
    def closed(self) -> bool: ...

    @property
    def bulk(self) -> bool:
        """Bulk work (a stream) yields to interactive requests."""
        ...


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
    def __init__(
        self,
        max_batch_tokens: int,
        max_batch_size: int,
        max_pairs: int,
        max_wait: float,
        *,
        max_tokens: int | None = None,
        max_delay: float = 0.0,
    ) -> None:
        """`max_tokens` None: no bound in tokens; `max_delay` (seconds) 0: no bound on the wait."""
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_pairs = max_pairs
        self.max_tokens = max_tokens
        self.max_delay = max_delay
        self.max_wait = max_wait
        # Each owner's pairs, longest first (ties: in the order they came).
        self._by_owner: OrderedDict[PairOwner, list[QueuedRow]] = OrderedDict()
        self._size = 0
        self.tokens = 0  # real tokens queued, of every owner
        self.interactive_tokens = 0  # of those, the interactive owners'
        # While bulk pairs are queued: when bulk work last got a batch, or came into a queue with none.
        self._bulk_since = 0.0

    def __len__(self) -> int:
        return self._size

    def check_room(self, pairs: int, tokens: int = 0, *, speed: float | None = None) -> None:
        """Raise OverloadedError when an interactive request of `pairs` (and `tokens`) would pass a
        bound, or, given the replicas' `speed` in tokens per second, would wait past `max_delay`
        behind the interactive work queued ahead of it."""
        if self._size + pairs > self.max_pairs:
            raise OverloadedError(
                f"queue full: {self._size} pairs queued, {pairs} more would pass the limit "
                f"of {self.max_pairs} (max_queued_pairs); retry later"
            )
        if self.max_tokens is not None and self.tokens + tokens > self.max_tokens:
            raise OverloadedError(
                f"queue full: {self.tokens} tokens queued, {tokens} more would pass the limit "
                f"of {self.max_tokens} (max_queued_tokens); retry later"
            )
        if self.max_delay and speed:
            delay = self.interactive_tokens / speed
            if delay > self.max_delay:
                raise OverloadedError(
                    f"queue too long: about {1000 * delay:.0f} ms of work queued ahead, past the limit "
                    f"of {1000 * self.max_delay:.0f} ms (max_queue_delay_ms); retry later"
                )

    def has_bulk_room(self, pairs: int, tokens: int) -> bool:
        """Whether bulk work of `pairs` and `tokens` may be queued now: within BULK_SHARE of the
        bounds, or into an empty queue (a part larger than the share alone)."""
        if not self._size:
            return True
        if self._size + pairs > BULK_SHARE * self.max_pairs:
            return False
        return self.max_tokens is None or self.tokens + tokens <= BULK_SHARE * self.max_tokens

    def push(self, owner: PairOwner, pairs: Iterable[QueuedRow]) -> None:
        """Queue a request's pairs, all or none: past the bound it raises OverloadedError at once
        (bulk work checks `has_bulk_room` first, and waits for it)."""
        ordered = sorted(pairs, key=lambda p: p.length, reverse=True)
        if not ordered:
            return
        tokens = sum(pair.length for pair in ordered)
        if not owner.bulk:
            self.check_room(len(ordered), tokens)
        elif not self.has_bulk_room(len(ordered), tokens):
            raise OverloadedError(
                f"queue full for streams: {self._size} pairs and {self.tokens} tokens queued; retry later"
            )
        added = len(ordered)
        self._note_bulk_arrival(owner, ordered)
        queued = self._by_owner.get(owner)
        if queued:
            ordered = sorted([*queued, *ordered], key=lambda p: p.length, reverse=True)
        self._by_owner[owner] = ordered
        self._size += added
        self._count_tokens(owner, tokens)

    def _note_bulk_arrival(self, owner: PairOwner, pairs: list[QueuedRow]) -> None:
        """Bulk pairs coming into a queue with none start the clock of `bulk_starved`."""
        if owner.bulk and not self.has_bulk():
            self._bulk_since = min(pair.enqueued_at for pair in pairs)

    def _count_tokens(self, owner: PairOwner, tokens: int) -> None:
        """Add (or, negative, remove) an owner's queued tokens."""
        self.tokens += tokens
        if not owner.bulk:
            self.interactive_tokens += tokens

    def requeue(self, pairs: Iterable[QueuedRow]) -> None:
        """Put back pairs a lost replica held, ahead of their owners' other pairs."""
        by_owner: dict[PairOwner, list[QueuedRow]] = {}
        for pair in pairs:
            by_owner.setdefault(pair.owner, []).append(pair)
        for owner, owned in by_owner.items():
            self._note_bulk_arrival(owner, owned)
            queue = self._by_owner.setdefault(owner, [])
            for pair in reversed(owned):  # before the owner's pairs of the same length, in order
                bisect.insort_left(queue, pair, key=_descending)
            self._by_owner.move_to_end(owner, last=False)
            self._size += len(owned)
            self._count_tokens(owner, sum(pair.length for pair in owned))

    def drop(self, owner: PairOwner) -> int:
        """Forget an owner's pending pairs (cancelled, failed); returns how many."""
        queue = self._by_owner.pop(owner, None)
        if not queue:
            return 0
        self._size -= len(queue)
        self._count_tokens(owner, -sum(pair.length for pair in queue))
        return len(queue)

    def drain(self) -> list[PairOwner]:
        """Drop everything; returns the owners that had pairs queued."""
        owners = list(self._by_owner)
        self._by_owner.clear()
        self._size = 0
        self.tokens = self.interactive_tokens = 0
        return owners

    def interactive_owners(self) -> list[PairOwner]:
        """The owners of the interactive (not bulk) pairs queued."""
        return [owner for owner in self._by_owner if not owner.bulk]

    def has_interactive(self) -> bool:
        """Whether interactive pairs are queued (the next batch is theirs, unless `bulk_first`)."""
        return any(not owner.bulk for owner in self._by_owner)

    def has_bulk(self) -> bool:
        """Whether bulk pairs are queued."""
        return self.tokens > self.interactive_tokens  # every row holds at least one token

    def bulk_starved(self, now: float, after: float) -> bool:
        """Whether bulk pairs are queued and have had no batch for `after` seconds."""
        return self.has_bulk() and now - self._bulk_since >= after

    def next_batch(
        self,
        now: float,
        *,
        flush: bool = False,
        spread: int = 1,
        bulk_max_tokens: int | None = None,
        bulk_first: bool = False,
    ) -> BatchPlan:
        """Cut the next batch. Pairs of closed or expired owners are dropped, never batched.

        `spread` idle replicas share the queued pairs: a batch takes at most its share, so a
        request that would fit one batch still runs on every idle replica at once. A batch that
        is not full is held (empty plan with `wait_until`) until its oldest pair has waited
        `max_wait`, unless `flush` is set. A bulk batch holds at most `bulk_max_tokens` padded
        tokens (and always one pair). With `bulk_first` (bulk work starved), the batch is a bulk
        one though interactive pairs are queued, and it is never held.
        """
        plan = BatchPlan()
        for owner in list(self._by_owner):
            if owner.closed or (owner.deadline is not None and owner.deadline <= now):
                plan.dropped_pairs += self.drop(owner)
                if not owner.closed:
                    plan.expired.append(owner)

        if not self._by_owner:
            return plan
        # Interactive owners alone while they have pairs (unless bulk work is starved); else the bulk ones.
        bulk = [owner for owner in self._by_owner if owner.bulk]
        interactive = [owner for owner in self._by_owner if not owner.bulk]
        owners = bulk if bulk_first and bulk else interactive or bulk
        max_tokens = self.max_batch_tokens
        if owners[0].bulk:
            flush = flush or bulk_first
            if bulk_max_tokens is not None:
                max_tokens = min(max_tokens, bulk_max_tokens)
        size = sum(len(self._by_owner[owner]) for owner in owners)
        share = -(-size // spread) if spread > 1 else self.max_batch_size  # ceil(size / spread)
        max_rows = min(self.max_batch_size, share)
        lead = owners[0]
        width = self._by_owner[lead][0].length
        max_tokens = max(max_tokens, width)
        # Every owner's pairs that fit the lead's width, merged longest first (ties: owner order).
        starts = {
            owner: bisect.bisect_left(self._by_owner[owner], -width, key=_descending) for owner in owners
        }
        candidates = heapq.merge(
            *(islice(self._by_owner[owner], starts[owner], None) for owner in owners), key=_descending
        )
        taken: list[QueuedRow] = []
        real = 0
        full = False
        for pair in candidates:
            rows = len(taken) + 1
            if rows > max_rows or rows * width > max_tokens:
                full = True
                break
            padding = rows * width - real - pair.length
            if padding > PAD_SLACK and real + pair.length < MIN_REAL_SHARE * rows * width:
                full = True  # the rest are shorter still: they make batches of their own
                break
            taken.append(pair)
            real += pair.length
        if not taken:
            return plan

        oldest = min(self._by_owner[owner][0].enqueued_at for owner in owners)
        if not (full or flush or now >= oldest + self.max_wait):
            plan.wait_until = oldest + self.max_wait
            return plan

        counts: dict[PairOwner, int] = {}
        for pair in taken:
            counts[pair.owner] = counts.get(pair.owner, 0) + 1
            self._count_tokens(pair.owner, -pair.length)
        for owner in [o for o in owners if o in counts]:
            queue = self._by_owner[owner]
            del queue[starts[owner] : starts[owner] + counts[owner]]  # a run: taken longest first
            if queue:
                self._by_owner.move_to_end(owner)
            else:
                del self._by_owner[owner]
        plan.pairs = taken
        self._size -= len(taken)
        if lead.bulk:
            self._bulk_since = now
        # The lead request goes to the back so the next batch is led by another request.
        if lead in self._by_owner:
            self._by_owner.move_to_end(lead)
        return plan


def _descending(pair: QueuedRow) -> int:
    return -pair.length
