"""Result order: raw score descending, ties by index ascending, at most top_n; the stream's top_n heap."""

from __future__ import annotations

import random

import numpy as np
from rerank_server.ranking import TopN, order
from rerank_server.types import RankedDocument


def sample(n: int, seed: int = 0) -> np.ndarray:
    rng = random.Random(seed)
    # Few distinct scores, so ties are common.
    return np.array([rng.choice([0.1, 0.5, 0.5, 0.9]) for _ in range(n)], dtype=np.float32)


def expected_order(raw: np.ndarray) -> list[int]:
    return sorted(range(len(raw)), key=lambda i: (-raw[i], i))


def test_order_sorts_by_raw_score_then_index() -> None:
    raw = sample(200)
    assert order(raw, 0).tolist() == expected_order(raw)
    assert order(np.array([0.5, 0.5, 0.5], dtype=np.float32), 0).tolist() == [0, 1, 2]


def test_order_cuts_to_top_n() -> None:
    raw = sample(200)
    assert order(raw, 7).tolist() == expected_order(raw)[:7]
    assert len(order(raw, 1000)) == 200


def test_raw_scores_rank_what_saturated_normalized_scores_would_tie() -> None:
    """sigmoid(20) and sigmoid(30) are both exactly 1.0 in float32: only the raw score tells them apart."""
    raw = np.array([20.0, 30.0, 25.0], dtype=np.float32)
    normalized = (1 / (1 + np.exp(-raw.astype(np.float64)))).astype(np.float32)
    assert len(set(normalized.tolist())) == 1
    assert order(raw, 0).tolist() == [1, 2, 0]


def test_top_n_heap_keeps_the_best_of_a_stream_in_order() -> None:
    raw = sample(5000, seed=3)
    positions = list(range(len(raw)))
    random.Random(1).shuffle(positions)
    top = TopN(10)
    for i in positions:
        top.offer(float(raw[i]), RankedDocument(i, 1.0, f"doc {i}"))  # reported scores all tie
    kept = top.results()
    assert [r.index for r in kept] == expected_order(raw)[:10]
    assert all(r.document == f"doc {r.index}" for r in kept)
    assert len(top._heap) == 10
