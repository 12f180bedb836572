"""Failures and shutdown of the real server: killed workers, no live replica, SIGTERM, a killed front-end."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from rerank_client import RerankerClient, RerankError, UnavailableError
from rerank_server.transport.shm import leftover_segments

from integration.conftest import StartServer
from integration.server_process import ServerProcess, _alive, wait_until
from integration.test_serving import QUERY, corpus

pytestmark = pytest.mark.integration

RETRIABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def tiny_server(start: StartServer, model: Path, *extra: str) -> ServerProcess:
    # float32: scores are compared across calls within 1e-5, which bfloat16's batch-dependent
    # rounding would not keep.
    return start(
        "--model", str(model), "--dtype", "float32", "--cpu-replicas", "2", "--restart-backoff-s", "0.5",
        *extra,
    )  # fmt: skip


def test_a_killed_worker_loses_no_request_and_is_replaced(
    start_server: StartServer, bert_cross_encoder_dir: Path
) -> None:
    server = tiny_server(start_server, bert_cross_encoder_dir)
    workers = server.worker_pids()
    assert len(workers) == 2
    with RerankerClient(server.target, retry=None) as client:
        expected = {r.index: r.score for r in client.rerank(QUERY, corpus(300)).results}
    stop = threading.Event()
    outcomes: list[str] = []

    def load(seed: int) -> None:
        with RerankerClient(server.target, retry=None) as own:
            while not stop.is_set():
                try:
                    result = own.rerank(QUERY, corpus(300), timeout=60)
                except RerankError as exc:
                    outcomes.append("retriable" if exc.code in RETRIABLE else f"failed: {exc}")
                    continue
                got = {r.index: r.score for r in result.results}
                ok = got.keys() == expected.keys() and all(abs(got[i] - expected[i]) < 1e-5 for i in got)
                outcomes.append("ok" if ok else "wrong scores")

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(load, i) for i in range(6)]
        wait_until(lambda: len(outcomes) >= 6, 60, "load")
        # Stopped first, so batches reach it and wait there (well within the hung-batch floor): the
        # kill then surely takes batches with it, which must run again elsewhere.
        os.kill(workers[0], signal.SIGSTOP)
        time.sleep(1.0)
        os.kill(workers[0], signal.SIGKILL)
        recovered = wait_until(
            lambda: server.metric("rerank_replicas_ready") == 2 and workers[0] not in server.worker_pids(),
            60,
            "a replacement worker",
        )
        served_before_stop = len(outcomes)
        time.sleep(1.0)
        stop.set()
        for future in futures:
            future.result(timeout=90)  # no request hangs
    assert server.metric("rerank_worker_restarts_total") == 1
    assert server.metric("rerank_batches_lost_total") >= 1
    assert recovered < 30
    assert len(outcomes) > served_before_stop  # served again after the restart
    bad = [o for o in outcomes if o not in ("ok", "retriable")]
    assert bad == []
    assert "ok" in outcomes
    assert len(server.worker_pids()) == 2


def test_with_no_live_replica_requests_get_unavailable(
    start_server: StartServer, bert_cross_encoder_dir: Path
) -> None:
    server = tiny_server(start_server, bert_cross_encoder_dir, "--restart-backoff-s", "3")
    for pid in server.worker_pids():
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: server.metric("rerank_replicas_ready") == 0, 30, "replicas down")
    reached = server.metric("rerank_requests_total", {"method": "Rerank"})
    with RerankerClient(server.target) as client, grpc.insecure_channel(server.target) as plain:
        # The client sends no call to a server that is not SERVING (gRPC health checking, so a
        # balanced client goes to another replica): it fails here, retries included, unsent.
        with pytest.raises(UnavailableError):
            client.rerank(QUERY, ["a"])
        assert server.metric("rerank_requests_total", {"method": "Rerank"}) == reached
        # A caller that does not check health gets the server's own refusal.
        with pytest.raises(UnavailableError, match="no model replica"):
            RerankerClient.from_channel(plain, retry=None).rerank(QUERY, ["a"])
        assert client.health() == "NOT_SERVING"
        assert client.health("liveness") == "SERVING"  # alive, only not ready: no liveness restart
        wait_until(lambda: client.health() == "SERVING", 120, "recovery")
        assert len(client.rerank(QUERY, ["a", "b"]).results) == 2


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_drains_calls_in_flight_and_exits_zero(
    start_server: StartServer, bert_cross_encoder_dir: Path, stop_signal: signal.Signals
) -> None:
    server = tiny_server(start_server, bert_cross_encoder_dir)
    workers = server.worker_pids()
    with RerankerClient(server.target, retry=None) as client, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(client.rerank, QUERY, corpus(8000), top_n=3, timeout=120)
        wait_until(lambda: server.metric("rerank_pairs_scored_total") > 0, 60, "the call to start")
        server.process.send_signal(stop_signal)
        wait_until(lambda: "draining" in server.log(), 10, "draining")
        with pytest.raises(RerankError) as refused:
            client.rerank(QUERY, ["late"], timeout=10)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert (client.health(), client.health("liveness")) == ("NOT_SERVING", "SERVING")
        assert len(in_flight.result(timeout=120).results) == 3
    assert server.process.wait(60) == 0
    wait_until(lambda: not any(_alive(p) for p in workers), 15, "workers to exit")
    assert server.leftover_shared_memory() == []


def test_a_killed_front_end_leaves_no_workers_and_no_shared_memory(
    start_server: StartServer, bert_cross_encoder_dir: Path
) -> None:
    server = tiny_server(start_server, bert_cross_encoder_dir)
    workers = server.worker_pids()
    assert server.leftover_shared_memory()  # the segments exist while it runs
    server.process.kill()
    server.process.wait(30)
    wait_until(lambda: not any(_alive(p) for p in workers), 30, "workers to exit")
    wait_until(lambda: server.leftover_shared_memory() == [], 30, "shared memory to be freed")


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--metrics-port", "cannot serve metrics on port {port}"),
        ("--http-port", "cannot listen on 127.0.0.1:{port} (HTTP)"),
    ],
    ids=["metrics", "http"],
)
def test_a_busy_port_stops_the_start_with_a_clear_message(
    bert_cross_encoder_dir: Path, flag: str, message: str
) -> None:
    import socket
    import subprocess

    from integration.server_process import SERVER_SCRIPT

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--metrics-port": "0", "--http-port": "0", flag: str(port)}
        started = subprocess.Popen(
            [SERVER_SCRIPT, "--model", bert_cross_encoder_dir, "--host", "127.0.0.1"]
            + [arg for pair in ports.items() for arg in pair],
            stderr=subprocess.PIPE,
            text=True,
        )
        _, stderr = started.communicate(timeout=120)
    assert started.returncode == 2, stderr
    assert message.format(port=port) in stderr
    assert leftover_segments(started.pid) == []


def test_an_old_connection_is_recycled_without_failing_a_call(
    start_server: StartServer, bert_cross_encoder_dir: Path
) -> None:
    """Past --max-connection-age-s the server asks the client to reconnect (so a balancing client
    resolves its target again); a stream spanning that moment goes on, and no call fails."""
    server = tiny_server(start_server, bert_cross_encoder_dir, "--max-connection-age-s", "1")
    channel = grpc.insecure_channel(server.target)
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append)

    def slow_documents():
        for i in range(6):
            time.sleep(0.5)
            yield f"document {i}"

    try:
        client = RerankerClient.from_channel(channel, retry=None)
        streamed = client.stream_rerank(QUERY, slow_documents(), top_n=6, chunk_size=1)
        assert sorted(r.index for r in streamed.results) == list(range(6))
        for _ in range(20):
            assert len(client.rerank(QUERY, ["a", "b"], timeout=30).results) == 2
            time.sleep(0.1)
        ready = [i for i, state in enumerate(states) if state == grpc.ChannelConnectivity.READY]
        assert any(state == grpc.ChannelConnectivity.IDLE for state in states[ready[0] :]), (
            f"the connection was never recycled: {states}"
        )
    finally:
        channel.close()
