"""The benchmark's texts: the same for the same seed, and of the lengths each workload promises."""

from __future__ import annotations

import itertools
import statistics
import time

import pytest
from rerank_bench.workloads import TokenCounter, default_tokenizer_path, make_workload, stream_documents


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter(default_tokenizer_path())


def test_a_seed_gives_the_same_texts_and_another_seed_others(counter: TokenCounter) -> None:
    first, again, other = (make_workload("mixed", counter, seed) for seed in (0, 0, 1))
    assert first.passages == again.passages and first.queries == again.queries
    assert first.request(5) == again.request(5)
    assert first.passages != other.passages


def test_a_passage_has_the_tokens_its_words_add_up_to(counter: TokenCounter) -> None:
    workload = make_workload("mixed", counter, 0)
    for passage in workload.passages[:40]:
        assert counter.count(passage) == sum(counter.word(word) for word in passage.split())


def test_uniform_and_tiny_passages_are_just_under_their_budget(counter: TokenCounter) -> None:
    uniform = make_workload("uniform", counter, 0)
    tiny = make_workload("tiny", counter, 0)
    assert len(uniform.request(0)[1]) == 20 and len(tiny.request(0)[1]) == 3
    assert all(96 <= n <= 100 for n in uniform.doc_tokens)
    assert all(26 <= n <= 30 for n in tiny.doc_tokens)


def test_mixed_lengths_spread_log_normal_around_100_tokens(counter: TokenCounter) -> None:
    workload = make_workload("mixed", counter, 0, blocks=40)  # 800 passages
    lengths = workload.doc_tokens
    assert min(lengths) >= 8 and max(lengths) <= 400
    assert 85 <= statistics.fmean(lengths) <= 110
    assert statistics.median(lengths) < statistics.fmean(lengths)  # skewed right, as log-normal is
    assert sum(n < 40 for n in lengths) > 0.05 * len(lengths)  # many short passages...
    assert sum(n > 200 for n in lengths) > 0.03 * len(lengths)  # ...and some long ones


def test_requests_rotate_through_distinct_blocks(counter: TokenCounter) -> None:
    workload = make_workload("uniform", counter, 0, blocks=48)
    blocks = {tuple(workload.request(n)[1]) for n in range(48)}
    assert len(blocks) == 48
    assert workload.request(48)[1] == workload.request(0)[1]


def test_the_stream_is_made_lazily_and_deterministically(counter: TokenCounter) -> None:
    started = time.perf_counter()
    head = list(itertools.islice(stream_documents(counter, 10**9, 0, chunk=64), 100))
    assert time.perf_counter() - started < 5  # a billion passages were not made up front
    assert head == list(itertools.islice(stream_documents(counter, 10**9, 0, chunk=64), 100))
    assert len(list(stream_documents(counter, 130, 0, chunk=64))) == 130
    lengths = [counter.count(p) for p in head]
    assert min(lengths) >= 8 and max(lengths) <= 400 and len(set(lengths)) > 20
