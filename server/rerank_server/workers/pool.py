"""The supervisor: starts one worker process per replica plan, feeds it, restarts it when it dies.

Each replica gets `SEGMENTS_PER_REPLICA` shared-memory segments, so the
front-end writes the next batch while the worker runs the current one. A
reader thread per worker turns its pipe messages into calls on the event loop.
A worker's death shows as end-of-file on its pipe: the batches it held are
reported lost (the scheduler runs them again elsewhere), and a new process
takes its place after a backoff. A worker is replaced when it crashes, when the
scheduler finds it hung (`replace_hung` kills it), and when its device broke (it
reports the batch failed and exits with `DEVICE_FAILED_EXIT_CODE`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Protocol

import numpy as np
import numpy.typing as npt

from rerank_server.families.base import ModelSpec, TokenBatch
from rerank_server.logs import LogFormat
from rerank_server.transport.shm import OwnedSegment, SegmentLayout
from rerank_server.workers.devices import ReplicaPlan
from rerank_server.workers.stand_in import StandIn
from rerank_server.workers.worker import (
    DEVICE_FAILED_EXIT_CODE,
    BatchDone,
    BatchFailed,
    Ready,
    StartFailed,
    WorkerConfig,
    run_worker,
)

log = logging.getLogger(__name__)

SEGMENTS_PER_REPLICA = 2
MAX_RESTART_BACKOFF_S = 30.0
STOP_TIMEOUT_S = 10.0


class PoolListener(Protocol):
    def on_batch_done(self, batch_id: int, scores: npt.NDArray[np.float32], seconds: float) -> None: ...

    def on_batch_lost(self, batch_id: int, reason: str) -> None: ...

    def on_batch_failed(self, batch_id: int, reason: str) -> None: ...

    def on_replicas_changed(self, ready: int) -> None: ...


@dataclass(eq=False)  # a replica is itself (hashable by identity), whatever its state
class Replica:
    name: str  # in logs: the model's label and the replica's index, e.g. "m0/1"
    plan: ReplicaPlan
    segments: list[OwnedSegment]
    state: str = "starting"  # starting | ready | dead | stopped
    generation: int = 0
    process: BaseProcess | None = None
    conn: Connection | None = None
    reader: threading.Thread | None = None
    free_segments: list[int] = field(default_factory=list)
    in_flight: dict[int, tuple[int, int]] = field(default_factory=dict)  # batch id -> (segment, rows)
    failures: int = 0
    replaced_because: str | None = None  # set when the pool ends the worker itself: "hung"


class WorkerPool:
    def __init__(
        self,
        spec: ModelSpec,
        plans: Sequence[ReplicaPlan],
        layout: SegmentLayout,
        *,
        restart_backoff_s: float,
        label: str = "m0",
        log_level: str = "INFO",
        log_format: LogFormat = "text",
        stand_in: StandIn | None = None,
        on_restart: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._spec = spec
        self._layout = layout
        self._restart_backoff_s = restart_backoff_s
        self._log_level = log_level
        self._log_format = log_format
        self._stand_in = stand_in
        self._on_restart = on_restart
        self._context = multiprocessing.get_context("spawn")
        self._listener: PoolListener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.replicas = [
            Replica(
                f"{label}/{i}",
                plan,
                [OwnedSegment(layout, f"{label}w{i}s{s}-") for s in range(SEGMENTS_PER_REPLICA)],
            )
            for i, plan in enumerate(plans)
        ]

    @property
    def ready_count(self) -> int:
        return sum(r.state == "ready" for r in self.replicas)

    @property
    def idle_count(self) -> int:
        return sum(r.state == "ready" and not r.in_flight for r in self.replicas)

    def start(self, listener: PoolListener) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        for replica in self.replicas:
            self._spawn(replica)

    def idle_replica(self, *, busy_ok: bool = True) -> Replica | None:
        """The ready replica with the most free segments (spreads batches over replicas); with
        busy_ok False, only one with no batch in flight."""
        candidates = [
            r
            for r in self.replicas
            if r.state == "ready" and r.free_segments and (busy_ok or not r.in_flight)
        ]
        return max(candidates, key=lambda r: len(r.free_segments), default=None)

    def busy(self, replica: object) -> bool:
        assert isinstance(replica, Replica)
        return bool(replica.in_flight)

    def dispatch(self, replica: object, batch_id: int, batch: TokenBatch) -> None:
        assert isinstance(replica, Replica)
        segment = replica.free_segments.pop()
        descriptor = replica.segments[segment].write_batch(batch_id, segment, batch)
        replica.in_flight[batch_id] = (segment, descriptor.rows)
        try:
            assert replica.conn is not None
            replica.conn.send(descriptor)
        except (OSError, ValueError):
            # The worker is gone; its reader thread reports the exit and the batch is retried then.
            log.warning("replica %s: pipe closed while sending batch %d", replica.name, batch_id)

    def replace_hung(self, replica: object, batch_id: int) -> None:
        """Kill the worker still running `batch_id` (SIGKILL: a stopped process dies of it too). Its
        exit, seen by its reader thread, reaps it, reports its batches lost and restarts it."""
        assert isinstance(replica, Replica)
        process = replica.process
        if batch_id not in replica.in_flight or process is None:
            return  # the batch came back (or the worker died) meanwhile
        log.error(
            "replica %s: worker pid %s hung on batch %d; killing it", replica.name, process.pid, batch_id
        )
        replica.state = "dead"  # no more batches for it while it dies
        replica.replaced_because = "hung"
        process.kill()

    async def stop(self) -> None:
        """Stop every worker, then free the shared memory; also after workers crashed."""
        self._stopping = True
        for replica in self.replicas:
            replica.state = "stopped"
            if replica.conn is not None:
                with contextlib.suppress(OSError, ValueError):
                    replica.conn.send(None)
        await asyncio.to_thread(self._join_all)
        for replica in self.replicas:
            for segment in replica.segments:
                segment.unlink()

    def _join_all(self) -> None:
        for replica in self.replicas:
            process = replica.process
            if process is None:
                continue
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                log.warning("replica %s did not stop; killing it", replica.name)
                process.kill()
                process.join()
            if replica.conn is not None:
                replica.conn.close()
            if replica.reader is not None:
                replica.reader.join(STOP_TIMEOUT_S)

    def _spawn(self, replica: Replica) -> None:
        if self._stopping:
            return
        replica.generation += 1
        replica.state = "starting"
        replica.replaced_because = None
        replica.in_flight.clear()
        replica.free_segments = list(range(len(replica.segments)))
        config = WorkerConfig(
            replica.name,
            self._spec,
            replica.plan,
            tuple(s.name for s in replica.segments),
            self._layout,
            self._log_level,
            self._log_format,
            self._stand_in,
        )
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=run_worker, args=(config, child_end), name=f"rerank-worker-{replica.name}", daemon=True
        )
        process.start()
        child_end.close()  # so the worker's death reads as end-of-file here
        replica.process, replica.conn = process, parent_end
        replica.reader = threading.Thread(
            target=self._read,
            args=(replica, replica.generation, parent_end, process),
            daemon=True,
            name=f"rerank-reader-{replica.name}",
        )
        replica.reader.start()
        log.info("replica %s: started worker pid %d on %s", replica.name, process.pid, replica.plan.device)

    def _read(self, replica: Replica, generation: int, conn: Connection, process: BaseProcess) -> None:
        """Reader thread: forward each message to the event loop; report the worker's exit.

        The dead worker is reaped here, off the event loop, so a crash never stalls requests.
        """
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            self._call_soon(self._on_message, replica, generation, message)
        conn.close()
        process.join(STOP_TIMEOUT_S)
        self._call_soon(self._on_exit, replica, generation, process.exitcode)

    def _call_soon(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_message(self, replica: Replica, generation: int, message: object) -> None:
        if generation != replica.generation or self._listener is None:
            return
        if isinstance(message, BatchDone | BatchFailed):
            segment, rows = replica.in_flight.pop(message.batch_id)
            replica.free_segments.append(segment)
            if isinstance(message, BatchDone):
                scores = replica.segments[segment].read_scores(rows)
                self._listener.on_batch_done(message.batch_id, scores, message.seconds)
            else:
                if message.device_failed:
                    replica.state = "dead"  # it exits next; no more batches for it
                    log.error("replica %s: device failed; replacing the worker", replica.name)
                self._listener.on_batch_failed(message.batch_id, message.message)
        elif isinstance(message, Ready):
            replica.state, replica.failures = "ready", 0
            log.info("replica %s ready (pid %d)", replica.name, message.pid)
            self._listener.on_replicas_changed(self.ready_count)
        elif isinstance(message, StartFailed):
            log.error("replica %s failed to start: %s", replica.name, message.message)

    def _on_exit(self, replica: Replica, generation: int, code: int | None) -> None:
        if generation != replica.generation or self._stopping or self._listener is None:
            return
        reason = replica.replaced_because or ("device" if code == DEVICE_FAILED_EXIT_CODE else "exited")
        log.error("replica %s: worker exited (code %s, %s); restarting", replica.name, code, reason)
        replica.state = "dead"
        lost = list(replica.in_flight)
        replica.in_flight.clear()
        for batch_id in lost:
            self._listener.on_batch_lost(batch_id, f"worker {reason} (exit code {code})")
        self._listener.on_replicas_changed(self.ready_count)
        backoff = min(MAX_RESTART_BACKOFF_S, self._restart_backoff_s * 2**replica.failures)
        replica.failures += 1
        self._on_restart(reason)
        assert self._loop is not None
        self._loop.call_later(backoff, self._spawn, replica)
