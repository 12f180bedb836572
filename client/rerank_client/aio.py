"""The asyncio client of the Reranker service, with the same API as the blocking one."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from rerank.v1 import reranker_pb2 as pb
from rerank.v1 import reranker_pb2_grpc

from rerank_client import _convert, _health
from rerank_client.credentials import call_metadata
from rerank_client.errors import InternalError, NotFoundError, from_rpc_error
from rerank_client.retry import DEFAULT_RETRY, Attempts, RetryPolicy
from rerank_client.types import ModelInfo, RankedDocument, RerankResult, Truncation

if TYPE_CHECKING:
    from typing_extensions import Self

    _StreamCall = grpc.aio.StreamStreamCall[pb.StreamRerankRequest, pb.StreamRerankResponse]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

#: A function or a coroutine function: what it returns is awaited when it is awaitable.
OnScored = Callable[[list[RankedDocument]], object]


class AsyncRerankerClient:
    """Reranks documents against a query on a rerank server, over one grpc.aio channel.

    Same options and methods as RerankerClient, as coroutines. Create it, and use it, within the
    event loop that runs it.
    """

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
        """Open a channel to `target` ("host:port"): TLS with `credentials` (see tls_credentials),
        plaintext without. `token` goes with every call as `authorization: Bearer <token>`.
        `options` are gRPC channel options; messages of up to 64 MiB each way by default, as the
        server's own default limit."""
        sent_metadata = call_metadata(metadata, token)  # checked before a channel opens
        if credentials is None:
            channel = grpc.aio.insecure_channel(target, options=_convert.channel_options(options))
        else:
            channel = grpc.aio.secure_channel(target, credentials, options=_convert.channel_options(options))
        self._setup(channel, owns_channel=True, metadata=sent_metadata, timeout=timeout, retry=retry)

    @classmethod
    def from_channel(
        cls,
        channel: grpc.aio.Channel,
        *,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        retry: RetryPolicy | None = DEFAULT_RETRY,
    ) -> Self:
        """Use a channel the caller opened (custom interceptors, shared channels).

        The channel stays the caller's: close() and the context manager leave it open.
        """
        client = cls.__new__(cls)
        client._setup(
            channel, owns_channel=False, metadata=call_metadata(metadata, token), timeout=timeout, retry=retry
        )
        return client

    def _setup(
        self,
        channel: grpc.aio.Channel,
        *,
        owns_channel: bool,
        metadata: Sequence[tuple[str, str]],
        timeout: float | None,
        retry: RetryPolicy | None,
    ) -> None:
        self._channel = channel
        self._owns_channel = owns_channel
        self._metadata = tuple(metadata)
        self._timeout = timeout
        self._retry = retry
        self._stub = reranker_pb2_grpc.RerankerStub(channel)
        self._health_check: grpc.aio.UnaryUnaryMultiCallable[str, str] = channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.encode_request,
            response_deserializer=_health.decode_status,
        )

    async def close(self) -> None:
        """Close the channel if this client opened it; calls under way are cancelled."""
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int = 0,
        model: str = "",
        return_documents: bool = False,
        raw_scores: bool = False,
        max_length: int = 0,
        truncation: Truncation | str = Truncation.END,
        instruction: str = "",
        cutoff_layer: int = 0,
        timeout: float | None = None,
    ) -> RerankResult:
        """Score every document against `query`; results are sorted best first, at most `top_n` (0: all).

        `model=""` is the server's default model, `max_length=0` its default token budget of a pair.
        A pair over that budget is cut (Truncation.END), refused (NONE), or, with CHUNK, scored by its
        document's best overlapping window, so text past the budget still counts. `instruction` and
        `cutoff_layer` ("" and 0: the model's default) apply only to models that take them, as
        list_models() says.
        """
        _convert.reject_bare_string(documents)
        truncation = _convert.truncation(truncation)
        request = _convert.rerank_request(
            query,
            documents,
            top_n=top_n,
            model=model,
            return_documents=return_documents,
            raw_scores=raw_scores,
            max_length=max_length,
            truncation=truncation,
            instruction=instruction,
            cutoff_layer=cutoff_layer,
        )
        return _convert.rerank_result(await self._unary(self._stub.Rerank, request, timeout))

    async def stream_rerank(
        self,
        query: str,
        documents: Iterable[str] | AsyncIterable[str],
        *,
        top_n: int,
        model: str = "",
        return_documents: bool = False,
        raw_scores: bool = False,
        max_length: int = 0,
        truncation: Truncation | str = Truncation.END,
        instruction: str = "",
        cutoff_layer: int = 0,
        chunk_size: int = 512,
        on_scored: OnScored | None = None,
        timeout: float | None = None,
    ) -> RerankResult:
        """Rerank a collection too large to hold or send at once; returns the best `top_n`.

        `documents` is read lazily, `chunk_size` at a time, as the server takes them. A sync
        iterable is read on the event loop, so it must not block: pass an async iterable for a
        slow source. `on_scored` (a function or a coroutine function) receives the scores of
        documents as the server finishes them, while the stream goes on. The stream is retried
        only before it is under way: once a document past the first chunk was taken from
        `documents`, or a response arrived, a failure surfaces. An exception raised by
        `documents` itself ends the stream and reaches the caller as is.

        The other options are rerank's.
        """
        _convert.reject_bare_string(documents)
        truncation = _convert.truncation(truncation)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        source = aiter(documents) if isinstance(documents, AsyncIterable) else iter(documents)
        stream = _Stream(source, chunk_size)
        header = pb.StreamRerankRequest(
            header=_convert.rerank_request(
                query,
                await stream.take(),
                top_n=top_n,
                model=model,
                return_documents=return_documents,
                raw_scores=raw_scores,
                max_length=max_length,
                truncation=truncation,
                instruction=instruction,
                cutoff_layer=cutoff_layer,
            )
        )
        attempts = self._attempts(timeout)
        while True:
            try:
                return await self._stream_once(stream, header, on_scored, attempts.timeout())
            except grpc.aio.AioRpcError as rpc_error:
                if stream.error is not None:
                    raise stream.error from None
                error = from_rpc_error(rpc_error)
                delay = attempts.backoff(error, retryable=stream.may_restart())
                if delay is None:
                    raise error from rpc_error
            await asyncio.sleep(delay)

    async def _stream_once(
        self,
        stream: _Stream,
        header: pb.StreamRerankRequest,
        on_scored: OnScored | None,
        timeout: float | None,
    ) -> RerankResult:
        """One attempt: a writer task feeds the call while this task reads its responses."""
        # No request iterator: the writer task uses call.write, so it sees the caller's errors.
        call = self._stub.StreamRerank(None, timeout=timeout, metadata=self._metadata)
        writer = asyncio.ensure_future(stream.write(call, header))
        reader = asyncio.ensure_future(_read(call, stream, on_scored))
        try:
            await asyncio.wait((writer, reader), return_when=asyncio.FIRST_COMPLETED)
            if stream.error is not None:
                raise stream.error
            return await reader
        finally:
            writer.cancel()
            reader.cancel()
            call.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the server serves, with their limits and readiness."""
        response = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [_convert.model_info(model) for model in response.models]

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard health status of `service` ("" is the whole server).

        One of "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" (the server does not know `service`:
        its NOT_FOUND answer) or "UNKNOWN".
        """
        try:
            return await self._unary(self._health_check, service, timeout)
        except NotFoundError:
            return "SERVICE_UNKNOWN"

    def _attempts(self, timeout: float | None) -> Attempts:
        return Attempts(self._retry, self._timeout if timeout is None else timeout)

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None,
    ) -> _Response:
        """Call `method`, retrying as the policy says, and raise failures as typed errors."""
        attempts = self._attempts(timeout)
        while True:
            try:
                return await method(request, timeout=attempts.timeout(), metadata=self._metadata)
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                delay = attempts.backoff(error)
                if delay is None:
                    raise error from rpc_error
            await asyncio.sleep(delay)


