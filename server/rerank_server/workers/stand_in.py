"""Stand-ins for a model in the workers, so the rest of the server can be measured alone.

`null` returns a cheap deterministic score without running a network: what remains is the
front-end's and the transport's cost. `simulated` also sleeps for a time proportional to the
batch's padded tokens, as a device would take, without using the CPU: what remains is whether the
front-end keeps many devices busy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from rerank_server.families.base import ScoreArray, TokenBatch


@dataclass(frozen=True)
class StandIn:
    kind: str  # "null" or "simulated"
    us_per_token: float = 0.0  # simulated: microseconds per padded token of a batch

    def score(self, batch: TokenBatch) -> ScoreArray:
        if self.kind == "simulated":
            time.sleep(self.us_per_token * batch.rows * batch.width / 1e6)
        return null_scores(batch)


def null_scores(batch: TokenBatch) -> ScoreArray:
    """A score in [0, 1) from each row's token ids: deterministic, and different between rows."""
    if batch.rows == 0:
        return np.zeros(0, dtype=np.float32)
    starts = np.concatenate(([0], np.cumsum(batch.lengths[:-1], dtype=np.int64)))
    sums = np.add.reduceat(batch.tokens["input_ids"].astype(np.int64), starts)
    return ((sums % 1009) / 1009).astype(np.float32)
