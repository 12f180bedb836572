"""From timed requests to a phase's figures: throughput, latency percentiles, server timings, batches."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

CONTENTION_SHARE = 0.05  # other processes' CPU, as a share of the window's CPU, that flags a phase
BATCH_METRICS = {
    "rerank_batches_total": "batches",
    "rerank_batch_pairs_sum": "pairs",
    "rerank_batch_padded_tokens_sum": "padded_tokens",
    "rerank_batch_inference_seconds_sum": "inference_s",
}


@dataclass
class Sample:
    """One request as the client saw it, and the timings the server reported for it."""

    start: float  # when it was sent; in an open loop, when it was due
    end: float
    pairs: int
    error: str | None = None
    tokens: int = 0  # real tokens, as the server's usage reports them
    server_ms: tuple[float, float, float, float] | None = None  # tokenize, queue, inference, total


@dataclass
class Phase:
    """The figures of one measured window: a baseline, the server or a peer at one load."""

    setup: str
    workload: str
    load: str  # "1 client", "8 clients", "open 12.5 req/s"
    clients: int
    seconds: float
    requests: int
    pairs: int
    pairs_per_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    server_timings_p50_ms: dict[str, float] | None = None
    batches: dict[str, float] | None = None  # from the server's /metrics, over the window
    tokens_per_pair: float | None = None
    real_to_padded: float | None = None  # real tokens / padded tokens of the batches run
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    contended: bool = False  # other processes took a noticeable share of the CPU in the window

    def flag_contention(self, cores: int) -> None:
        """Figures taken while something else ran are not the server's: mark them."""
        self.contended = self.cpu_seconds.get("other", 0.0) > CONTENTION_SHARE * cores * self.seconds


@dataclass
class Target:
    """A goal the server should meet, what was measured, and whether it was met (None: not measured)."""

    name: str
    goal: str  # ">= 0.9", "<= 0.1"
    measured: float | None
    met: bool | None


def target(name: str, measured: float | None, op: str, bound: float) -> Target:
    """`measured op bound`, where op is ">=" or "<="."""
    if measured is None:
        return Target(name, f"{op} {bound:g}", None, None)
    met = measured >= bound if op == ">=" else measured <= bound
    return Target(name, f"{op} {bound:g}", round(measured, 3), met)


@dataclass
class Outcome:
    """One scenario's result: its phases, targets, other figures (notes) and server shutdowns."""

    scenario: str
    date: str
    settings: dict[str, Any]
    phases: list[Phase] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    shutdowns: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""  # why the scenario stopped, when it failed


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def summarize(
    setup: str, workload: str, load: str, clients: int, samples: list[Sample], start: float, end: float
) -> Phase:
    """Throughput spreads each successful request's pairs evenly over its lifetime and counts the
    share inside the window (no error of up to one whole request when requests take seconds each);
    latency percentiles are over the requests that completed inside the window."""
    window = [s for s in samples if start <= s.end <= end]
    ok = [s for s in window if s.error is None]
    seconds = end - start
    pairs = sum(s.pairs for s in ok)
    work = sum(
        s.pairs * max(0.0, min(s.end, end) - max(s.start, start)) / max(s.end - s.start, 1e-9)
        for s in samples
        if s.error is None
    )
    phase = Phase(
        setup=setup,
        workload=workload,
        load=load,
        clients=clients,
        seconds=round(seconds, 2),
        requests=len(ok),
        pairs=pairs,
        pairs_per_s=round(work / seconds, 2),
        latency_ms=percentiles([1000 * (s.end - s.start) for s in ok], (50, 95, 99)),
        errors=dict(Counter(s.error for s in window if s.error is not None)),
    )
    done = [s for s in samples if s.error is None]  # a property of what was sent: warm-up included
    if any(s.tokens for s in done):  # a peer may not report tokens
        phase.tokens_per_pair = round(sum(s.tokens for s in done) / sum(s.pairs for s in done), 1)
    timed = [s.server_ms for s in ok if s.server_ms is not None]
    if timed:
        names = ("tokenize", "queue", "inference", "total")
        phase.server_timings_p50_ms = {
            name: round(statistics.median(t[i] for t in timed), 1) for i, name in enumerate(names)
        }
    return phase


def percentiles(values: list[float], points: tuple[int, ...]) -> dict[str, float]:
    """Linear-interpolated percentiles (numpy's default), rounded to 0.1; empty for no values."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for p in points:
        position = (len(ordered) - 1) * p / 100
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        out[f"p{p}"] = round(ordered[low] + (ordered[high] - ordered[low]) * (position - low), 1)
    return out


def batch_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Batches run in a window (from /metrics counters), with their mean rows, padded tokens and time."""
    delta = {BATCH_METRICS[name]: after[name] - before[name] for name in BATCH_METRICS}
    batches = delta["batches"]
    if batches <= 0:
        return {"batches": 0}
    return {
        "batches": batches,
        "pairs_per_batch": round(delta["pairs"] / batches, 1),
        "padded_tokens_per_batch": round(delta["padded_tokens"] / batches),
        "padded_tokens_per_pair": round(delta["padded_tokens"] / max(1.0, delta["pairs"]), 1),
        "inference_ms_per_batch": round(1000 * delta["inference_s"] / batches, 1),
    }


def rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 2) for key, value in values.items()}
