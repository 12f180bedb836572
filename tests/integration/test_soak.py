"""The soak (bench/soak.py) for about 20 s: the real server, its default model, mixed load, hostile
inputs, and a worker SIGKILLed or SIGSTOPped every few seconds. No request is lost, the front-end's
memory, file descriptors and threads and the server's shared memory stay within bounds after the
warm-up, a maximal request stays within its memory bound, and the server leaves nothing behind.
RERANK_SOAK_SECONDS runs it longer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from soak import SoakPlan, render, run_soak

pytestmark = pytest.mark.integration

SOAK_SECONDS = float(os.environ.get("RERANK_SOAK_SECONDS", "20"))
# The front-end's peak over its RSS before a maximal request: about 3x the message here.
MAXIMAL_PEAK_PER_MESSAGE = 8
MAXIMAL_PEAK_SLACK_MIB = 64


def test_a_short_soak_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    plan = SoakPlan(
        seconds=SOAK_SECONDS,
        warmup_s=5,
        fault_every_s=5,
        sample_every_s=1,
        stream_documents=300,
        stop_grace_s=30,
        settle_s=1,
        # A stopped worker is found within seconds; a maximal request of 8 MiB keeps the test short.
        server_args=("--batch-timeout-floor-s", "2", "--max-message-mb", "8"),
    )
    result = run_soak(plan, tmp_path / "server.log")
    requests, totals = result["requests"], result["totals"]
    lost = {kind: k["lost_reasons"] for kind, k in requests.items() if k["lost"]}
    assert totals["lost"] == 0, lost
    assert result["hung_threads"] == 0
    for kind in ("interactive", "tiny", "hostile"):
        assert requests[kind]["ok"] > 0, f"no {kind} request answered"
        assert requests[kind]["failed"] == {}, requests[kind]["failures"]
    # A stream is retried only before it is under way: one the faults cut off fails, clearly.
    assert set(requests["stream"]["failed"]) <= {"UNAVAILABLE"}, requests["stream"]["failures"]

    faults = result["fault_summary"]
    assert sum(f["injected"] for f in faults.values()) >= 2, result["faults"]
    for signal_name, f in faults.items():
        assert f["recovered"] == f["injected"], f"a {signal_name} not recovered from: {result['faults']}"

    assert result["within_bounds"], result["growth"]
    assert result["shutdown"]["clean"], result["shutdown"]

    maximal = result["maximal_request"]
    assert maximal["status"] == "OK", maximal
    assert maximal["truncated"] == maximal["documents"]
    bound = MAXIMAL_PEAK_PER_MESSAGE * maximal["message_mib"] + MAXIMAL_PEAK_SLACK_MIB
    assert maximal["peak_over_before_mib"] <= bound, maximal

    report = render(result)
    assert "| requests lost | **0**" in report
    assert report.count("| SIGKILL |") == 1 and "## The memory of a maximal request" in report
