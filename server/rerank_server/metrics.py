"""Prometheus metrics of one server, in a registry of its own.

Names follow Prometheus' conventions (base units: seconds, counters ending in _total). Everything
about a model carries the served model's name as the `model` label; a call's is "" when it failed
before a served model was known (a label never takes a caller's unchecked text).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rerank_requests", "Finished calls, by status code", ["method", "code", "model"], registry=r
        )
        self.request_seconds = Histogram(
            "rerank_request_duration_seconds",
            "Call time, from the server's first sight of the call to its status",
            ["method", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.calls_in_flight = Gauge(
            "rerank_calls_in_flight",
            "Calls being served (against max_concurrent_calls and max_concurrent_streams)",
            ["method"],
            registry=r,
        )
        model = ["model"]
        self.tokenize_seconds = Histogram(
            "rerank_tokenize_duration_seconds",
            "Tokenizing per successful call (a stream's parts summed)",
            model,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "rerank_queue_duration_seconds",
            "Queueing before a request's first batch",
            model,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queued_pairs = Gauge(
            "rerank_queued_pairs", "Pairs (rows) waiting for a replica", model, registry=r
        )
        self.queued_tokens = Gauge(
            "rerank_queued_tokens", "Real tokens of the pairs waiting for a replica", model, registry=r
        )
        self.queued_work_seconds = Gauge(
            "rerank_queued_work_seconds",
            "Time the ready replicas need for the queued Rerank work, at their measured speed (0 until a "
            "batch was timed): how long a new Rerank would queue; what an autoscaler should scale on",
            model,
            registry=r,
        )
        self.pairs_scored = Counter(
            "rerank_pairs_scored", "Pairs (rows) a model replica ran", model, registry=r
        )
        self.pairs_dropped = Counter(
            "rerank_pairs_dropped",
            "Queued pairs dropped before reaching a model",
            ["model", "reason"],
            registry=r,
        )
        self.batches = Counter("rerank_batches", "Batches run", model, registry=r)
        self.batch_pairs = Histogram(
            "rerank_batch_pairs",
            "Pairs per batch",
            model,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.batch_tokens = Histogram(
            "rerank_batch_padded_tokens",
            "Padded tokens per batch",
            model,
            buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
            registry=r,
        )
        self.batch_real_tokens = Counter(
            "rerank_batch_real_tokens",
            "Real tokens batched; against rerank_batch_padded_tokens_sum, the share not padding",
            model,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "rerank_batch_inference_seconds",
            "Model time per batch",
            model,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.replicas_ready = Gauge("rerank_replicas_ready", "Replicas loaded and serving", model, registry=r)
        self.worker_restarts = Counter(
            "rerank_worker_restarts",
            "Worker processes replaced, by reason: exited (crashed), hung (killed), device (broken)",
            ["model", "reason"],
            registry=r,
        )
        self.batches_lost = Counter("rerank_batches_lost", "Batches a dying replica held", model, registry=r)
        self.batches_failed = Counter(
            "rerank_batches_failed",
            "Batches on which the model raised (their requests then run apart)",
            model,
            registry=r,
        )
        self._http: Any = None

    def worker_restarted(self, model: str, reason: str) -> None:
        self.worker_restarts.labels(model, reason).inc()

    def call_ended(self, method: str, model: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code, model).inc()
        self.request_seconds.labels(method, model).observe(seconds)

    def watch_queue(
        self, model: str, queued_tokens: Callable[[], float], work_s: Callable[[], float]
    ) -> None:
        """Read a model's queue at each scrape, rather than on every change."""
        self.queued_tokens.labels(model).set_function(queued_tokens)
        self.queued_work_seconds.labels(model).set_function(work_s)

    def for_model(self, name: str) -> ModelMetrics:
        return ModelMetrics(self, name)

    def serve(self, port: int, host: str) -> None:
        """Expose /metrics over HTTP (port 0: not at all)."""
        if port:
            self._http, _thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class ModelMetrics:
    """One served model's children of the labelled metrics, as its scheduler records them."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.model = model
        self.queue_seconds = metrics.queue_seconds.labels(model)
        self.queued_pairs = metrics.queued_pairs.labels(model)
        self.pairs_scored = metrics.pairs_scored.labels(model)
        self.batches = metrics.batches.labels(model)
        self.batch_pairs = metrics.batch_pairs.labels(model)
        self.batch_tokens = metrics.batch_tokens.labels(model)
        self.batch_real_tokens = metrics.batch_real_tokens.labels(model)
        self.inference_seconds = metrics.inference_seconds.labels(model)
        self.replicas_ready = metrics.replicas_ready.labels(model)
        self.batches_lost = metrics.batches_lost.labels(model)
        self.batches_failed = metrics.batches_failed.labels(model)
        self._pairs_dropped = metrics.pairs_dropped

    def pairs_dropped(self, reason: str) -> Any:
        return self._pairs_dropped.labels(self.model, reason)
