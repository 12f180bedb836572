"""The shared-memory transport alone: layout, round trips, ownership across processes."""

from __future__ import annotations

import multiprocessing
import os
import pickle

import numpy as np
import pytest
from rerank_server.transport.shm import (
    SHM_DIR,
    AttachedSegment,
    BatchArrays,
    BatchDescriptor,
    OwnedSegment,
    SegmentLayout,
    leftover_segments,
)

LAYOUT = SegmentLayout(max_tokens=4096, max_rows=64)


def sample_batch(rows: int = 3, cols: int = 7) -> BatchArrays:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30_000, size=(rows, cols), dtype=np.int32)
    mask = np.ones((rows, cols), dtype=np.int8)
    mask[0, 4:] = 0
    types = np.zeros((rows, cols), dtype=np.int8)
    types[:, 3:] = 1
    return BatchArrays(ids, mask, types)


@pytest.fixture
def segment():
    owned = OwnedSegment(LAYOUT, "test-")
    yield owned
    owned.unlink()


def test_a_batch_written_by_the_owner_is_read_by_an_attached_mapping(segment: OwnedSegment) -> None:
    batch = sample_batch()
    descriptor = segment.write_batch(batch_id=9, segment_index=1, arrays=batch)
    assert descriptor == BatchDescriptor(9, 1, 3, 7)
    attached = AttachedSegment(segment.name, LAYOUT)
    try:
        seen = attached.read_batch(descriptor)
        np.testing.assert_array_equal(seen.input_ids, batch.input_ids)
        np.testing.assert_array_equal(seen.attention_mask, batch.attention_mask)
        np.testing.assert_array_equal(seen.token_type_ids, batch.token_type_ids)
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
        segment.write_batch(0, 0, sample_batch(rows=2, cols=2049))


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
    attached.write_scores(batch.input_ids.sum(axis=1).astype(np.float32) * 2)
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
    np.testing.assert_array_equal(segment.read_scores(3), batch.input_ids.sum(axis=1) * 2)

    crashing = context.Process(target=_die_holding, args=(segment.name,))
    crashing.start()
    crashing.join(60)
    assert crashing.exitcode == 9
    assert os.path.exists(os.path.join(SHM_DIR, segment.name))
