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
from rerank_server.logs import LogFormat, configure_logging
from rerank_server.transport.shm import AttachedSegment, BatchDescriptor, SegmentLayout
from rerank_server.workers.devices import ReplicaPlan
from rerank_server.workers.stand_in import StandIn

log = logging.getLogger(__name__)

WARMUP_LENGTHS = (16, 12, 8, 4)  # rows of different lengths, so padding paths run too
# A worker whose device broke exits with this code, so the supervisor replaces it (and says why).
DEVICE_FAILED_EXIT_CODE = 3
# Words of an error that leaves the device unusable: after one, a CUDA context fails every later call.
BROKEN_DEVICE_MARKERS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_EXECUTION_FAILED",
)


@dataclass(frozen=True)
class WorkerConfig:
    name: str  # the replica's name in logs, e.g. "m0/1" (model label / replica index)
    spec: ModelSpec
    plan: ReplicaPlan
    segment_names: tuple[str, ...]
    layout: SegmentLayout
    log_level: str = "INFO"
    log_format: LogFormat = "text"  # the front-end's, resolved
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
    device_failed: bool = False  # the worker exits next: its device cannot run anything more


def device_is_broken(error: BaseException) -> bool:
    """Whether a scoring error leaves the device unusable, so the worker must be replaced, rather
    than failing its batch alone. Running out of memory fails only the batch: its memory is freed."""
    text = str(error)
    if "out of memory" in text or any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__):
        return False
    # torch raises AcceleratorError for any fault the device reports.
    return type(error).__name__ == "AcceleratorError" or any(m in text for m in BROKEN_DEVICE_MARKERS)


def run_worker(config: WorkerConfig, conn: Connection) -> None:
    """Process entry point. Exits when the front-end sends None or goes away."""
    # The front-end coordinates shutdown; a terminal's Ctrl-C must not kill workers mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(config.plan.worker_environment())
    # Progress bars are noise in a server log (and tqdm's multiprocessing lock leaks a semaphore).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    configure_logging(config.log_level, config.log_format, replica=config.name)
    try:
        scorer = _load(config)
        segments = [AttachedSegment(name, config.layout) for name in config.segment_names]
    except Exception as exc:  # reported, then the process ends: the supervisor decides what next
        log.exception("worker failed to start")
        conn.send(StartFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(Ready(os.getpid()))
    try:
        code = serve_batches(scorer, segments, conn)
    finally:
        for segment in segments:
            segment.close()
    if code:
        conn.close()
        logging.shutdown()
        os._exit(code)  # at once: tearing down a broken device may hang


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


def serve_batches(scorer: Scorer, segments: list[AttachedSegment], conn: Connection) -> int:
    """Score batches until told to stop (returns 0) or the device breaks (returns the exit code).

    A batch the model raises on is reported failed and the loop goes on: the front-end runs its
    requests apart to find the one at fault.
    """
    while True:
        try:
            descriptor: BatchDescriptor | None = conn.recv()
        except (EOFError, OSError):
            return 0  # the front-end is gone
        if descriptor is None:
            return 0
        started = time.perf_counter()
        try:
            batch = segments[descriptor.segment].read_batch(descriptor)
            scores = scorer.score(batch)
            segments[descriptor.segment].write_scores(np.asarray(scores, dtype=np.float32))
        except Exception as exc:
            broken = device_is_broken(exc)
            log.exception(
                "batch %d failed%s", descriptor.batch_id, "; the device is broken" if broken else ""
            )
            conn.send(BatchFailed(descriptor.batch_id, f"{type(exc).__name__}: {exc}", broken))
            if broken:
                return DEVICE_FAILED_EXIT_CODE
            continue
        conn.send(BatchDone(descriptor.batch_id, time.perf_counter() - started))
