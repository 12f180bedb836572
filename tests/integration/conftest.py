"""Real `rerank-server` processes for the integration tests, stopped cleanly after each use."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from integration.server_process import ServerProcess

StartServer = Callable[..., ServerProcess]


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    yield from _starter(tmp_path_factory.mktemp("server-logs"))


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    yield from _starter(tmp_path)


def _starter(log_dir: Path) -> Iterator[StartServer]:
    servers: list[ServerProcess] = []

    def start(*args: str, credentials: grpc.ChannelCredentials | None = None) -> ServerProcess:
        """`credentials`: the server's port speaks TLS, so its health is checked over TLS."""
        server = ServerProcess(list(args), log_dir / f"server-{len(servers)}.log")
        servers.append(server)
        server.wait_serving(credentials=credentials)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            code = server.stop(signal.SIGTERM)
            assert code == 0, server.log()
        assert server.orphans == [], f"workers outlived the server:\n{server.log()}"
        assert server.leftover_shared_memory() == [], "shared memory left in /dev/shm"
