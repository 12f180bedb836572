"""Prometheus metrics of one server, in a registry of its own."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rerank_requests", "Finished RPCs", ["method", "code"], registry=r)
        self.request_seconds = Histogram(
            "rerank_request_duration_seconds", "RPC time", ["method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "rerank_queue_duration_seconds",
            "Queueing before a request's first batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queued_pairs = Gauge("rerank_queued_pairs", "Pairs waiting for a replica", registry=r)
        self.pairs_scored = Counter("rerank_pairs_scored", "Pairs a model replica ran", registry=r)
        self.pairs_dropped = Counter(
            "rerank_pairs_dropped", "Queued pairs dropped before reaching a model", ["reason"], registry=r
        )
        self.batches = Counter("rerank_batches", "Batches run", registry=r)
        self.batch_pairs = Histogram(
            "rerank_batch_pairs",
            "Pairs per batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.batch_tokens = Histogram(
            "rerank_batch_padded_tokens",
            "Padded tokens per batch",
            buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
            registry=r,
        )
        self.inference_seconds = Histogram(
            "rerank_batch_inference_seconds", "Model time per batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.replicas_ready = Gauge("rerank_replicas_ready", "Replicas loaded and serving", registry=r)
        self.worker_restarts = Counter("rerank_worker_restarts", "Worker processes restarted", registry=r)
        self.batches_lost = Counter("rerank_batches_lost", "Batches a dying replica held", registry=r)
        self._http: Any = None

    def serve(self, port: int, host: str) -> None:
        """Expose /metrics over HTTP (port 0: not at all)."""
        if port:
            self._http, _thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
