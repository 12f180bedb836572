"""The asyncio client of the Reranker service, with the same API as the blocking one."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from rerank.v1 import reranker_pb2 as pb

from rerank_client import _calls, _convert, _health
from rerank_client._base import ClientBase
from rerank_client._calls import OnScored, StreamReplies
from rerank_client.errors import NotFoundError
from rerank_client.types import ModelInfo, RerankResult, Truncation

if TYPE_CHECKING:
    from rerank.v1.reranker_pb2_grpc import RerankerAsyncStub
    from typing_extensions import Self

    _StreamCall = grpc.aio.StreamStreamCall[pb.StreamRerankRequest, pb.StreamRerankResponse]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class AsyncRerankerClient(ClientBase[grpc.aio.Channel]):
    """Reranks documents against a query on rerank servers, over one grpc.aio channel.

    Same options and methods as RerankerClient, as coroutines. Create it, and use it, within the
    event loop that runs it.
    """

    _stub: RerankerAsyncStub

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def close(self) -> None:
        """Close the channels this client opened; calls under way are cancelled."""
        for channel in self._to_close():
            await channel.close(None)

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
        """RerankerClient.rerank, as a coroutine: the options mean the same."""
        request = _calls.rerank_request(
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
        """RerankerClient.stream_rerank, as a coroutine: the options mean the same.

        `documents` may also be an async iterable. A sync iterable is read on the event loop, so
        it must not block: pass an async iterable for a slow source. `on_scored` may be a
        coroutine function: what it returns is awaited when it is awaitable.
        """
        _calls.check_stream(documents, chunk_size)
        request = _calls.rerank_request(
            query,
            [],
            top_n=top_n,
            model=model,
            return_documents=return_documents,
            raw_scores=raw_scores,
            max_length=max_length,
            truncation=truncation,
            instruction=instruction,
            cutoff_layer=cutoff_layer,
        )
        source = aiter(documents) if isinstance(documents, AsyncIterable) else iter(documents)
        stream = _Stream(source, chunk_size)
        header = _calls.stream_header(request, await stream.take())
        replies = StreamReplies(on_scored)
        attempts = self._attempts(timeout)
        while True:
            try:
                return await self._stream_once(stream, header, replies, attempts.timeout())
            except grpc.aio.AioRpcError as rpc_error:
                if stream.error is not None:
                    raise stream.error from None
                delay = attempts.pause_after(
                    rpc_error, retryable=not replies.responded and stream.may_restart()
                )
            await asyncio.sleep(delay)

    async def _stream_once(
        self, stream: _Stream, header: pb.StreamRerankRequest, replies: StreamReplies, timeout: float | None
    ) -> RerankResult:
        """One attempt: a writer task feeds the call while this task reads its responses."""
        # No request iterator: the writer task uses call.write, so it sees the caller's errors.
        call = self._stub.StreamRerank(None, timeout=timeout, metadata=self._metadata)
        writer = asyncio.ensure_future(stream.write(call, header))
        reader = asyncio.ensure_future(_read(call, replies))
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
        """RerankerClient.health, as a coroutine."""
        check: grpc.aio.UnaryUnaryMultiCallable[str, str] = self._health_channel().unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.encode_request,
            response_deserializer=_health.decode_status,
        )
        try:
            return await self._unary(check, service, timeout)
        except NotFoundError:
            return "SERVICE_UNKNOWN"

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
                delay = attempts.pause_after(rpc_error)
            await asyncio.sleep(delay)


async def _read(call: _StreamCall, replies: StreamReplies) -> RerankResult:
    async for response in call:
        outcome = replies.take(response)
        if inspect.isawaitable(outcome):
            await outcome
    return replies.result()


class _Stream:
    """The caller's documents, taken a chunk at a time, and how far the stream has gone."""

    def __init__(self, source: Iterator[str] | AsyncIterator[str], chunk_size: int) -> None:
        self._source = source
        self._chunk_size = chunk_size
        self._exhausted = False
        self._chunks_taken = 0
        self._taking = False
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
        """Whether a failed attempt may be repeated: nothing past the first chunk taken."""
        return not (self._taking or self._chunks_taken > 1)

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
            if not await _send(call, _calls.documents_chunk(chunk)):
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
