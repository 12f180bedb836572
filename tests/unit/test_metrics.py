"""The metrics /metrics exports are exactly the documented ones (README's "Metrics" section), with their
labels, and follow Prometheus' naming conventions."""

from __future__ import annotations

import re
from pathlib import Path

from rerank_server.metrics import Metrics

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def documented() -> dict[str, set[str]]:
    """README's "Metrics" table: each metric (as a query names it) and its labels."""
    section = README.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(rerank_\w+)` \| \w+ \| ([^|]*) \|", section, re.MULTILINE)
    return {name: set(re.findall(r"`(\w+)`", labels)) for name, labels in rows}


# What the names the Kubernetes manifests and dashboards query must stay.
RELIED_ON = {
    "rerank_queued_work_seconds",
    "rerank_requests_total",
    "rerank_replicas_ready",
    "rerank_request_duration_seconds",
}


def exercised() -> Metrics:
    """A registry with a sample of every metric, as a serving model and its calls make them."""
    metrics = Metrics()
    model = metrics.for_model("m")
    model.queue_seconds.observe(0.01)
    model.queued_pairs.set(3)
    model.pairs_scored.inc(3)
    model.pairs_dropped("cancelled").inc()
    model.batches.inc()
    model.batch_pairs.observe(3)
    model.batch_tokens.observe(48)
    model.batch_real_tokens.inc(40)
    model.inference_seconds.observe(0.02)
    model.replicas_ready.set(1)
    model.batches_lost.inc()
    model.batches_failed.inc()
    metrics.watch_queue("m", lambda: 40.0, lambda: 0.5)
    metrics.call_ended("Rerank", "m", "OK", 0.05)
    metrics.calls_in_flight.labels("Rerank").inc()
    metrics.tokenize_seconds.labels("m").observe(0.001)
    metrics.worker_restarted("m", "hung")
    return metrics


def exported(metrics: Metrics) -> dict[str, tuple[str, set[str], set[str]]]:
    """Each family as a query names it: its type, its sample names and its labels (not `le`)."""
    families = {}
    for family in metrics.registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        families[name] = (family.type, {sample.name for sample in family.samples}, labels)
    return families


def test_the_exported_metrics_are_exactly_the_documented_ones_with_their_labels() -> None:
    families = exported(exercised())
    assert {name: labels for name, (_, _, labels) in families.items()} == documented()
    assert set(families) >= RELIED_ON


def test_counters_end_in_total_and_nothing_else_does() -> None:
    for name, (kind, samples, _) in exported(exercised()).items():
        if kind == "counter":
            assert name in samples and samples <= {name, name.removesuffix("_total") + "_created"}, name
        else:
            assert not any(sample.endswith("_total") for sample in samples), name


def test_times_are_in_seconds() -> None:
    for name in exported(exercised()):
        assert not re.search(r"_(ms|us|milliseconds|microseconds|minutes|hours)(_|$)", name), name
        if "duration" in name:
            assert name.endswith("_seconds"), name
