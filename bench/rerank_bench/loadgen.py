"""Load: a closed loop of N client threads, or an open loop at a target request rate.

The closed loop (each client sends its next request when the last one returns) measures capacity;
the open loop (Poisson arrivals, latency counted from when a request was due, not when a free
thread sent it) measures latency at a given load without hiding queueing from the figures.
"""

from __future__ import annotations

import itertools
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rerank_client import RerankerClient

from .figures import Sample

MAX_REQUESTS = 100_000  # a hard bound on one phase besides the clock, whatever the speed
ServerTimings = tuple[float, float, float, float]


class Sender(Protocol):
    """One client connection: sends a request and returns (real tokens, server timings or None)."""

    def send(self, query: str, documents: Sequence[str]) -> tuple[int, ServerTimings | None]: ...

    def close(self) -> None: ...


Connect = Callable[[], Sender]
Requests = Callable[[int], tuple[str, list[str]]]
Probe = Callable[[], dict[str, float]]


class GrpcSender:
    """The real RerankerClient on a channel of its own, without retries (errors are figures)."""

    def __init__(self, target: str, timeout: float) -> None:
        self._client = RerankerClient(target, retry=None, timeout=timeout)

    def send(self, query: str, documents: Sequence[str]) -> tuple[int, ServerTimings | None]:
        result = self._client.rerank(query, documents)
        t = result.timings
        return result.usage.tokens, (t.tokenize_ms, t.queue_ms, t.inference_ms, t.total_ms)

    def close(self) -> None:
        self._client.close()


def grpc_sender(target: str, timeout: float) -> Connect:
    return lambda: GrpcSender(target, timeout)


@dataclass
class Run:
    """The samples of a load run, its measured window, and the probe's readings at either end."""

    samples: list[Sample]
    start: float
    end: float
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)


def timed_send(sender: Sender, requests: Requests, n: int, due: float | None = None) -> Sample:
    """Send request n; an exception is counted as an error, not raised."""
    query, documents = requests(n)
    start = time.perf_counter() if due is None else due
    try:
        tokens, server_ms = sender.send(query, documents)
    except Exception as exc:
        return Sample(start, time.perf_counter(), len(documents), error=type(exc).__name__)
    return Sample(start, time.perf_counter(), len(documents), tokens=tokens, server_ms=server_ms)


def closed_loop(
    connect: Connect,
    requests: Requests,
    clients: int,
    warmup: float,
    duration: float,
    probe: Probe | None = None,
    join_timeout: float = 130,
) -> Run:
    """`clients` threads, each with its own connection, send requests back to back; the window after
    the warm-up is measured, with `probe` read at its start and end."""
    counter = itertools.count()
    lock = threading.Lock()
    samples: list[Sample] = []
    start = time.perf_counter() + warmup
    run = Run(samples, start, start + duration)

    def client() -> None:
        sender = connect()
        try:
            while time.perf_counter() < run.end:
                with lock:
                    n = next(counter)
                if n >= MAX_REQUESTS:
                    return
                sample = timed_send(sender, requests, n)
                with lock:
                    samples.append(sample)
        finally:
            sender.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    _watch(run, probe)
    _join(threads, join_timeout)
    return run


def poisson_schedule(rate: float, seconds: float, seed: int) -> list[float]:
    """Send times (seconds from 0) of Poisson arrivals at `rate` per second, up to `seconds`."""
    rng = random.Random(seed)
    times: list[float] = []
    now = rng.expovariate(rate)
    while now < seconds and len(times) < MAX_REQUESTS:
        times.append(now)
        now += rng.expovariate(rate)
    return times


def open_loop(
    connect: Connect,
    requests: Requests,
    rate: float,
    warmup: float,
    duration: float,
    probe: Probe | None = None,
    max_in_flight: int = 32,
    seed: int = 0,
    join_timeout: float = 130,
) -> Run:
    """Requests due at Poisson times at `rate` per second, sent by up to `max_in_flight` threads;
    a request's latency runs from when it was due, so waiting for a free thread counts too."""
    begin = time.perf_counter()
    due_times = [begin + offset for offset in poisson_schedule(rate, warmup + duration, seed)]
    pending: queue.Queue[tuple[int, float] | None] = queue.Queue()
    lock = threading.Lock()
    samples: list[Sample] = []
    run = Run(samples, begin + warmup, begin + warmup + duration)

    def client() -> None:
        sender = connect()
        try:
            while (item := pending.get()) is not None:
                if time.perf_counter() > run.end:
                    continue  # due in the window but not sent by its end: it could not count
                sample = timed_send(sender, requests, *item)
                with lock:
                    samples.append(sample)
        finally:
            sender.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(max_in_flight)]
    for thread in threads:
        thread.start()
    watcher = threading.Thread(target=_watch, args=(run, probe), daemon=True)
    watcher.start()
    for n, due in enumerate(due_times):
        time.sleep(max(0.0, due - time.perf_counter()))
        pending.put((n, due))
    for _ in threads:
        pending.put(None)
    watcher.join()
    _join(threads, join_timeout)
    return run


def _watch(run: Run, probe: Probe | None) -> None:
    """Wait out the warm-up and the window, reading the probe at the window's start and end."""
    time.sleep(max(0.0, run.start - time.perf_counter()))
    if probe is not None:
        run.before = probe()
    time.sleep(max(0.0, run.end - time.perf_counter()))
    if probe is not None:
        run.after = probe()


def _join(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"client threads did not finish within {timeout} s of the window's end")
