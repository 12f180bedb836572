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

from rerank_server.families.base import ModelSpec, Row, Scorer, pack_rows
from rerank_server.transport.shm import AttachedSegment, BatchDescriptor, SegmentLayout
from rerank_server.workers.devices import ReplicaPlan
from rerank_server.workers.stand_in import StandIn

log = logging.getLogger(__name__)

WARMUP_LENGTHS = (16, 12, 8, 4)  # rows of different lengths, so padding paths run too


@dataclass(frozen=True)
class WorkerConfig:
    name: str  # the replica's name in logs, e.g. "m0/1" (model label / replica index)
    spec: ModelSpec
    plan: ReplicaPlan
    segment_names: tuple[str, ...]
    layout: SegmentLayout
    log_level: str = "INFO"
    stand_in: StandIn | None = None  # a model's stand-in (measuring the server alone): no weights


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
        level=config.log_level, format=f"%(asctime)s worker-{config.name} %(levelname)s %(message)s"
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


def _load(config: WorkerConfig) -> Scorer:
    if config.stand_in is not None:
        log.info("replica ready: %s stand-in, no model", config.stand_in.kind)
        return config.stand_in

    import torch

    from rerank_server.families import load_scorer

    if config.plan.threads:
        torch.set_num_threads(config.plan.threads)
    spec = config.spec
    scorer = load_scorer(spec, config.plan.torch_device, config.plan.dtype)
    scorer.score(pack_rows([_warmup_row(spec, length) for length in WARMUP_LENGTHS], spec))
    log.info(
        "replica ready on %s (%s, %d threads)", config.plan.device, config.plan.dtype, torch.get_num_threads()
    )
    return scorer


def _warmup_row(spec: ModelSpec, length: int) -> Row:
    """A row of ones (half query, half document where the family has token types)."""
    columns = {"input_ids": np.ones(length, dtype=np.int32)}
    for name in spec.token_columns:
        columns[name] = (np.arange(length) >= length // 2).astype(np.int32)
    return Row(0, columns, dict(spec.row_values))


def _serve(scorer: Scorer, segments: list[AttachedSegment], conn: Connection) -> None:
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
            scores = scorer.score(batch)
            segments[descriptor.segment].write_scores(np.asarray(scores, dtype=np.float32))
        except Exception as exc:
            log.exception("batch %d failed", descriptor.batch_id)
            conn.send(BatchFailed(descriptor.batch_id, f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(BatchDone(descriptor.batch_id, time.perf_counter() - started))
