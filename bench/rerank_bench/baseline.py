"""The raw in-process baseline: transformers tokenizer + model in this process, what a user would
write without a server, at the dtype the server's `--dtype auto` picks on this CPU.

Two ways to batch: one request as one padded batch (what a caller does with one request), or the
pairs of SORTED_ROUND requests pooled, sorted by length and cut into padded batches of 32 (what a
raw loop with eight clients' load at hand can reach, and what a length-aware server has to meet).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .figures import Phase, Sample, rounded, summarize
from .loadgen import MAX_REQUESTS
from .machine import cores, machine_busy_seconds, proc_cpu_seconds, proc_memory_mib
from .workloads import Workload

SORTED_ROUND = 8  # requests the sorted baseline pools, as eight clients' load would
SORTED_BATCH = 32


def server_cpu_dtype() -> str:
    """What the server's `--dtype auto` picks on this CPU: bfloat16 with native units, else float32."""
    from rerank_server.workers.devices import cpu_dtype, cpu_has_native_bf16

    return cpu_dtype("auto", cpu_has_native_bf16())


class InProcess:
    """A tokenizer and a sequence classifier at one dtype, with torch on every core."""

    def __init__(self, model_dir: Path, dtype: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(cores())
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=getattr(torch, dtype)
        ).eval()

    def score(self, queries: list[str], documents: list[str]) -> tuple[list[float], int]:
        """One padded batch: its logits as Python floats (as a caller would use them), real tokens."""
        import torch

        inputs = self.tokenizer(
            queries, documents, padding=True, truncation="only_second", max_length=512, return_tensors="pt"
        )
        with torch.inference_mode():
            logits = self.model(**inputs).logits
        return logits.view(-1).float().tolist(), int(inputs["attention_mask"].sum())

    def score_sorted(self, pairs: list[tuple[str, str]], batch: int) -> int:
        """The pairs sorted by length, in padded batches of `batch`; returns the real tokens."""
        lengths = [
            len(ids) for ids in self.tokenizer([q for q, _ in pairs], [d for _, d in pairs])["input_ids"]
        ]
        ordered = [pairs[i] for i in sorted(range(len(pairs)), key=lengths.__getitem__)]
        tokens = 0
        for start in range(0, len(ordered), batch):
            part = ordered[start : start + batch]
            tokens += self.score([q for q, _ in part], [d for _, d in part])[1]
        return tokens


def run_baseline(
    model_dir: Path, workload: Workload, warmup: float, duration: float, dtype: str, *, sorted_rounds: bool
) -> Phase:
    """Requests back to back for `warmup` + `duration` seconds: one padded batch each, or (sorted)
    SORTED_ROUND requests a round, sorted, in batches of SORTED_BATCH. The window is measured."""
    scorer = InProcess(model_dir, dtype)
    me = os.getpid()
    start = time.perf_counter() + warmup
    end = start + duration
    samples: list[Sample] = []
    cpu_before: float | None = None
    busy_before = 0.0
    round_size = SORTED_ROUND if sorted_rounds else 1
    for n in range(MAX_REQUESTS):
        now = time.perf_counter()
        if now >= end:
            break
        if cpu_before is None and now >= start:
            cpu_before, busy_before = proc_cpu_seconds(me), machine_busy_seconds()
        requests = [workload.request(n * round_size + i) for i in range(round_size)]
        if sorted_rounds:
            tokens = scorer.score_sorted([(q, d) for q, docs in requests for d in docs], SORTED_BATCH)
        else:
            query, documents = requests[0]
            tokens = scorer.score([query] * len(documents), documents)[1]
        pairs = sum(len(documents) for _, documents in requests)
        samples.append(Sample(now, time.perf_counter(), pairs, tokens=tokens))
    name = f"baseline sorted, batches of {SORTED_BATCH}" if sorted_rounds else "baseline, one padded batch"
    load = f"1 loop, {SORTED_ROUND} requests a round" if sorted_rounds else "1 loop"
    phase = summarize(f"{name} ({dtype})", workload.name, load, 1, samples, start, end)
    if cpu_before is not None:
        used = (proc_cpu_seconds(me) or 0.0) - cpu_before
        phase.cpu_seconds = rounded(
            {"benchmark": used, "other": max(0.0, machine_busy_seconds() - busy_before - used)}
        )
    phase.peak_rss_mib = {"process": round(proc_memory_mib(me).get("VmHWM", 0.0), 1)}
    return phase