async def _read(call: _StreamCall, stream: _Stream, on_scored: OnScored | None) -> RerankResult:
    final: pb.RerankResponse | None = None
    async for response in call:
        stream.responded = True
        if response.HasField("final"):
            final = response.final
        elif on_scored is not None:
            outcome = on_scored(_convert.ranked_documents(response.scored.results))
            if inspect.isawaitable(outcome):
                await outcome
    if final is None:
        raise InternalError(
            grpc.StatusCode.INTERNAL, "the server ended StreamRerank without its final response"
        )
    return _convert.rerank_result(final)


class _Stream:
    """The caller's documents, taken a chunk at a time, and how far the stream has gone."""

    def __init__(self, source: Iterator[str] | AsyncIterator[str], chunk_size: int) -> None:
        self._source = source
        self._chunk_size = chunk_size
        self._exhausted = False
        self._chunks_taken = 0
        self._taking = False
        self.responded = False
        self.error: Exception | None = None  # what the caller's iterable raised

    async def take(self) -> list[str]:
        """The next chunk; empty once the source is exhausted."""
        if self._exhausted:
            return []
        # Stays set if the take is cancelled midway: the source is then in an unknown state.
        self._taking = True
        if isinstance(self._source, AsyncIterator):
            chunk = []
            async for document in self._source:
                chunk.append(document)
                if len(chunk) == self._chunk_size:
                    break
        else:
            chunk = list(itertools.islice(self._source, self._chunk_size))
        self._taking = False
        self._chunks_taken += bool(chunk)
        self._exhausted = len(chunk) < self._chunk_size
        return chunk

    def may_restart(self) -> bool:
        """Whether a failed attempt may be repeated: nothing past the first chunk taken or received."""
        return not (self._taking or self.responded or self._chunks_taken > 1)

    async def write(self, call: _StreamCall, header: pb.StreamRerankRequest) -> None:
        """Send the header, then the rest of the documents as the call accepts them.

        A failure of the caller's iterable (or a document that is not a str) is kept in `error`
        and ends this task: the stream must not wait for documents that will never come.
        """
        try:
            await self._write(call, header)
        except Exception as error:
            self.error = error
            raise

    async def _write(self, call: _StreamCall, header: pb.StreamRerankRequest) -> None:
        if not await _send(call, header):
            return
        # The server accepts the header by sending its initial metadata (rerank-server does so
        # once the header is valid and queued). Writing before that could race with a refusal,
        # and grpc.aio then reports INTERNAL instead of the refusal's status (grpc issue 36066).
        await call.initial_metadata()
        if call.done():
            return
        while chunk := await self.take():
            if not await _send(call, _convert.documents_chunk(chunk)):
                return
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.done_writing()  # an error here means the call is over: the reader reports how


async def _send(call: _StreamCall, message: pb.StreamRerankRequest) -> bool:
    """Write `message`; False when the call is already over (the reader reports how)."""
    try:
        await call.write(message)
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return False
    return True
