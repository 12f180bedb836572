"""The report: markdown with the targets and the tables, and latency-throughput plots, from results."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rerank_bench.figures import Outcome, Sample, summarize, target
from rerank_bench.report import merge, render, write_docs


def phase(setup: str, load: str, clients: int, seconds_per_request: float) -> dict:
    samples = [
        Sample(i * seconds_per_request, (i + 1) * seconds_per_request, 20, tokens=2240) for i in range(30)
    ]
    result = summarize(setup, "uniform", load, clients, samples, 0.0, 30 * seconds_per_request)
    return dataclasses.asdict(result)


def fake_results() -> dict:
    outcome = Outcome("throughput", "2026-11-27T00:00:00+00:00", {"duration": 3.0, "warmup": 1.0})
    outcome.targets = [
        target("uniform, 8 clients: server / baseline pairs/s", 1.02, ">=", 0.95),
        target("mixed, 1 client: server p50 / one-padded-batch baseline p50", 0.8, "<=", 0.6),
        target("mixed, 8 clients: real / padded tokens", None, ">=", 0.85),
    ]
    outcome.notes = {"ratios": {"uniform: server 8 clients / baseline pairs/s": 1.02}}
    results = dataclasses.asdict(outcome)
    results["phases"] = [
        phase("baseline, one padded batch (float32)", "1 loop", 1, 0.4),
        phase("server", "1 client", 1, 0.35),
        phase("server", "8 clients", 8, 0.3),
        phase("server", "open 1.0 req/s", 0, 0.5),
    ]
    machine = {"date": "2026-11-27", "cpu_model": "Test CPU", "cores": 2, "cpu_flags": ["avx512_bf16"]}
    return merge(None, machine, [results])


def test_the_markdown_has_the_targets_and_the_tables() -> None:
    text = render(fake_results())
    assert "| throughput | uniform, 8 clients: server / baseline pairs/s | >= 0.95 | 1.020 | yes |" in text
    assert "| >= 0.85 | - | not measured |" in text
    assert "| <= 0.6 | 0.800 | **no** |" in text
    assert "| server | uniform | 8 clients | 30 | 66.7 |" in text


def test_the_page_and_a_png_plot_are_written(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    written = write_docs(fake_results(), page)
    plot = tmp_path / "performance" / "latency-throughput-uniform.png"
    assert written == [page, plot]
    assert plot.read_bytes().startswith(b"\x89PNG")
    text = page.read_text()
    assert "Test CPU" in text and "avx512_bf16" in text
    assert "](performance/latency-throughput-uniform.png)" in text
    assert "## Targets" in text


def test_merging_keeps_the_scenarios_not_rerun() -> None:
    first = fake_results()
    later = dataclasses.asdict(Outcome("bf16", "2026-11-28", {}))
    merged = merge(first, {"date": "2026-11-28"}, [later])
    assert list(merged["scenarios"]) == ["throughput", "bf16"]
    assert merge({"machine": {}}, {}, [later])["scenarios"].keys() == {"bf16"}
