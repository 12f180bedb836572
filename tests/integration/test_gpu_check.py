"""bench/gpu_check.py stays runnable for the session that is lent a GPU: its CPU mode runs every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rerank_server.transport.shm import leftover_segments

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    before = set(leftover_segments())
    ran = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--shape",
            "tiny",
            "--duration",
            "1",
            "--warmup",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["server_clean_shutdown"] is True
    for dtype in ("float16", "bfloat16"):
        figures = report["precision"][dtype]
        assert figures["requests"] == 16 and figures["not_finite"] == 0
        assert figures["top1_same"] >= 8  # the tiny model's scores are spread enough to compare
    for side in ("server", "baseline"):
        assert set(report[side]) == {"512-token pairs", "mixed lengths"}
        assert all(phase["pairs_per_s"] > 0 for phase in report[side].values())
    assert "| float16 vs float32 |" in ran.stdout
    assert set(leftover_segments()) <= before
