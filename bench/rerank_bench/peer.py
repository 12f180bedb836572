"""A peer server (e.g. Infinity, from its own virtualenv) on the same machine, model and workload.

Why: a comparison with another server is only fair in the same run. The peer is any command that
serves the Cohere-shaped HTTP rerank API (`POST /rerank` with query and documents); `{model}` and
`{port}` in the command are filled in. It runs in its own process group, stopped with SIGTERM and
killed if it lingers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .harness import free_port
from .loadgen import Connect, ServerTimings

HEALTH_PATHS = ("/health", "/models")


class HttpSender:
    """POST /rerank with the documents, as the Cohere-shaped APIs take them. Tokens are not taken
    from the reply: peers count them differently (Infinity's usage is not the pairs' tokens)."""

    def __init__(self, base_url: str, model: str, timeout: float) -> None:
        self._url = f"{base_url}/rerank"
        self._model = model
        self._timeout = timeout

    def send(self, query: str, documents: Sequence[str]) -> tuple[int, ServerTimings | None]:
        body: dict[str, object] = {"query": query, "documents": list(documents), "return_documents": False}
        if self._model:
            body["model"] = self._model
        request = urllib.request.Request(
            self._url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=self._timeout) as response:
            reply = json.loads(response.read())
        if len(reply.get("results", ())) != len(documents):
            raise ValueError(f"the peer scored {len(reply.get('results', ()))} of {len(documents)}")
        return 0, None

    def close(self) -> None:
        """Nothing to close: one connection per request."""


class PeerProcess:
    """The peer's command in a process group of its own, up once its HTTP health answers 200."""

    def __init__(self, command: str, model_dir: Path, log_path: Path, model_name: str = "") -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model_name = model_name
        self._log = log_path.open("wb")
        self.log_path = log_path
        argv = shlex.split(command.format(model=model_dir, port=self.port))
        self.process = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            start_new_session=True,
        )

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._log.close()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the peer exited with {self.process.returncode}:\n{self.log_tail()}")
            for path in HEALTH_PATHS:
                with (
                    contextlib.suppress(OSError, urllib.error.URLError),
                    urllib.request.urlopen(self.base_url + path, timeout=2) as response,
                ):
                    if response.status == 200:
                        return
            time.sleep(0.5)
        raise TimeoutError(f"the peer did not answer within {timeout} s:\n{self.log_tail()}")

    def connect(self, timeout: float) -> Connect:
        return lambda: HttpSender(self.base_url, self.model_name, timeout)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM to the peer's process group; SIGKILL if it is still there after `timeout`."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):  # anything the peer started and left behind
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode
