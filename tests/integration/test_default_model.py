"""Out of the box: the embedded all-MiniLM-L6-v2 default, offline, scored as sentence-transformers does."""

from __future__ import annotations

from pathlib import Path

import pytest
from reference import st_scores
from rerank_client import RerankerClient
from rerank_server.workers.devices import cpu_has_native_bf16

from integration.conftest import StartServer

pytestmark = pytest.mark.integration

QUERY = "How do giant pandas spend their day?"
DOCUMENTS = [
    "Giant pandas spend most of the day eating bamboo.",
    "The stock market closed higher on Friday.",
    "",
    "Pandas sleep between meals, often in trees.",
    "word " * 400,  # longer than the model's 256 tokens: cut
]


def test_the_default_model_serves_with_no_settings(start_server: StartServer, minilm_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    server = start_server("--cpu-replicas", "1")
    with RerankerClient(server.target, retry=None, timeout=60) as client:
        (model,) = client.list_models()
        assert model.name == "sentence-transformers/all-MiniLM-L6-v2"
        assert model.family == "bi-encoder"
        assert model.max_length == 256
        # dtype auto: bfloat16 on CPUs with native bfloat16 units, which costs about two decimals
        bf16 = cpu_has_native_bf16()
        assert model.dtype == ("bfloat16" if bf16 else "float32")
        raw = client.rerank(QUERY, DOCUMENTS, raw_scores=True)
        normalized = client.rerank(QUERY, DOCUMENTS)
    reference = st_scores(SentenceTransformer(str(minilm_dir), device="cpu"), QUERY, DOCUMENTS)
    got = {r.index: r.score for r in raw.results}
    for index, expected in enumerate(reference):
        assert got[index] == pytest.approx(float(expected), abs=0.02 if bf16 else 1e-5)
    assert [r.index for r in raw.results][:2] == [0, 3]
    for r in normalized.results:
        assert r.score == pytest.approx((got[r.index] + 1) / 2, abs=1e-6)
    assert raw.usage.truncated == 1


def test_the_readme_client_example_runs_as_written(start_server: StartServer) -> None:
    import os
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (example,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", readme, re.S)
        if "with RerankerClient(" in block and "tls_credentials" not in block  # the plaintext example
    ]
    server = start_server("--cpu-replicas", "1")
    ran = subprocess.run(
        [sys.executable, "-c", example],
        env={**os.environ, "RERANK_TARGET": server.target},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    first_line = ran.stdout.splitlines()[0].split()
    assert first_line[0] == "0"  # the panda document ranks first
    assert "SERVING" in ran.stdout
