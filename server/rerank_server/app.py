"""Wires the server together and runs it until SIGTERM or SIGINT, then drains."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer  # public alias: health.aio
from grpc_reflection.v1alpha import reflection
from rerank.v1 import reranker_pb2, reranker_pb2_grpc

from rerank_server.edge.servicer import RerankerServicer
from rerank_server.errors import NoReplicaError
from rerank_server.metrics import Metrics
from rerank_server.models import describe_model, load_encoder
from rerank_server.models.base import PairEncoder
from rerank_server.scheduling.batcher import PairQueue
from rerank_server.scheduling.scheduler import Scheduler
from rerank_server.service import RequestLimits, RerankService, ServedModel
from rerank_server.settings import ServerSettings
from rerank_server.transport.shm import SegmentLayout
from rerank_server.workers.devices import ReplicaPlan, plan_replicas, visible_gpus
from rerank_server.workers.pool import WorkerPool

log = logging.getLogger("rerank_server")

SERVICE_NAME = reranker_pb2.DESCRIPTOR.services_by_name["Reranker"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StartupError(Exception):
    """The settings cannot be served (bad model, devices, limits); the message says why."""


class _PoolEvents:
    """Forwards worker pool events to the scheduler, and keeps health in step with live replicas."""

    def __init__(self, scheduler: Scheduler, health_servicer: AsyncHealthServicer) -> None:
        self._scheduler = scheduler
        self._health = health_servicer
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False

    def on_batch_done(self, batch_id: int, scores: npt.NDArray[np.float32], seconds: float) -> None:
        self._scheduler.on_batch_done(batch_id, scores, seconds)

    def on_batch_lost(self, batch_id: int, reason: str) -> None:
        self._scheduler.on_batch_lost(batch_id, reason)

    def on_replicas_changed(self, ready: int) -> None:
        self._scheduler.on_replicas_changed(ready)
        if not self.draining:
            task = asyncio.create_task(set_health(self._health, SERVING if ready else NOT_SERVING))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def set_health(servicer: AsyncHealthServicer, status: int) -> None:
    for service in ("", SERVICE_NAME):
        await servicer.set(service, status)


def load_served_model(settings: ServerSettings) -> tuple[ServedModel, PairEncoder, list[ReplicaPlan]]:
    """Describe the model, load its tokenizer, plan the replicas and check the limits, before any
    worker starts, so bad settings fail fast with a clear message."""
    try:
        spec = describe_model(settings.model, settings.family)
        encoder = load_encoder(spec)
        plans = plan_replicas(
            settings.devices,
            cpu_replicas=settings.cpu_replicas,
            threads_per_replica=settings.threads_per_replica,
            dtype=settings.dtype,
            gpus=visible_gpus(),
            cpu_count=os.cpu_count() or 1,
        )
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot serve model {settings.model!r}: {exc}") from exc
    limit = min(spec.max_length_limit, settings.max_batch_tokens // spec.row_length(1))
    default = settings.max_length or min(spec.default_max_length, limit)
    if default > limit:
        raise StartupError(
            f"max_length {default} exceeds the limit {limit} (of the model, and of max_batch_tokens "
            f"{settings.max_batch_tokens})"
        )
    model = ServedModel(
        settings.served_name, spec, plans[0].dtype, tuple(p.device for p in plans), default, limit
    )
    return model, encoder, plans


def grpc_server(
    settings: ServerSettings, service: RerankService, metrics: Metrics, health_servicer: AsyncHealthServicer
) -> grpc.aio.Server:
    """The gRPC server with the Reranker, health and reflection services, not yet listening."""
    max_message = settings.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
        ]
    )
    reranker_pb2_grpc.add_RerankerServicer_to_server(RerankerServicer(service, metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((SERVICE_NAME, health_name, reflection.SERVICE_NAME), server)
    return server


async def serve(settings: ServerSettings) -> None:
    """Run the server until SIGTERM/SIGINT, then drain; raises StartupError when it cannot start."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    model, encoder, plans = load_served_model(settings)
    metrics = Metrics()
    layout = SegmentLayout(max_tokens=settings.max_batch_tokens, max_rows=settings.max_batch_size)
    pool = WorkerPool(
        model.spec,
        plans,
        layout,
        restart_backoff_s=settings.restart_backoff_s,
        log_level=settings.log_level,
        on_restart=metrics.worker_restarts.inc,
    )
    executor = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")
    scheduler: Scheduler | None = None
    try:
        try:
            metrics.serve(settings.metrics_port, settings.host)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on port {settings.metrics_port}: {exc}") from exc
        queue = PairQueue(
            settings.max_batch_tokens,
            settings.max_batch_size,
            settings.max_queued_pairs,
            settings.max_wait_ms / 1000,
        )
        scheduler = Scheduler(queue, pool, encoder.pad_token_id, metrics)
        health_servicer = AsyncHealthServicer()
        await set_health(health_servicer, NOT_SERVING)
        events = _PoolEvents(scheduler, health_servicer)
        pool.start(events)
        service = RerankService(
            model,
            encoder,
            scheduler,
            RequestLimits(settings.max_documents, settings.max_stream_top_n, settings.stream_window),
            executor,
            lambda: pool.ready_count,
        )
        server = grpc_server(settings, service, metrics, health_servicer)
        try:
            port = server.add_insecure_port(f"{settings.host}:{settings.port}")
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {exc}") from exc
        await server.start()
        log.info("rerank-server listening on %s:%d, model %r", settings.host, port, model.name)
        await stop.wait()

        log.info("draining: refusing new calls, %.1f s for calls in flight", settings.grace_period_s)
        events.draining = True
        await health_servicer.enter_graceful_shutdown()
        await server.stop(settings.grace_period_s)
    finally:
        if scheduler is not None:
            scheduler.fail_all(NoReplicaError("the server is stopping"))
        await pool.stop()
        executor.shutdown(wait=False, cancel_futures=True)
        metrics.close()
        log.info("stopped")
