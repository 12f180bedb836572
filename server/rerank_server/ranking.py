"""Ordering of results: score descending, ties by index ascending, at most top_n."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from rerank_client.types import RankedDocument


def rank(results: Iterable[RankedDocument], top_n: int) -> list[RankedDocument]:
    """All results ordered, or the best top_n of them (top_n 0 = all)."""
    key = _order_key
    if top_n:
        return heapq.nsmallest(top_n, results, key=key)
    return sorted(results, key=key)


def _order_key(result: RankedDocument) -> tuple[float, int]:
    return (-result.score, result.index)


class TopN:
    """The best n results seen so far, in O(n) memory, for streams of any length."""

    def __init__(self, n: int) -> None:
        self._n = n
        # Min-heap on the order key reversed: the root is the worst kept result.
        self._heap: list[tuple[float, int, RankedDocument]] = []

    def offer(self, result: RankedDocument) -> None:
        entry = (result.score, -result.index, result)
        if len(self._heap) < self._n:
            heapq.heappush(self._heap, entry)
        elif entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)

    def results(self) -> list[RankedDocument]:
        return rank((entry[2] for entry in self._heap), 0)
