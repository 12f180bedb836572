"""The loop inside a worker process: receive a batch descriptor, score, send back.

Runs in a spawned process. Pinning (CUDA_VISIBLE_DEVICES, thread counts) is
applied before torch is imported, which is why this module imports no torch
and the model code is imported inside `run_worker`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from rerank_server.models.base import ModelSpec, PairScorer
from rerank_server.transport.shm import AttachedSegment, BatchDescriptor, SegmentLayout
from rerank_server.workers.devices import ReplicaPlan

log = logging.getLogger(__name__)

WARMUP_ROWS = 4
WARMUP_COLS = 16


@dataclass(frozen=True)
class WorkerConfig:
    index: int
    spec: ModelSpec
    plan: ReplicaPlan
    segment_names: tuple[str, ...]
    layout: SegmentLayout
    log_level: str = "INFO"


# Messages a worker sends to the front-end.


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class StartFailed:
    message: str


@dataclass(frozen=True)
class BatchDone:
    batch_id: int
    seconds: float


@dataclass(frozen=True)
class BatchFailed:
    batch_id: int
    message: str


def run_worker(config: WorkerConfig, conn: Connection) -> None:
    """Process entry point. Exits when the front-end sends None or goes away."""
    # The front-end coordinates shutdown; a terminal's Ctrl-C must not kill workers mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(config.plan.worker_environment())
    # Progress bars are noise in a server log (and tqdm's multiprocessing lock leaks a semaphore).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(
        level=config.log_level, format=f"%(asctime)s worker-{config.index} %(levelname)s %(message)s"
    )
    try:
        scorer = _load(config)
        segments = [AttachedSegment(name, config.layout) for name in config.segment_names]
    except Exception as exc:  # reported, then the process ends: the supervisor decides what next
        log.exception("worker failed to start")
        conn.send(StartFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(Ready(os.getpid()))
    try:
        _serve(scorer, segments, conn)
    finally:
        for segment in segments:
            segment.close()


def _load(config: WorkerConfig) -> PairScorer:
    import torch

    from rerank_server.models import load_scorer

    if config.plan.threads:
        torch.set_num_threads(config.plan.threads)
    scorer = load_scorer(config.spec, config.plan.torch_device, config.plan.dtype)
    ids = np.ones((WARMUP_ROWS, WARMUP_COLS), dtype=np.int32)
    mask = np.ones_like(ids, dtype=np.int8)
    types = np.zeros_like(ids, dtype=np.int8)
    types[:, WARMUP_COLS // 2 :] = 1
    scorer.score(ids, mask, types)
    log.info(
        "replica ready on %s (%s, %d threads)", config.plan.device, config.plan.dtype, torch.get_num_threads()
    )
    return scorer


def _serve(scorer: PairScorer, segments: list[AttachedSegment], conn: Connection) -> None:
    while True:
        try:
            descriptor: BatchDescriptor | None = conn.recv()
        except (EOFError, OSError):
            return  # the front-end is gone
        if descriptor is None:
            return
        started = time.perf_counter()
        try:
            batch = segments[descriptor.segment].read_batch(descriptor)
            scores = scorer.score(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            segments[descriptor.segment].write_scores(np.asarray(scores, dtype=np.float32))
        except Exception as exc:
            log.exception("batch %d failed", descriptor.batch_id)
            conn.send(BatchFailed(descriptor.batch_id, f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(BatchDone(descriptor.batch_id, time.perf_counter() - started))
