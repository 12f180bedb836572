"""A checked request, and the usage and timings its answer reports."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rerank_server.families.base import Row, RowOptions
from rerank_server.models.registry import ServedModel
from rerank_server.scheduling.scheduler import Ticket
from rerank_server.types import RerankQuery, Timings, Usage


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


def ms_since(start: float) -> float:
    return 1000 * (time.perf_counter() - start)
