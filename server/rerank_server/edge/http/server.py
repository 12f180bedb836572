"""uvicorn serving the HTTP routes on the server's own event loop, beside gRPC.

The server's SIGTERM/SIGINT handlers drive the drain (app.serve), so uvicorn installs none; the
per-call log line is the server's own, so uvicorn writes no access log and only its warnings. The
port is bound here, before anything serves, so a port that cannot be bound stops the start with a
message rather than exiting from inside uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp


class _LoopServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """The HTTP port: bound by the constructor, serving from start() until stop()."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        tls_cert: str = "",
        tls_key: str = "",
        tls_client_ca: str = "",
    ) -> None:
        """Bind `host`:`port`; with `tls_cert` and `tls_key` it speaks TLS only, and with
        `tls_client_ca` clients must present a certificate that CA signed. OSError when the port
        cannot be bound, ValueError when the TLS files cannot serve."""
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            log_level=logging.WARNING,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            ssl_certfile=tls_cert or None,
            ssl_keyfile=tls_key or None,
            ssl_ca_certs=tls_client_ca or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
        )
        try:
            config.load()
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"HTTP port: cannot use --tls-cert/--tls-key/--tls-client-ca: {exc}") from exc
        self.tls = config.ssl is not None
        self._server = _LoopServer(config)
        self._socket = _listening_socket(host, port)
        self.port: int = self._socket.getsockname()[1]
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve on the running loop; returns once the port accepts connections."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped at start")
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float) -> None:
        """Stop taking connections, give requests still running `grace_s` seconds, then end them
        (the drain waited for the calls in flight before this)."""
        if self._task is None:
            self._socket.close()
            return
        self._server.config.timeout_graceful_shutdown = max(0, math.ceil(grace_s))
        self._server.should_exit = True
        await self._task


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on `host` (a name, an IPv4 or an IPv6 address, in brackets or not).

    Made with IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off only on sockets that say TCP,
    and with it on, a response's body waits behind its headers for the client's delayed ACK (40 ms).
    """
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock
