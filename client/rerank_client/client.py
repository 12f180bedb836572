"""The blocking client of the Reranker service."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from rerank.v1 import reranker_pb2 as pb

from rerank_client import _calls, _convert, _health
from rerank_client._base import ClientBase
from rerank_client._calls import OnScored, StreamReplies
from rerank_client.errors import NotFoundError
from rerank_client.types import ModelInfo, RerankResult, Truncation

if TYPE_CHECKING:
    from typing_extensions import Self

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class RerankerClient(ClientBase[grpc.Channel]):
    """Reranks documents against a query on rerank servers, over one gRPC channel.

    Thread-safe: share one client, and its channel, between threads.
    """

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def close(self) -> None:
        """Close the channels this client opened; calls under way are cancelled."""
        for channel in self._to_close():
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def rerank(
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
        list_models() says. `return_documents` sends each result's text back; `raw_scores` gives the
        model's raw scores instead of normalized ones. `timeout` overrides the client's.
        """
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
        return _convert.rerank_result(self._unary(self._stub.Rerank, request, timeout))

    def stream_rerank(
        self,
        query: str,
        documents: Iterable[str],
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

        `documents` is read lazily, `chunk_size` at a time, as the server takes them: a generator
        of millions of strings is never held in memory. `on_scored` receives the scores of
        documents as the server finishes them (in no particular order), while the stream goes on.
        The stream is retried only before it is under way: once a document past the first chunk
        was taken from `documents`, or a response arrived, a failure surfaces.
        An exception raised by `documents` itself ends the stream and reaches the caller as is.

        The other options are rerank's.
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
        source = iter(documents)
        first = list(itertools.islice(source, chunk_size))
        header = _calls.stream_header(request, first)
        stream = _Stream(source, chunk_size, exhausted=len(first) < chunk_size)
        replies = StreamReplies(on_scored)
        attempts = self._attempts(timeout)
        while True:
            try:
                return self._stream_once(stream, header, replies, attempts.timeout())
            except grpc.RpcError as rpc_error:
                if stream.error is not None:
                    raise stream.error from None
                delay = attempts.pause_after(rpc_error, retryable=not replies.responded and stream.restart())
            time.sleep(delay)

    def _stream_once(
        self, stream: _Stream, header: pb.StreamRerankRequest, replies: StreamReplies, timeout: float | None
    ) -> RerankResult:
        """One attempt: gRPC's own thread pulls the requests while this thread reads the responses."""
        started: Future[grpc.Call] = Future()
        responses = self._stub.StreamRerank(
            stream.requests(header, started), timeout=timeout, metadata=self._metadata
        )
        started.set_result(responses)
        try:
            for response in responses:
                replies.take(response)
        finally:
            # Stops gRPC's request thread when leaving early (on_scored raised); no-op when done.
            responses.cancel()
        return replies.result()

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the server serves, with their limits and readiness."""
        response = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [_convert.model_info(model) for model in response.models]

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard health status of `service` ("" is the whole server), as one server reports it.

        One of "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" (the server does not know `service`:
        its NOT_FOUND answer) or "UNKNOWN". Asked on a channel of its own, unbalanced, so a server
        that is NOT_SERVING still answers; with several addresses, the first that connects answers.
        """
        check: grpc.UnaryUnaryMultiCallable[str, str] = self._health_channel().unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.encode_request,
            response_deserializer=_health.decode_status,
        )
        try:
            return self._unary(check, service, timeout)
        except NotFoundError:
            return "SERVICE_UNKNOWN"

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None,
    ) -> _Response:
        """Call `method`, retrying as the policy says, and raise failures as typed errors."""
        attempts = self._attempts(timeout)
        while True:
            try:
                return method(request, timeout=attempts.timeout(), metadata=self._metadata)
            except grpc.RpcError as rpc_error:
                delay = attempts.pause_after(rpc_error)
            time.sleep(delay)


class _Stream:
    """The caller's documents after the first chunk, and how far the stream has gone.

    gRPC pulls request messages on a thread of its own. Only the current attempt may take from
    the caller's iterator: a failed attempt's thread must not take documents that its successor
    would then never send.
    """

    def __init__(self, source: Iterator[str], chunk_size: int, *, exhausted: bool) -> None:
        self._source = source
        self._chunk_size = chunk_size
        self._exhausted = exhausted
        self._lock = threading.Lock()  # held while taking from the source
        self._attempt = 0
        self._taken = False
        self.error: Exception | None = None  # what the caller's iterator raised

    def requests(
        self, header: pb.StreamRerankRequest, started: Future[grpc.Call]
    ) -> Iterator[pb.StreamRerankRequest]:
        """The messages of the current attempt, whose call `started` will hold."""
        return self._requests(header, started, self._attempt)

    def _requests(
        self, header: pb.StreamRerankRequest, started: Future[grpc.Call], attempt: int
    ) -> Iterator[pb.StreamRerankRequest]:
        yield header
        # Take nothing more from the caller's documents until the server accepted the header (its
        # initial metadata): a refused stream (no replica ready yet, say) then took only the first
        # chunk, and may still be retried.
        call = started.result()
        call.initial_metadata()
        if isinstance(call, grpc.Future) and call.done():  # refused: sends nothing more
            return
        while True:
            try:
                chunk = self._take(attempt)
                if not chunk:
                    return
                message = _calls.documents_chunk(chunk)
            except Exception as error:
                # The caller's iterable failed, or gave a document that is not a str: surface that
                # error itself rather than gRPC's "Exception iterating requests!".
                self.error = error
                started.result().cancel()
                return
            yield message

    def _take(self, attempt: int) -> list[str]:
        with self._lock:
            if attempt != self._attempt or self._exhausted:
                return []
            chunk = list(itertools.islice(self._source, self._chunk_size))
            self._taken = self._taken or bool(chunk)
            self._exhausted = len(chunk) < self._chunk_size
            return chunk

    def restart(self) -> bool:
        """Retire the current attempt so another may start; False once documents past the first
        chunk were taken."""
        if not self._lock.acquire(blocking=False):
            return False  # a take is under way
        try:
            if self._taken:
                return False
            self._attempt += 1
            return True
        finally:
            self._lock.release()
