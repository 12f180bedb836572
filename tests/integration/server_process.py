"""Start the real `rerank-server` console script in a subprocess, and stop it without leftovers."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rerank_client import RerankerClient
from rerank_server.transport.shm import leftover_segments

SERVER_SCRIPT = Path(sys.executable).with_name("rerank-server")
LISTENING = re.compile(r"listening on [^\s]+:(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.metrics_port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [
            str(SERVER_SCRIPT),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            str(self.metrics_port),
        ]
        self.process = subprocess.Popen(
            [*command, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})},
        )
        self.orphans: list[int] = []
        self.port = self._wait_for_port()
        self.target = f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for_port(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log())
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"rerank-server exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"rerank-server did not listen within {timeout} s:\n{self.log()}")

    def wait_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        with RerankerClient(self.target, retry=None) as client:
            while time.monotonic() < deadline:
                try:
                    if client.health() == "SERVING":
                        return
                except Exception:
                    pass
                if self.process.poll() is not None:
                    raise RuntimeError(f"rerank-server exited with {self.process.returncode}:\n{self.log()}")
                time.sleep(0.1)
        raise TimeoutError(f"rerank-server not SERVING within {timeout} s:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        """The spawned worker processes (not the resource tracker)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == self.process.pid and "spawn_main" in cmdline:
                pids.append(int(entry.name))
        return sorted(pids)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The sum of a metric's samples in /metrics that carry these labels (0 when none does)."""
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        total = 0.0
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += sample.value
        return total

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server and wait (kill it and its workers if it hangs); returns the exit code."""
        workers = self.worker_pids()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._log.close()
        self.orphans = _wait_gone(workers, 15)
        return code

    def kill(self) -> None:
        for pid in self.worker_pids():
            _kill_quietly(pid)
        self.process.kill()
        self.process.wait(30)

    def leftover_shared_memory(self) -> list[str]:
        return leftover_segments(self.process.pid)


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait for processes to end; kill and return those still alive at the timeout."""
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphans = [p for p in pids if _alive(p)]
    for pid in orphans:
        _kill_quietly(pid)
    return orphans
