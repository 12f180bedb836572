"""Wires the server together and runs it until SIGTERM or SIGINT, then drains."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer  # public alias: health.aio
from grpc_reflection.v1alpha import reflection
from rerank.v1 import reranker_pb2, reranker_pb2_grpc

from rerank_server.edge.auth import BearerTokenInterceptor, TokenStore
from rerank_server.edge.calls import CallLimits, Calls
from rerank_server.edge.http.routes import HttpRoutes
from rerank_server.edge.http.server import HttpServer
from rerank_server.edge.servicer import RerankerServicer
from rerank_server.edge.tls import server_credentials
from rerank_server.errors import NoReplicaError
from rerank_server.families import describe_model, family_of, load_row_builder
from rerank_server.families.base import ModelSpec, RowBuilder
from rerank_server.logs import resolve_log_format
from rerank_server.metrics import Metrics
from rerank_server.models.registry import ModelRegistry, ServedModel
from rerank_server.scheduling.batcher import PairQueue
from rerank_server.scheduling.scheduler import Scheduler
from rerank_server.service.rerank import RequestLimits, RerankService
from rerank_server.settings import ServerSettings
from rerank_server.tracing import TracingUnavailableError, start_tracing
from rerank_server.transport.shm import SegmentLayout
from rerank_server.workers.devices import (
    ReplicaPlan,
    cpu_has_native_bf16,
    plan_replicas,
    usable_cpus,
    visible_gpus,
)
from rerank_server.workers.pool import WorkerPool

log = logging.getLogger("rerank_server")

SERVICE_NAME = reranker_pb2.DESCRIPTOR.services_by_name["Reranker"].full_name
# A health service that is SERVING for as long as the process answers, draining included: what a
# liveness probe asks, so that a replica reloading (NOT_SERVING on "" and SERVICE_NAME, which
# readiness probes and balancing clients watch) is not mistaken for a dead process.
LIVENESS_SERVICE = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StartupError(Exception):
    """The settings cannot be served (bad model, devices, limits); the message says why."""


class _PoolEvents:
    """Forwards one model's worker pool events to its scheduler, and keeps health in step."""

    def __init__(self, scheduler: Scheduler, on_replicas_changed: Callable[[], None]) -> None:
        self._scheduler = scheduler
        self._on_replicas_changed = on_replicas_changed

    def on_batch_done(self, batch_id: int, scores: npt.NDArray[np.float32], seconds: float) -> None:
        self._scheduler.on_batch_done(batch_id, scores, seconds)

    def on_batch_lost(self, batch_id: int, reason: str) -> None:
        self._scheduler.on_batch_lost(batch_id, reason)

    def on_batch_failed(self, batch_id: int, reason: str) -> None:
        self._scheduler.on_batch_failed(batch_id, reason)

    def on_replicas_changed(self, ready: int) -> None:
        self._scheduler.on_replicas_changed(ready)
        self._on_replicas_changed()


