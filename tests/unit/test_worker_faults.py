"""A model that raises inside a worker: which errors break the device, what the worker reports and
whether it serves on, and what a client reads."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from multiprocessing.connection import Connection

import grpc
import numpy as np
import pytest
import torch
from rerank_server.edge.status import status_of
from rerank_server.errors import ModelError
from rerank_server.families.base import ModelSpec, Row, ScoreArray, TokenBatch, pack_rows
from rerank_server.transport.shm import AttachedSegment, OwnedSegment, SegmentLayout
from rerank_server.workers.stand_in import null_scores
from rerank_server.workers.worker import (
    DEVICE_FAILED_EXIT_CODE,
    BatchDone,
    BatchFailed,
    device_is_broken,
    serve_batches,
)

SPEC = ModelSpec("tiny", "cross-encoder", 64, 64, 4, pad_token_id=0)
LAYOUT = SegmentLayout.for_spec(SPEC, max_tokens=256, max_rows=8)


@pytest.mark.parametrize(
    ("error", "broken"),
    [
        (IndexError("index out of range in self"), False),  # bad input: the batch's fault
        (ValueError("expected sequence of length 4"), False),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("CUDA error: out of memory"), False),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`"), True),
        (torch.AcceleratorError("CUDA error: unspecified launch failure"), True),
    ],
)
def test_only_errors_that_leave_the_device_unusable_count_as_broken(error: Exception, broken: bool) -> None:
    assert device_is_broken(error) is broken


class FailingScorer:
    """Scores like the null stand-in, but raises `error` on a batch holding a row starting with 99."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def score(self, batch: TokenBatch) -> ScoreArray:
        starts = np.cumsum(batch.lengths) - batch.lengths
        if 99 in batch.tokens["input_ids"][starts]:
            raise self.error
        return null_scores(batch)


def batch_of(*first_ids: int) -> TokenBatch:
    return pack_rows(
        [Row(i, {"input_ids": np.array([first, 5, 6], dtype=np.int32)}) for i, first in enumerate(first_ids)],
        SPEC,
    )


@pytest.fixture
def segments() -> Iterator[list[OwnedSegment]]:
    owned = [OwnedSegment(LAYOUT, "test-") for _ in range(2)]
    yield owned
    for segment in owned:
        segment.unlink()


def serve(
    scorer: FailingScorer, segments: list[OwnedSegment], batches: list[TokenBatch]
) -> tuple[int, list[object]]:
    """Run the worker's loop in this process over `batches` (one per segment): its exit code and the
    messages it sent."""
    front, worker = multiprocessing.Pipe()
    for index, (segment, batch) in enumerate(zip(segments, batches, strict=True)):
        front.send(segment.write_batch(index, index, batch))
    front.send(None)  # stop after the batches (unless the loop ends first)
    attached = [AttachedSegment(segment.name, LAYOUT) for segment in segments]
    try:
        code = serve_batches(scorer, attached, worker)
    finally:
        for mapping in attached:
            mapping.close()
    return code, drain(front)


def drain(conn: Connection) -> list[object]:
    messages = []
    while conn.poll(0):
        messages.append(conn.recv())
    return messages


def test_a_model_error_fails_its_batch_and_the_worker_serves_on(segments: list[OwnedSegment]) -> None:
    scorer = FailingScorer(IndexError("index out of range in self"))
    code, messages = serve(scorer, segments, [batch_of(1, 99), batch_of(2, 3)])
    assert code == 0
    assert messages[0] == BatchFailed(0, "IndexError: index out of range in self", device_failed=False)
    assert isinstance(messages[1], BatchDone) and messages[1].batch_id == 1
    np.testing.assert_array_equal(segments[1].read_scores(2), null_scores(batch_of(2, 3)))


def test_a_broken_device_fails_its_batch_and_ends_the_worker_with_its_own_code(
    segments: list[OwnedSegment],
) -> None:
    scorer = FailingScorer(RuntimeError("CUDA error: an illegal memory access was encountered"))
    code, messages = serve(scorer, segments, [batch_of(99), batch_of(2, 3)])
    assert code == DEVICE_FAILED_EXIT_CODE
    assert messages == [
        BatchFailed(
            0, "RuntimeError: CUDA error: an illegal memory access was encountered", device_failed=True
        )
    ]  # the next batch is left to the worker that replaces it


def test_a_model_error_reaches_the_client_as_internal_with_a_generic_message() -> None:
    assert status_of(ModelError()) == (grpc.StatusCode.INTERNAL, "the model failed on this request")
