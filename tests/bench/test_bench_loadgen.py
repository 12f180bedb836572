"""The load generator: the open loop's Poisson schedule, and latency counted from when a request was due."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence

import pytest
from rerank_bench.loadgen import closed_loop, open_loop, poisson_schedule


def test_the_schedule_is_poisson_at_the_rate_and_reproducible() -> None:
    times = poisson_schedule(50.0, 40.0, seed=3)
    assert times == poisson_schedule(50.0, 40.0, seed=3)
    assert times != poisson_schedule(50.0, 40.0, seed=4)
    assert times == sorted(times) and times[0] > 0 and times[-1] < 40.0
    assert abs(len(times) - 2000) < 200  # 50/s for 40 s
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert abs(statistics.fmean(gaps) - 0.02) < 0.002
    assert abs(statistics.stdev(gaps) - 0.02) < 0.003  # exponential gaps: sd = mean


class SlowSender:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def send(self, query: str, documents: Sequence[str]) -> tuple[int, None]:
        time.sleep(self.seconds)
        return 10 * len(documents), None

    def close(self) -> None:
        pass


def request(n: int) -> tuple[str, list[str]]:
    return f"query {n}", ["a", "b"]


def test_open_loop_latency_includes_waiting_for_a_free_sender() -> None:
    # One sender taking 50 ms against arrivals every 25 ms on average: requests queue, and their
    # latency (from when they were due) grows past the 50 ms of the call itself.
    run = open_loop(lambda: SlowSender(0.05), request, rate=40.0, warmup=0.0, duration=1.0, max_in_flight=1)
    latencies = [s.end - s.start for s in run.samples]
    assert run.samples and all(latency >= 0.05 for latency in latencies)
    assert max(latencies) > 0.2
    assert run.end - run.start == pytest.approx(1.0)


def test_open_loop_below_capacity_keeps_latency_at_the_call_time() -> None:
    run = open_loop(lambda: SlowSender(0.01), request, rate=20.0, warmup=0.0, duration=1.0, max_in_flight=4)
    assert statistics.median(s.end - s.start for s in run.samples) < 0.03


def test_closed_loop_reads_the_probe_at_the_window_edges() -> None:
    readings = iter([{"n": 1.0}, {"n": 5.0}])
    run = closed_loop(lambda: SlowSender(0.01), request, 2, 0.1, 0.3, probe=lambda: next(readings))
    assert run.before == {"n": 1.0} and run.after == {"n": 5.0}
    assert all(s.pairs == 2 and s.tokens == 20 for s in run.samples)
    assert 20 < len(run.samples) < 100  # 2 clients x 40 s^-1 x 0.4 s
