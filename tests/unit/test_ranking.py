"""Result order: score descending, ties by index ascending, at most top_n; the stream's top_n heap."""

from __future__ import annotations

import random

from rerank_client.types import RankedDocument
from rerank_server.ranking import TopN, rank


def sample(n: int, seed: int = 0) -> list[RankedDocument]:
    rng = random.Random(seed)
    # Few distinct scores, so ties are common.
    return [RankedDocument(i, rng.choice([0.1, 0.5, 0.5, 0.9]), f"doc {i}") for i in range(n)]


def expected_order(results: list[RankedDocument]) -> list[int]:
    return [r.index for r in sorted(results, key=lambda r: (-r.score, r.index))]


def test_rank_sorts_by_score_then_index() -> None:
    results = sample(200)
    assert [r.index for r in rank(results, 0)] == expected_order(results)
    tied = [RankedDocument(2, 0.5), RankedDocument(0, 0.5), RankedDocument(1, 0.5)]
    assert [r.index for r in rank(tied, 0)] == [0, 1, 2]


def test_rank_cuts_to_top_n() -> None:
    results = sample(200)
    assert [r.index for r in rank(results, 7)] == expected_order(results)[:7]
    assert len(rank(results, 1000)) == 200


def test_top_n_heap_keeps_the_best_of_a_stream_in_order() -> None:
    results = sample(5000, seed=3)
    shuffled = results[:]
    random.Random(1).shuffle(shuffled)
    top = TopN(10)
    for result in shuffled:
        top.offer(result)
    kept = top.results()
    assert [r.index for r in kept] == expected_order(results)[:10]
    assert all(r.document == f"doc {r.index}" for r in kept)
    assert len(top._heap) == 10
