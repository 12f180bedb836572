"""bfloat16 on the CPU (what dtype auto picks where the CPU has native bfloat16 units) ranks as float32.

The real all-MiniLM-L6-v2 weights with a one-logit head, scored through the server's own row builder
and scorer in both dtypes, on requests of passages of mixed lengths: the same top-1 on every
request and at least 9 of the top 10 in common, the agreement the README promises.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from rerank_server.families import describe_model, load_row_builder, load_scorer
from rerank_server.families.base import RowOptions, pack_rows

SENTENCES = (
    "Giant pandas spend most of the day eating bamboo shoots and leaves.",
    "The central bank raised interest rates by a quarter point on Wednesday.",
    "A healthy adult needs between seven and nine hours of sleep each night.",
    "The Amazon river carries more water than any other river on Earth.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The first practical telephone was patented in 1876.",
    "Regular exercise lowers the risk of heart disease and type 2 diabetes.",
    "Bamboo can grow almost a metre in a single day.",
    "The museum reopens on Monday after a two-year renovation.",
    "Volcanic eruptions can cool the planet for several years.",
    "Python lists grow by over-allocating memory, so appends are cheap on average.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Pandas are born pink and blind, and weigh about a hundred grams.",
    "The marathon runner finished in just over two hours.",
    "Solar panels convert about a fifth of the sunlight they receive into electricity.",
    "In winter the lake freezes thick enough to drive across.",
    "Most of a panda's habitat lies in the mountains of central China.",
    "Interest on the loan is charged monthly on the remaining balance.",
    "The library lends e-books for up to three weeks.",
    "Wild pandas live alone and meet only to mate.",
)
QUERIES = (
    "what do giant pandas eat",
    "how much sleep do adults need",
    "why did the central bank raise rates",
    "how efficient are solar panels",
    "where do wild pandas live",
    "what are the health benefits of exercise",
    "which river carries the most water",
    "when was the telephone invented",
)
REQUESTS = 16
PASSAGES = 20


def passages(rng: random.Random) -> list[str]:
    """Passages of 1 to about 12 sentences, log-normal, as retrieved passages come."""
    counts = [min(12, max(1, round(rng.lognormvariate(1.0, 0.8)))) for _ in range(PASSAGES)]
    return [" ".join(rng.choice(SENTENCES) for _ in range(count)) for count in counts]


@pytest.fixture(scope="module")
def minilm_cross_encoder_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)  # the one-logit head is new: seeded
    model = BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=1)
    path = tmp_path_factory.mktemp("minilm-cross-encoder")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(path)
    return path


def test_bfloat16_keeps_the_top_1_and_9_of_the_top_10_of_float32(minilm_cross_encoder_dir: Path) -> None:
    spec = describe_model(str(minilm_cross_encoder_dir))
    rows = load_row_builder(spec)
    scorers = {dtype: load_scorer(spec, "cpu", dtype) for dtype in ("float32", "bfloat16")}
    rng = random.Random(0)
    overlaps, differences = [], []
    for n in range(REQUESTS):
        batch = pack_rows(rows.rows(QUERIES[n % len(QUERIES)], passages(rng), RowOptions(512), 0), spec)
        full, half = (scorers[dtype].score(batch) for dtype in ("float32", "bfloat16"))
        assert np.argmax(half) == np.argmax(full), f"request {n}: top-1 differs"
        overlaps.append(len(set(np.argsort(-full)[:10]) & set(np.argsort(-half)[:10])))
        differences.append(float(np.max(np.abs(full - half))))
    assert min(overlaps) >= 9, overlaps
    assert max(differences) < 0.1, differences  # rounding, not a different model
