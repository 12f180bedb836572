"""The shared-memory transport alone: layout, round trips, ownership across processes."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
from rerank_server.families.base import ModelSpec, TokenBatch
from rerank_server.transport.shm import (
    SHM_DIR,
    AttachedSegment,
    BatchDescriptor,
    OwnedSegment,
    SegmentLayout,
    leftover_segments,
)

# A layerwise-shaped spec: one extra token column and one per-row value.
SPEC = ModelSpec(
    "tiny", "test", 64, 64, 4, 0, token_columns=("token_type_ids",), row_values={"cutoff_layer": 6}
)
LAYOUT = SegmentLayout.for_spec(SPEC, max_tokens=4096, max_rows=64)


def sample_batch(rows: int = 3, cols: int = 7) -> TokenBatch:
    """rows rows of lengths cols, cols - 1, ... (at least 1)."""
    rng = np.random.default_rng(0)
    lengths = np.maximum(1, cols - np.arange(rows)).astype(np.int32)
    tokens = int(lengths.sum())
    return TokenBatch(
        lengths,
        {
            "input_ids": rng.integers(0, 30_000, size=tokens, dtype=np.int32),
            "token_type_ids": rng.integers(0, 2, size=tokens, dtype=np.int32),
        },
        {"cutoff_layer": rng.integers(2, 7, size=rows, dtype=np.int32)},
    )


def row_sums(batch: TokenBatch) -> np.ndarray:
    return np.add.reduceat(
        batch.tokens["input_ids"].astype(np.int64), np.cumsum(batch.lengths) - batch.lengths
    )


def test_the_layout_follows_the_specs_columns() -> None:
    offsets = LAYOUT.offsets()
    assert list(offsets) == ["input_ids", "token_type_ids", "lengths", "cutoff_layer", "scores", "end"]
    assert LAYOUT.size == 2 * 4 * 4096 + 3 * 4 * 64
    assert (
        SegmentLayout.for_spec(replace(SPEC, token_columns=(), row_values={}), 10, 2).size
        == 4 * 10 + 2 * 4 * 2
    )


@pytest.fixture
def segment():
    owned = OwnedSegment(LAYOUT, "test-")
    yield owned
    owned.unlink()


def test_a_batch_written_by_the_owner_is_read_by_an_attached_mapping(segment: OwnedSegment) -> None:
    batch = sample_batch()
    descriptor = segment.write_batch(batch_id=9, segment_index=1, batch=batch)
    assert descriptor == BatchDescriptor(9, 1, 3, 7 + 6 + 5)
    attached = AttachedSegment(segment.name, LAYOUT)
    try:
        seen = attached.read_batch(descriptor)
        np.testing.assert_array_equal(seen.lengths, batch.lengths)
        for name in ("input_ids", "token_type_ids"):
            np.testing.assert_array_equal(seen.tokens[name], batch.tokens[name])
        np.testing.assert_array_equal(seen.values["cutoff_layer"], batch.values["cutoff_layer"])
        attached.write_scores(np.array([0.5, -1.25, 3.0], dtype=np.float32))
        np.testing.assert_array_equal(segment.read_scores(3), [0.5, -1.25, 3.0])
    finally:
        attached.close()


def test_only_a_small_descriptor_crosses_the_pipe(segment: OwnedSegment) -> None:
    descriptor = segment.write_batch(0, 0, sample_batch(rows=64, cols=64))
    assert len(pickle.dumps(descriptor)) < 200


def test_a_batch_larger_than_the_segment_is_refused(segment: OwnedSegment) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        segment.write_batch(0, 0, sample_batch(rows=65, cols=2))
    with pytest.raises(ValueError, match="does not fit"):
        segment.write_batch(0, 0, sample_batch(rows=2, cols=2049))  # 4097 tokens


def test_unlink_removes_the_segment_and_is_idempotent() -> None:
    owned = OwnedSegment(LAYOUT, "test-")
    path = os.path.join(SHM_DIR, owned.name)
    assert os.path.exists(path)
    assert owned.name in leftover_segments(os.getpid())
    owned.unlink()
    owned.unlink()
    assert not os.path.exists(path)
    assert owned.name not in leftover_segments(os.getpid())


def _double_scores_in_child(name: str, descriptor: BatchDescriptor) -> None:
    attached = AttachedSegment(name, LAYOUT)
    batch = attached.read_batch(descriptor)
    attached.write_scores(row_sums(batch).astype(np.float32) * 2)
    attached.close()


def _die_holding(name: str) -> None:
    AttachedSegment(name, LAYOUT)
    os._exit(9)


def test_a_spawned_worker_scores_through_the_segment_and_never_unlinks_it(segment: OwnedSegment) -> None:
    context = multiprocessing.get_context("spawn")
    batch = sample_batch()
    descriptor = segment.write_batch(1, 0, batch)
    child = context.Process(target=_double_scores_in_child, args=(segment.name, descriptor))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    np.testing.assert_array_equal(segment.read_scores(3), row_sums(batch) * 2)

    crashing = context.Process(target=_die_holding, args=(segment.name,))
    crashing.start()
    crashing.join(60)
    assert crashing.exitcode == 9
    assert os.path.exists(os.path.join(SHM_DIR, segment.name))
