"""Ordering of results: raw score descending, ties by index ascending, at most top_n.

Ranking uses the raw score: a float32 normalized score saturates at 1.0 for large logits (LLM
rerankers reach them) and would tie, while the normalizations are monotonic in the raw score.
"""

from __future__ import annotations

import heapq

import numpy as np
import numpy.typing as npt

from rerank_server.types import RankedDocument


def order(raw: npt.NDArray[np.float32], top_n: int) -> npt.NDArray[np.intp]:
    """Positions of the best raw scores first (ties by position), at most top_n of them (0 = all)."""
    best_first = np.argsort(-raw, kind="stable")
    return best_first[:top_n] if top_n else best_first


class TopN:
    """The best n results seen so far by raw score, in O(n) memory, for streams of any length."""

    def __init__(self, n: int) -> None:
        self._n = n
        # Min-heap on (raw, -index): the root is the worst kept result.
        self._heap: list[tuple[float, int, RankedDocument]] = []

    def offer(self, raw: float, result: RankedDocument) -> RankedDocument | None:
        """Keep `result` if it ranks; returns the result this leaves out (the one it displaced, or
        `result` itself), None while fewer than n are kept."""
        entry = (raw, -result.index, result)
        if len(self._heap) < self._n:
            heapq.heappush(self._heap, entry)
            return None
        if entry[:2] > self._heap[0][:2]:
            return heapq.heapreplace(self._heap, entry)[2]
        return result

    def results(self) -> list[RankedDocument]:
        return [entry[2] for entry in sorted(self._heap, key=lambda e: (-e[0], -e[1]))]
