"""What the blocking and the asyncio client share: their settings, their channels and the stub."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
import grpc.aio
from rerank.v1 import reranker_pb2_grpc

from rerank_client._channel import channel_options, health_channel_options
from rerank_client.credentials import call_metadata
from rerank_client.retry import DEFAULT_RETRY, Attempts, RetryPolicy

if TYPE_CHECKING:
    from typing_extensions import Self

ChannelT = TypeVar("ChannelT", grpc.Channel, grpc.aio.Channel)


class ClientBase(ABC, Generic[ChannelT]):
    """A client's settings and channels; the subclasses hold the I/O, blocking or asyncio."""

    _channel: ChannelT
    _opened: list[ChannelT]  # what close() closes
    _open_health_channel: Callable[[], ChannelT] | None
    _health: ChannelT | None
    _stub: reranker_pb2_grpc.RerankerStub

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Open a channel to `target`: TLS with `credentials` (see tls_credentials), plaintext without.

        `target` is a gRPC name: "host:port", "dns:///host:port" (every address the name resolves
        to, such as a Kubernetes headless service's pods), or "ipv4:10.0.0.1:50051,10.0.0.2:50051".
        Calls are balanced across those addresses, one call to the next (gRPC's round_robin), and
        only to servers whose health is SERVING: a replica loading or draining gets no new calls.
        `token` goes with every call as `authorization: Bearer <token>`, and `metadata` too;
        `timeout` is the default deadline of a call, retries included; `retry=None` turns retries
        off. `options` are gRPC channel options, over the client's defaults: messages of up to 64
        MiB each way (the server's own default limit), and the balancing above (`grpc.service_config`).
        """
        sent_metadata = call_metadata(metadata, token)  # checked before a channel opens
        channel = self._open_channel(target, credentials, channel_options(options))

        def open_health_channel() -> ChannelT:
            return self._open_channel(target, credentials, health_channel_options(options))

        self._setup(
            channel, [channel], open_health_channel, metadata=sent_metadata, timeout=timeout, retry=retry
        )

    @classmethod
    def from_channel(
        cls,
        channel: ChannelT,
        *,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        retry: RetryPolicy | None = DEFAULT_RETRY,
    ) -> Self:
        """Use a channel the caller opened (custom interceptors, shared channels); health() asks on it too.

        The channel stays the caller's: close() and the context manager leave it open.
        """
        client = cls.__new__(cls)
        client._setup(
            channel, [], None, metadata=call_metadata(metadata, token), timeout=timeout, retry=retry
        )
        return client

    def _setup(
        self,
        channel: ChannelT,
        opened: list[ChannelT],
        open_health_channel: Callable[[], ChannelT] | None,
        *,
        metadata: Sequence[tuple[str, str]],
        timeout: float | None,
        retry: RetryPolicy | None,
    ) -> None:
        self._channel = channel
        self._opened = opened
        self._open_health_channel = open_health_channel
        self._health = None
        self._lock = threading.Lock()  # opens the health channel once
        self._metadata = tuple(metadata)
        self._timeout = timeout
        self._retry = retry
        self._stub = reranker_pb2_grpc.RerankerStub(channel)

    @abstractmethod
    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> ChannelT:
        """A new channel of the subclass's kind."""

    def _health_channel(self) -> ChannelT:
        """The channel health() asks on, opened at its first use.

        Not the balanced channel: that one sends no call to a server that is not SERVING, while
        health() must report what the server says (NOT_SERVING, SERVICE_UNKNOWN, "liveness").
        """
        with self._lock:
            if self._health is None:
                if self._open_health_channel is None:
                    return self._channel  # borrowed, or closed: its calls fail as such
                self._health = self._open_health_channel()
                self._opened.append(self._health)
            return self._health

    def _to_close(self) -> list[ChannelT]:
        """The channels this client opened, from now on none: a later health() fails as other calls do."""
        with self._lock:
            self._open_health_channel = None
            opened, self._opened = self._opened, []
            return opened

    def _attempts(self, timeout: float | None) -> Attempts:
        return Attempts(self._retry, self._timeout if timeout is None else timeout)
