"""The model's stand-ins, for measuring the server alone: cheap, deterministic, and (simulated) timed."""

from __future__ import annotations

import numpy as np
import pytest
from rerank_server.families.base import TokenBatch
from rerank_server.settings import ServerSettings
from rerank_server.workers import stand_in
from rerank_server.workers.stand_in import StandIn, null_scores


def batch(*rows: list[int]) -> TokenBatch:
    return TokenBatch(
        lengths=np.array([len(r) for r in rows], dtype=np.int32),
        tokens={"input_ids": np.array([t for r in rows for t in r], dtype=np.int32)},
        values={},
    )


def test_null_scores_depend_on_each_rows_tokens_only() -> None:
    scores = null_scores(batch([1, 2, 3], [5], [1, 2, 3]))
    assert scores.dtype == np.float32 and scores.shape == (3,)
    assert scores[0] == scores[2] != scores[1]
    assert scores[0] == pytest.approx(6 / 1009)
    assert null_scores(batch([5], [1, 2, 3]))[1] == scores[0]  # not on its batch
    assert null_scores(batch()).shape == (0,)


def test_simulated_sleeps_per_padded_token(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(stand_in.time, "sleep", slept.append)
    scores = StandIn("simulated", us_per_token=10).score(batch([1] * 8, [2] * 2))
    assert slept == [pytest.approx(2 * 8 * 10e-6)]  # 2 rows x width 8
    assert scores.tolist() == null_scores(batch([1] * 8, [2] * 2)).tolist()
    StandIn("null").score(batch([1]))
    assert len(slept) == 1  # null never sleeps


def test_the_scorer_setting_picks_the_stand_in() -> None:
    assert ServerSettings.from_args([]).stand_in() is None
    assert ServerSettings.from_args(["--scorer", "null"]).stand_in() == StandIn("null", 2.0)
    assert ServerSettings.from_args(
        ["--scorer", "simulated", "--simulated-us-per-token", "0.5"]
    ).stand_in() == StandIn("simulated", 0.5)
