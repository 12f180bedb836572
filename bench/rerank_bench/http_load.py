"""The server's HTTP/JSON API as a load driver: the Cohere v2 rerank call the SDKs make.

Why its own sender: the gRPC driver's clients each hold a channel of their own; these each hold an
httpx.Client (the Cohere SDK's HTTP library) with one keep-alive connection, so both protocols run
the same workloads through the same closed and open loops, and two phases differ only in the edge
their requests go through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from .loadgen import Connect, ServerTimings

RERANK_PATH = "/v2/rerank"


def rerank_body(query: str, documents: Sequence[str], model: str) -> dict[str, Any]:
    """What `cohere.ClientV2.rerank(model=..., query=..., documents=...)` sends: every document
    ranked (no top_n), as the gRPC driver's calls rank them."""
    return {"model": model, "query": query, "documents": list(documents)}


def reply_tokens(reply: Mapping[str, Any], documents: int) -> int:
    """The real tokens the server counted for a reply, which must rank each document once; any
    other reply raises ValueError (a figure, not a result)."""
    results = reply.get("results")
    if not isinstance(results, list) or sorted(r.get("index") for r in results) != list(range(documents)):
        raise ValueError(f"the reply does not rank each of the {documents} documents once")
    if not all(isinstance(r.get("relevance_score"), (int, float)) for r in results):
        raise ValueError("a result without a relevance_score")
    tokens = (reply.get("meta") or {}).get("tokens") or {}
    return int(tokens.get("input_tokens", 0))


class HttpSender:
    """POST /v2/rerank over one keep-alive connection, without retries (errors are figures)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        timeout: float,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._model = model
        self._client = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            limits=httpx.Limits(max_connections=1),
            transport=transport,
        )

    def send(self, query: str, documents: Sequence[str]) -> tuple[int, ServerTimings | None]:
        response = self._client.post(RERANK_PATH, json=rerank_body(query, documents, self._model))
        response.raise_for_status()
        return reply_tokens(response.json(), len(documents)), None

    def close(self) -> None:
        self._client.close()


def http_sender(base_url: str, model: str, timeout: float) -> Connect:
    return lambda: HttpSender(base_url, model, timeout)
