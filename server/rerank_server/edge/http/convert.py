"""JSON <-> the server's own types for the HTTP routes; nothing past the edge sees JSON.

`/v2/rerank` takes Cohere v2's body and answers its shape; `/v1/rerank` takes Cohere v1's and
Jina's (documents as strings or as objects with a `text` field) and answers a shape both SDKs read.
Fields a route does not know are ignored, so SDKs that send more (`rank_fields`, `priority`,
`return_documents` on v2) still work; a field it knows with a wrong type is a 400 naming it.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from rerank_server.errors import InvalidRequestError
from rerank_server.types import ModelInfo, RerankQuery, RerankResult, Truncation


class Api(enum.Enum):
    """The API version a route speaks, as its responses' meta.api_version names it."""

    V1 = "1"
    V2 = "2"


@dataclass(frozen=True)
class HttpRerank:
    """A parsed rerank body: the query for the data plane, and the documents as sent (a v1 reply
    with return_documents gives an object document back whole, other fields included)."""

    query: RerankQuery
    sent_documents: list[Any]


_TRUNCATION = {truncation.value: truncation for truncation in Truncation}


def rerank_request(body: bytes, api: Api, max_length_limit: Callable[[str], int]) -> HttpRerank:
    """The body of a rerank call as a RerankQuery; InvalidRequestError says what is wrong.

    `max_length_limit(model)` is the served model's pair budget limit (ModelNotFoundError for a
    model not served): Cohere's max_tokens_per_doc becomes the pair budget max_length, capped there.
    """
    payload = _json_object(body)
    query = _field(payload, "query", str, "a string")
    if query is None:
        raise InvalidRequestError("query is required: the text to rank the documents against")
    sent = payload.get("documents")
    if not isinstance(sent, list):
        raise InvalidRequestError(
            "documents is required: a list of strings (or of objects with a text string) to rank"
        )
    model = _field(payload, "model", str, "a string") or ""
    max_length = 0
    max_tokens_per_doc = _count(payload, "max_tokens_per_doc", 1)
    if max_tokens_per_doc is not None:
        max_length = min(max_tokens_per_doc, max_length_limit(model))
    return_documents = False
    truncation = _truncation(payload)
    if api is Api.V1:
        return_documents = bool(_field(payload, "return_documents", bool, "true or false"))
        max_chunks = _count(payload, "max_chunks_per_doc", 1)
        if truncation is None and max_chunks is not None and max_chunks > 1:
            truncation = Truncation.CHUNK  # Cohere v1 scores a long document by its best chunk
    return HttpRerank(
        RerankQuery(
            query=query,
            documents=document_texts(sent),
            model=model,
            top_n=_count(payload, "top_n", 1) or 0,
            return_documents=return_documents,
            raw_scores=bool(_field(payload, "raw_scores", bool, "true or false")),
            max_length=max_length,
            truncation=truncation or Truncation.END,
            instruction=_field(payload, "instruction", str, "a string") or "",
            cutoff_layer=_count(payload, "cutoff_layer", 0) or 0,
        ),
        sent,
    )


def document_texts(sent: list[Any]) -> list[str]:
    """The texts of `documents`: strings, or objects with a `text` string (Cohere v1, Jina)."""
    texts = []
    for position, document in enumerate(sent):
        if isinstance(document, str):
            texts.append(document)
        elif isinstance(document, dict) and isinstance(document.get("text"), str):
            texts.append(document["text"])
        else:
            raise InvalidRequestError(
                f"documents[{position}] must be a string or an object with a text string"
            )
    return texts


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidRequestError(f"the body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequestError("the body must be a JSON object")
    return payload


def _field(payload: dict[str, Any], name: str, kind: type, what: str) -> Any:
    """The field's value, None when absent or null; InvalidRequestError when not of `kind`."""
    value = payload.get(name)
    if value is not None and not isinstance(value, kind):
        raise InvalidRequestError(f"{name} must be {what}")
    return value


def _count(payload: dict[str, Any], name: str, least: int) -> int | None:
    """An integer field of at least `least`; None when absent or null."""
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidRequestError(f"{name} must be an integer of at least {least} (got {value!r})")
    return value


def _truncation(payload: dict[str, Any]) -> Truncation | None:
    """`truncation`: "end", "none" or "chunk" (any case); true and false (Jina's) mean end and none."""
    value = payload.get("truncation")
    if value is None:
        return None
    if isinstance(value, bool):
        return Truncation.END if value else Truncation.NONE
    truncation = _TRUNCATION.get(value.lower()) if isinstance(value, str) else None
    if truncation is None:
        raise InvalidRequestError(f'truncation must be "end", "none" or "chunk" (got {value!r})')
    return truncation


def rerank_response(
    result: RerankResult, api: Api, request_id: str, sent_documents: list[Any]
) -> dict[str, Any]:
    """Cohere's response shape for `api` (v1 with Jina's `usage` too); each relevance_score is the
    score the data plane reports (normalized, or raw with raw_scores)."""
    tokens = result.usage.tokens
    meta: dict[str, Any] = {"api_version": {"version": api.value}, "billed_units": {"search_units": 1}}
    if api is Api.V2:
        meta["tokens"] = {"input_tokens": tokens, "output_tokens": 0}
        results = [{"index": r.index, "relevance_score": r.score} for r in result.results]
        return {"id": request_id, "results": results, "meta": meta, "model": result.model}
    results = []
    for ranked in result.results:
        item: dict[str, Any] = {"index": ranked.index, "relevance_score": ranked.score}
        if ranked.document is not None:
            sent = sent_documents[ranked.index]
            item["document"] = sent if isinstance(sent, dict) else {"text": ranked.document}
        results.append(item)
    return {
        "id": request_id,
        "results": results,
        "meta": meta,
        "model": result.model,
        "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
    }


def models_response(models: list[ModelInfo]) -> dict[str, Any]:
    """Every served model, with what Cohere's model list says (endpoints, context_length)."""
    return {
        "models": [
            {**asdict(model), "endpoints": ["rerank"], "context_length": model.max_length_limit}
            for model in models
        ]
    }


def error_body(message: str) -> dict[str, str]:
    return {"message": message}


def encode(payload: object) -> bytes:
    """Compact JSON, UTF-8 (no NaN: that is not JSON)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
