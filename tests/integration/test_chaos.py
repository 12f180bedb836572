"""Chaos: 8 clients send continuously while random workers are SIGKILLed and SIGSTOPped every few
seconds. With the client's retries on, no request fails and every answer is correct; at the end every
replica is back and the server is SERVING (the fixture then checks that /dev/shm holds nothing of it).

A SIGSTOPped worker never answers: only hung-worker detection (a batch running far past its
prediction, and past --batch-timeout-floor-s, kills and replaces the worker and reruns the batch)
lets its requests finish. The workers run the simulated scorer: a batch takes a while, as on a device,
so faults land on batches in flight, and its scores are exact, so every answer is compared with the
same request's answer before any fault. RERANK_CHAOS_SECONDS sets how long the faults go on (the
issue's full run is 60).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest
from rerank_bench.machine import alive
from rerank_bench.workloads import TokenCounter, default_tokenizer_path, make_workload
from rerank_client import RerankerClient, RerankError, RetryPolicy
from soak import serving_worker_pids

from integration.conftest import StartServer
from integration.server_process import ServerProcess

pytestmark = pytest.mark.integration

CHAOS_SECONDS = float(os.environ.get("RERANK_CHAOS_SECONDS", "30"))
CLIENTS = 8
REPLICAS = 2
FAULT_EVERY_S = (2.0, 4.0)
CALL_TIMEOUT_S = 120.0  # past it a request counts as hung, which no retry can mend
# Enough attempts to outlast both replicas down at once (each restart takes well under a second).
RETRY = RetryPolicy(max_attempts=40, initial_backoff=0.05, max_backoff=0.5)
SERVER_ARGS = (
    "--scorer", "simulated", "--simulated-us-per-token", "20",
    "--cpu-replicas", str(REPLICAS), "--restart-backoff-s", "0.2", "--batch-timeout-floor-s", "1",
)  # fmt: skip

Answer = list[tuple[int, float]]


@dataclass
class Faults:
    """What the injector did: (seconds since the start, signal name, worker pid)."""

    injected: list[tuple[float, str, int]] = field(default_factory=list)

    def pids(self, name: str) -> list[int]:
        return [pid for _, sig, pid in self.injected if sig == name]


def answer(client: RerankerClient, query: str, documents: list[str]) -> Answer:
    return [(r.index, r.score) for r in client.rerank(query, documents, raw_scores=True).results]


def inject_faults(server: ServerProcess, faults: Faults, stop: threading.Event, seed: int) -> None:
    """Every 2-4 s, SIGKILL a random worker or SIGSTOP a random serving one (the server notices a
    stopped worker by a batch it holds; one still loading holds none). A stopped one stays stopped."""
    rng = random.Random(seed)
    began = time.monotonic()
    while not stop.wait(rng.uniform(*FAULT_EVERY_S)):
        sig = rng.choice([signal.SIGKILL, signal.SIGSTOP])
        stopped = set(faults.pids("SIGSTOP"))
        workers = serving_worker_pids(server) if sig == signal.SIGSTOP else server.worker_pids()
        running = [pid for pid in workers if pid not in stopped]
        if not running:
            continue
        pid = rng.choice(running)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
        faults.injected.append((time.monotonic() - began, sig.name, pid))


def test_no_request_fails_while_workers_are_killed_and_stopped(start_server: StartServer) -> None:
    server = start_server(*SERVER_ARGS)
    workload = make_workload("mixed", TokenCounter(default_tokenizer_path()), seed=7)
    requests = [workload.request(n) for n in range(16)]
    with RerankerClient(server.target, retry=None, timeout=CALL_TIMEOUT_S) as client:
        expected = [answer(client, query, documents) for query, documents in requests]

    stop_load, stop_faults = threading.Event(), threading.Event()
    outcomes: list[str] = []
    lock = threading.Lock()

    def send(seed: int) -> None:
        rng = random.Random(seed)
        with RerankerClient(server.target, retry=RETRY, timeout=CALL_TIMEOUT_S) as own:
            while not stop_load.is_set():
                n = rng.randrange(len(requests))
                try:
                    got = answer(own, *requests[n])
                    outcome = "ok" if got == expected[n] else f"wrong answer to request {n}"
                except RerankError as error:
                    outcome = f"failed: {error}"
                with lock:
                    outcomes.append(outcome)

    faults = Faults()
    clients = [threading.Thread(target=send, args=(seed,), daemon=True) for seed in range(CLIENTS)]
    injector = threading.Thread(target=inject_faults, args=(server, faults, stop_faults, 1), daemon=True)
    try:
        for thread in clients:
            thread.start()
        injector.start()
        time.sleep(CHAOS_SECONDS)
        stop_faults.set()
        injector.join(10)
        time.sleep(2.0)  # load goes on a little after the last fault, so that it is served too
        stop_load.set()
        for thread in clients:
            thread.join(CALL_TIMEOUT_S + 30)
        hung = sum(thread.is_alive() for thread in clients)
        assert hung == 0, f"{hung} clients still waiting; faults: {faults.injected}\n{server.log()[-4000:]}"

        bad = [outcome for outcome in outcomes if outcome != "ok"]
        assert bad == [], f"{len(bad)} of {len(outcomes)} requests: {bad[:10]}; faults: {faults.injected}"
        assert len(outcomes) >= CLIENTS * 2, "too little load to judge"
        assert faults.pids("SIGKILL") and faults.pids("SIGSTOP"), f"both faults needed: {faults.injected}"

        with RerankerClient(server.target, retry=None, timeout=30) as client:
            deadline = time.monotonic() + 60
            while client.list_models()[0].ready_replicas < REPLICAS and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.list_models()[0].ready_replicas == REPLICAS
            assert client.health() == "SERVING"
            # Every stopped worker was found hung and replaced: none is left holding a replica's place.
            assert [pid for pid in faults.pids("SIGSTOP") if alive(pid)] == []
            assert answer(client, *requests[0]) == expected[0]
    finally:
        stop_faults.set()
        stop_load.set()
        for pid in faults.pids("SIGSTOP"):  # so that the server can stop its workers whatever failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