class _Health:
    """Health as set_health says, from the models' ready replicas; NOT_SERVING and frozen once draining."""

    def __init__(self, servicer: AsyncHealthServicer) -> None:
        self.servicer = servicer
        self.models: ModelRegistry | None = None
        self.draining = False
        self._tasks: set[asyncio.Task[None]] = set()

    def update(self) -> None:
        if self.draining or self.models is None:
            return
        task = asyncio.create_task(
            set_health(
                self.servicer,
                SERVING if self.models.all_ready() else NOT_SERVING,
                reranker=SERVING if self.models.any_ready() else NOT_SERVING,
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def takes_calls(self) -> bool:
        """What SERVICE_NAME says (some model has a ready replica, not draining): HTTP's /health."""
        return not self.draining and self.models is not None and self.models.any_ready()


async def set_health(servicer: AsyncHealthServicer, status: int, *, reranker: int | None = None) -> None:
    """`status` of the whole server (""): every model has a ready replica; `reranker` (default: the
    same) of SERVICE_NAME, which balancing clients and readiness probes watch: some model has one,
    so the server takes calls (those for a model without a replica get UNAVAILABLE, and are retried
    elsewhere)."""
    await servicer.set("", status)
    await servicer.set(SERVICE_NAME, status if reranker is None else reranker)


@dataclass(frozen=True)
class ModelPlan:
    """A model checked before any worker starts: its spec, row builder, replicas and limits."""

    name: str
    spec: ModelSpec
    rows: RowBuilder
    replicas: list[ReplicaPlan]
    default_max_length: int
    max_length_limit: int


def plan_models(settings: ServerSettings) -> list[ModelPlan]:
    """Describe every model, load its tokenizer, plan its replicas and check its limits, before any
    worker starts, so bad settings fail fast with a clear message."""
    try:
        choices = settings.models()
    except ValueError as exc:
        raise StartupError(str(exc)) from exc
    gpus = visible_gpus()
    cpu_bf16 = cpu_has_native_bf16()
    cpus = usable_cpus()
    plans = []
    for choice in choices:
        try:
            spec = describe_model(choice.source, choice.family)
            rows = load_row_builder(spec)
            replicas = plan_replicas(
                settings.devices,
                cpu_replicas=settings.cpu_replicas,
                threads_per_replica=settings.threads_per_replica,
                dtype=settings.dtype,
                gpus=gpus,
                cpu_count=cpus,
                gpu_dtype=family_of(spec.family).gpu_dtype,
                cpu_bf16=cpu_bf16,
            )
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot serve model {choice.source!r}: {exc}") from exc
        # A batch must hold one row of the longest pair a request may ask for.
        batch_limit = (settings.max_batch_tokens - spec.row_overhead) // spec.row_factor
        limit = min(spec.max_length_limit, batch_limit)
        default = settings.max_length or min(spec.default_max_length, limit)
        if default > limit or limit < spec.min_max_length:
            raise StartupError(
                f"model {choice.name!r}: max_length {default} exceeds the limit {limit} (of the model, "
                f"and of max_batch_tokens {settings.max_batch_tokens})"
            )
        plans.append(ModelPlan(choice.name, spec, rows, replicas, default, limit))
    return plans


def grpc_server(
    settings: ServerSettings,
    servicer: RerankerServicer,
    health_servicer: AsyncHealthServicer,
    tokens: TokenStore | None,
) -> grpc.aio.Server:
    """The gRPC server with the Reranker, health and (unless turned off) reflection services, not yet
    listening; with `tokens`, every call but a health check needs one of them."""
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    if settings.max_connection_age_s:
        options += [
            ("grpc.max_connection_age_ms", round(settings.max_connection_age_s * 1000)),
            # Calls in flight when the age comes finish: none outlives max_call_s anyway.
            ("grpc.max_connection_age_grace_ms", round(settings.max_call_s * 1000)),
        ]
    server = grpc.aio.server(
        interceptors=[BearerTokenInterceptor(tokens)] if tokens is not None else [],
        options=options,
    )
    reranker_pb2_grpc.add_RerankerServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection((SERVICE_NAME, health_name, reflection.SERVICE_NAME), server)
    return server


def http_server(settings: ServerSettings, routes: HttpRoutes) -> HttpServer:
    """The HTTP port with the gRPC port's host and TLS, bound; StartupError when it cannot be."""
    try:
        return HttpServer(
            routes.app(),
            settings.host,
            settings.http_port,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
            tls_client_ca=settings.tls_client_ca,
        )
    except ValueError as exc:
        raise StartupError(str(exc)) from exc
    except OSError as exc:
        raise StartupError(f"cannot listen on {settings.host}:{settings.http_port} (HTTP): {exc}") from exc


async def serve(settings: ServerSettings) -> None:
    """Run the server until SIGTERM/SIGINT, then drain; raises StartupError when it cannot start."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        tokens = TokenStore(settings.auth_tokens_file) if settings.auth_tokens_file else None
    except ValueError as exc:
        raise StartupError(str(exc)) from exc
    if tokens is not None:
        loop.add_signal_handler(signal.SIGHUP, tokens.reload)
    plans = plan_models(settings)
    for position, plan in enumerate(plans):
        log.info("model %r (%s, %s): replicas m%d/*", plan.name, plan.spec.family, plan.spec.source, position)
    if settings.scorer != "model":
        log.warning("scorer=%s: the workers return stand-in scores, not the model's", settings.scorer)
    try:
        tracer = start_tracing() if settings.tracing else None
    except TracingUnavailableError as exc:
        raise StartupError(str(exc)) from exc
    metrics = Metrics()
    pools = [
        WorkerPool(
            plan.spec,
            plan.replicas,
            SegmentLayout.for_spec(plan.spec, settings.max_batch_tokens, settings.max_batch_size),
            restart_backoff_s=settings.restart_backoff_s,
            label=f"m{position}",
            log_level=settings.log_level,
            log_format=resolve_log_format(settings.log_format, sys.stderr),  # main resolved it
            stand_in=settings.stand_in(),
            on_restart=partial(metrics.worker_restarted, plan.name),
        )
        for position, plan in enumerate(plans)
    ]
    executor = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")
    schedulers: list[Scheduler] = []
    http: HttpServer | None = None
    try:
        try:
            metrics.serve(settings.metrics_port, settings.metrics_host)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on port {settings.metrics_port} of {settings.metrics_host}: {exc}"
            ) from exc
        health = _Health(AsyncHealthServicer())
        await set_health(health.servicer, NOT_SERVING)
        await health.servicer.set(LIVENESS_SERVICE, SERVING)
        served = []
        for plan, pool in zip(plans, pools, strict=True):
            queue = PairQueue(
                settings.max_batch_tokens,
                settings.max_batch_size,
                settings.max_queued_pairs,
                settings.max_wait_ms / 1000,
                max_tokens=settings.max_queued_tokens,
                max_delay=settings.max_queue_delay_ms / 1000,
            )
            scheduler = Scheduler(
                plan.spec,
                queue,
                pool,
                metrics.for_model(plan.name),
                settings.bulk_batch_ms / 1000,
                batch_timeout_factor=settings.batch_timeout_factor,
                batch_timeout_floor_s=settings.batch_timeout_floor_s,
            )
            schedulers.append(scheduler)
            metrics.watch_queue(
                plan.name, partial(getattr, scheduler, "queued_tokens"), scheduler.queued_work_s
            )
            served.append(
                ServedModel(
                    name=plan.name,
                    spec=plan.spec,
                    dtype=plan.replicas[0].dtype,
                    devices=tuple(r.device for r in plan.replicas),
                    default_max_length=plan.default_max_length,
                    max_length_limit=plan.max_length_limit,
                    rows=plan.rows,
                    scheduler=scheduler,
                    ready_replicas=partial(getattr, pool, "ready_count"),
                )
            )
        health.models = ModelRegistry(served)
        for scheduler, pool in zip(schedulers, pools, strict=True):
            pool.start(_PoolEvents(scheduler, health.update))
        limits = RequestLimits(
            settings.max_documents,
            settings.max_stream_top_n,
            settings.stream_window,
            settings.chunk_overlap,
            settings.max_chunks,
            settings.max_query_chars,
            settings.max_document_chars,
            settings.max_message_bytes,
        )
        service = RerankService(health.models, limits, executor)
        calls = Calls(
            metrics,
            health.models,
            CallLimits(
                settings.max_concurrent_calls,
                settings.max_concurrent_streams,
                settings.stream_idle_timeout_s,
                settings.max_call_s,
            ),
            tracer=tracer,
            log_request_text=settings.log_request_text,
        )
        servicer = RerankerServicer(service, calls)
        server = grpc_server(settings, servicer, health.servicer, tokens)
        address = f"{settings.host}:{settings.port}"
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            # gRPC refuses a key that does not match the certificate only here, as a failed bind.
            mismatch = " (or --tls-key is not the key of --tls-cert)" if credentials else ""
            raise StartupError(f"cannot listen on {address}{mismatch}: {exc}") from exc
        if settings.http_port:
            http = http_server(
                settings,
                HttpRoutes(
                    service,
                    calls,
                    tokens=tokens,
                    max_body_bytes=settings.max_message_bytes,
                    serving=health.takes_calls,
                ),
            )
        await server.start()
        if http is not None:
            await http.start()
        transport = "mutual TLS" if settings.tls_client_ca else "TLS" if credentials else "plaintext"
        log.info(
            "rerank-server listening on %s:%d (%s%s), HTTP %s, models %s",
            settings.host,
            port,
            transport,
            ", bearer tokens" if tokens is not None else "",
            f"on port {http.port}" if http is not None else "off",
            ", ".join(p.name for p in plans),
        )
        await stop.wait()

        log.info("draining: refusing new calls, %.1f s for calls in flight", settings.grace_period_s)
        # New calls get UNAVAILABLE from the service (clients retry elsewhere) while those in flight
        # finish; only then does gRPC stop, whose own refusals race its shutdown (CANCELLED).
        health.draining = service.draining = True
        await set_health(health.servicer, NOT_SERVING)
        began = loop.time()
        await calls.in_flight.wait_idle(settings.grace_period_s)
        left = max(0.0, settings.grace_period_s - (loop.time() - began))
        if http is not None:
            await asyncio.gather(server.stop(left), http.stop(left))
            http = None
        else:
            await server.stop(left)
    finally:
        if http is not None:  # stopped before its drain
            await http.stop(0)
        for scheduler in schedulers:
            scheduler.fail_all(NoReplicaError("the server is stopping"))
        for pool in pools:
            await pool.stop()
        executor.shutdown(wait=False, cancel_futures=True)
        metrics.close()
        if tracer is not None:
            await asyncio.to_thread(tracer.shutdown)  # sends the spans still batched
        log.info("stopped")
