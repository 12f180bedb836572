"""The real `rerank-server` console script in a subprocess, for the benchmark and the integration tests.

One harness for both, so what the tests check about starting and stopping (the port it logs, health
SERVING, exit code 0, no worker left, nothing left in /dev/shm) is what the benchmark relies on.
The server and every child it was seen with are killed on any failure: nothing outlives a run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
from prometheus_client.parser import text_string_to_metric_families
from rerank_client import RerankerClient
from rerank_server.transport.shm import SHM_DIR, leftover_segments

from .machine import alive, children, command_line

LISTENING = re.compile(r"listening on \S+:(\d+)")


def _server_script() -> Path:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("rerank-server")
    return beside if beside.exists() else Path(shutil.which("rerank-server") or beside)


SERVER_SCRIPT = _server_script()

# The integration tests import this name.
_alive = alive


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until condition() is true; returns the seconds it took, or raises TimeoutError naming `what`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


def free_port() -> int:
    """A port free right now on 127.0.0.1 (for /metrics, which has no "any port" option)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Shutdown:
    """What stopping the server left behind; `clean` is what the benchmark asserts."""

    exit_code: int | None
    workers: list[int]
    left_running: list[int]
    shm_left: list[str]

    @property
    def clean(self) -> bool:
        return self.exit_code == 0 and not self.left_running and not self.shm_left


class ServerProcess:
    """`rerank-server ARGS --host 127.0.0.1 --port 0 --metrics-port FREE --http-port FREE`, started
    and listening.

    The constructor returns once the server logged its port (`target`); `wait_serving` waits for
    health SERVING. The HTTP API is at `http_url` (https:// with --tls-cert; None when ARGS turn it
    off with --http-port 0, a port ARGS give is kept). Use it as a context manager so a failure
    kills it and its children.
    """

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        listen_timeout: float = 120,
    ) -> None:
        self.metrics_port = free_port()
        args = [str(arg) for arg in args]
        # Not "any port" (0 turns HTTP off): a free one, so servers started side by side never collide.
        http_port = int(args[args.index("--http-port") + 1]) if "--http-port" in args else free_port()
        scheme = "https" if "--tls-cert" in args else "http"
        self.http_url = f"{scheme}://127.0.0.1:{http_port}" if http_port else None
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [
            str(SERVER_SCRIPT),
            *args,
            "--host", "127.0.0.1",
            "--port", "0",
            "--metrics-port", str(self.metrics_port),
            *(() if "--http-port" in args else ("--http-port", str(http_port))),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Text logs (what auto picks only on a terminal): the checks and people read them.
            env={
                **os.environ,
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "RERANK_LOG_FORMAT": "text",
                **(env or {}),
            },
        )
        self._seen: dict[int, str] = {}  # every child seen, so it can be found after the server died
        self.orphans: list[int] = []  # children that outlived a stop (killed, and reported)
        try:
            self.port = self._wait_for_port(listen_timeout)
        except BaseException:
            self.kill()
            self._log.close()
            raise
        self.target = f"127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process.poll() is None or self._orphans():
            self.kill()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log())
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"rerank-server exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"rerank-server did not listen within {timeout} s:\n{self.log()}")

    def wait_serving(self, timeout: float = 180, credentials: grpc.ChannelCredentials | None = None) -> None:
        """Poll the standard health service through the real client until SERVING (over TLS with
        `credentials`: health needs no token, but a TLS port needs a TLS client)."""
        deadline = time.monotonic() + timeout
        with RerankerClient(self.target, credentials=credentials, retry=None, timeout=5) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):  # not up yet: UNAVAILABLE, or a deadline
                    if client.health() == "SERVING":
                        return
                if self.process.poll() is not None:
                    raise RuntimeError(f"rerank-server exited with {self.process.returncode}:\n{self.log()}")
                time.sleep(0.1)
        raise TimeoutError(f"rerank-server not SERVING within {timeout} s:\n{self.log()}")

    def children(self) -> list[tuple[int, str]]:
        """The server's children now (workers, multiprocessing's resource tracker), remembered."""
        found = children(self.process.pid)
        self._seen.update(found)
        return found

    def worker_pids(self) -> list[int]:
        """The spawned model workers (not the resource tracker)."""
        return [pid for pid, cmdline in self.children() if "spawn_main" in cmdline]

    def _orphans(self) -> list[int]:
        """Children seen earlier that still run the same command (so never a reused pid)."""
        return [pid for pid, cmdline in self._seen.items() if command_line(pid) == cmdline and alive(pid)]

    def metric_sums(self, names: Iterable[str], labels: Mapping[str, str] | None = None) -> dict[str, float]:
        """Each metric's samples in one scrape of /metrics that carry these labels, summed (0 if none)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        totals = dict.fromkeys(names, 0.0)
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name in totals and all(
                    sample.labels.get(k) == v for k, v in (labels or {}).items()
                ):
                    totals[sample.name] += sample.value
        return totals

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The sum of one metric's samples that carry these labels (0 when none does)."""
        return self.metric_sums([name], labels)[name]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server and wait; its children that outlive it by 15 s are killed and kept in
        `orphans`. Kills everything if the server itself hangs. Returns the exit code."""
        before = [pid for pid, _ in self.children()]
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._log.close()
        self.orphans = _wait_gone(before, 15)
        return code

    def shutdown(self, timeout: float = 90) -> Shutdown:
        """SIGTERM, then what the benchmark checks: exit code 0, no child left, no shared memory left."""
        workers = self.worker_pids()
        code = self.stop(signal.SIGTERM, timeout)
        return Shutdown(code, workers, self.orphans, self.leftover_shared_memory())

    def kill(self) -> None:
        """SIGKILL the server, then its children; remove its shared memory if its tracker could not."""
        self.children()
        _kill(self.process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        left = self._orphans()
        for pid in left:
            _kill(pid)
        _wait_gone(left, 10)
        for name in leftover_segments(self.process.pid):
            (Path(SHM_DIR) / name).unlink(missing_ok=True)

    def leftover_shared_memory(self) -> list[str]:
        return leftover_segments(self.process.pid)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait for processes to end; kill and return those still alive at the timeout."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if alive(p)]
    for pid in left:
        _kill(pid)
    return left
