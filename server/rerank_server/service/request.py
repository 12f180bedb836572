"""A checked request, the usage and timings its answer reports, and the size its reply may reach."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rerank_server.errors import InvalidRequestError
from rerank_server.families.base import Row, RowOptions
from rerank_server.models.registry import ServedModel
from rerank_server.scheduling.scheduler import Ticket
from rerank_server.types import RerankQuery, Timings, Usage

MIB = 1024 * 1024
# What a result adds to a reply besides its text, at most (index, score, field tags and lengths),
# and what the reply holds besides its results and model name (usage, timings).
RESULT_BYTES = 24
REPLY_BYTES = 1024


@dataclass(frozen=True)
class Prepared:
    """A checked request: the model that serves it and the options its rows are built with."""

    request: RerankQuery
    model: ServedModel
    options: RowOptions

    def reported(self, raw: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Scores as the client will read them: raw, or normalized by the model's family."""
        raw = np.asarray(raw, dtype=np.float32)
        return raw if self.request.raw_scores else self.model.rows.normalize(raw)


def usage_of(rows: Sequence[Row], documents: int) -> Usage:
    windows = Counter(row.document for row in rows)
    return Usage(
        documents=documents,
        tokens=sum(row.length for row in rows),
        truncated=len({row.document for row in rows if row.truncated}),
        chunked=sum(count > 1 for count in windows.values()),
        windows=len(rows),
    )


def timings_of(ticket: Ticket, tokenize_ms: float, started: float) -> Timings:
    dispatched = ticket.first_dispatch_at
    queue_ms = 1000 * (dispatched - ticket.opened_at) if dispatched is not None else 0.0
    inference_ms = (
        1000 * (ticket.last_score_at - dispatched)
        if dispatched is not None and ticket.last_score_at is not None
        else 0.0
    )
    return Timings(tokenize_ms, queue_ms, inference_ms, ms_since(started))


def text_bytes(text: str) -> int:
    """A text's size in a reply (UTF-8)."""
    return len(text) if text.isascii() else len(text.encode())


def check_reply_size(text_size: int, results: int, model: str, limit: int) -> None:
    """Refuse (INVALID_ARGUMENT) a reply of `results` results whose texts take `text_size` bytes
    when it could pass the largest message the server sends, rather than fail it after the work."""
    size = text_size + results * RESULT_BYTES + REPLY_BYTES + len(model.encode())
    if size > limit:
        raise InvalidRequestError(
            f"the reply with return_documents would take about {size / MIB:.1f} MiB, over the limit of "
            f"{limit / MIB:g} MiB (max_message_mb); ask for fewer documents (top_n) or leave "
            "return_documents off"
        )


def ms_since(start: float) -> float:
    return 1000 * (time.perf_counter() - start)
