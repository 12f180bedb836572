"""The prepared check of the GPU path, for a session that is lent a GPU: one run, under 8 minutes.

1. Builds a bge-reranker-v2-m3-shaped cross-encoder offline (XLM-R large: 24 layers, hidden 1024,
   16 heads, vocabulary 250,002, random weights) with the tests' small XLM-R tokenizer.
2. Precision: scores requests of mixed-length pairs in float32, float16 and bfloat16 on the device;
   reports per dtype whether every request keeps its top-10 order, and the largest difference.
3. Speed: the real server (one worker on the device, dtype auto) against a raw in-process baseline
   (the same model and dtype, one request at a time) in the same run, at 512-token pairs and on
   mixed lengths.
Prints one markdown table; writes JSON to $OUT/gpu_check.json when $OUT is set (the device tool's
folder), else bench/results/gpu_check.json. `--device cpu --shape tiny` runs every step on the CPU
in about a minute, to check the script itself.

Usage: .venv/bin/python bench/gpu_check.py [--device cuda] [--duration 15]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from families_bench import timed_loop
from rerank_bench import log
from rerank_bench.baseline import server_cpu_dtype
from rerank_bench.harness import ServerProcess
from rerank_bench.machine import machine_facts
from rerank_client import RerankerClient

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "m3": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
}
VOCAB_SIZE = 250_002
PAIRS_PER_REQUEST = 32
REQUESTS = 8


def build_model(path: Path, shape: str, device: str) -> None:
    """An XLMRobertaForSequenceClassification of the chosen shape, one logit, saved with a tokenizer."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_xlmr_cross_encoder

    tokenizer_source = build_xlmr_cross_encoder(path.parent / "tokenizer-source")
    config = XLMRobertaConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=8194,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        id2label={0: "LABEL_0"},
        initializer_range=0.1,  # BERT's 0.02 gives a random model near-equal scores: no order to compare
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = XLMRobertaForSequenceClassification(config).eval()
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_source / name).exists():
            shutil.copy(tokenizer_source / name, path / name)


def workloads() -> dict[str, tuple[str, list[list[str]]]]:
    """Requests of PAIRS_PER_REQUEST documents: all cut to 512 tokens, or of 8-400 words (log-normal)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import CORPUS

    words = " ".join(CORPUS * 40).split()
    rng = random.Random(0)

    def text(count: int) -> str:
        start = rng.randrange(len(words) - count)
        return " ".join(words[start : start + count])

    long_requests = [[text(700) for _ in range(PAIRS_PER_REQUEST)] for _ in range(REQUESTS)]
    mixed = [
        [text(min(400, max(8, int(rng.lognormvariate(4.3, 0.8))))) for _ in range(PAIRS_PER_REQUEST)]
        for _ in range(REQUESTS)
    ]
    query = "what do giant pandas eat and where do they live?"
    return {"512-token pairs": (query, long_requests), "mixed lengths": (query, mixed)}


def top(scores: list[float], n: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:n]


def precision(
    model_dir: Path, device: str, requests: dict[str, tuple[str, list[list[str]]]]
) -> dict[str, Any]:
    """float16 and bfloat16 against float32 on the same padded batches."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = (
        AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    )
    batches = [
        tokenizer([query] * len(docs), docs, padding=True, truncation="only_second", max_length=512,
                  return_tensors="pt").to(device)
        for query, request in requests.values() for docs in request
    ]  # fmt: skip

    def scores() -> list[list[float]]:
        with torch.inference_mode():
            return [model(**batch).logits.view(-1).float().cpu().tolist() for batch in batches]

    full = scores()
    report: dict[str, Any] = {"float32_score_std": round(statistics.pstdev(x for a in full for x in a), 5)}
    for dtype in ("float16", "bfloat16"):
        model.to(getattr(torch, dtype))
        half = scores()
        model.to(torch.float32)
        pairs = list(zip(full, half, strict=True))
        overlaps = [len(set(top(a, 10)) & set(top(b, 10))) for a, b in pairs]
        report[dtype] = {
            "requests": len(pairs),
            "top1_same": sum(top(a, 1) == top(b, 1) for a, b in pairs),
            "top10_overlap_mean": round(statistics.mean(overlaps), 2),
            "top10_overlap_min": min(overlaps),
            "max_abs_diff": round(max(abs(x - y) for a, b in pairs for x, y in zip(a, b, strict=True)), 5),
            "not_finite": sum(not math.isfinite(y) for _, b in pairs for y in b),
        }
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return report


def baseline(
    model_dir: Path,
    device: str,
    dtype: str,
    requests: tuple[str, list[list[str]]],
    warmup: float,
    duration: float,
) -> dict[str, float]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = (
        AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        .to(device)
        .eval()
    )
    query, documents = requests

    def call(n: int) -> int:
        docs = documents[n % len(documents)]
        inputs = tokenizer([query] * len(docs), docs, padding=True, truncation="only_second", max_length=512,
                           return_tensors="pt").to(device)  # fmt: skip
        with torch.inference_mode():
            model(**inputs).logits.view(-1).float().cpu().tolist()
        return len(docs)

    return timed_loop(call, warmup, duration)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (to test the script)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="m3 (default on cuda) or tiny")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each phase")
    args = parser.parse_args(argv)
    shape = args.shape or ("m3" if args.device.startswith("cuda") else "tiny")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("no CUDA device visible: nothing to check (use --device cpu --shape tiny to test the script)")
        return 2
    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    requests = workloads()
    report: dict[str, Any] = {
        "machine": machine_facts(),
        "device": card,
        "shape": shape,
        "torch": torch.__version__,
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        model_dir = Path(scratch) / "m3-shaped"
        log(f"building a {shape}-shaped XLM-R cross-encoder")
        build_model(model_dir, shape, args.device)
        log("precision: float16 and bfloat16 against float32")
        report["precision"] = precision(model_dir, args.device, requests)
        server_dtype = "float16" if args.device.startswith("cuda") else server_cpu_dtype()  # dtype auto
        report["server"], report["baseline"] = {}, {}
        log(f"rerank-server on {args.device} (dtype auto = {server_dtype})")
        devices = "cuda" if args.device.startswith("cuda") else "cpu"
        server_args = ["--model", f"m3={model_dir}", "--devices", devices]
        with ServerProcess(server_args, Path(scratch) / "server.log") as server:
            server.wait_serving()
            with RerankerClient(server.target, retry=None, timeout=300) as client:
                for name, (query, documents) in requests.items():

                    def call(n: int, query: str = query, documents: list[list[str]] = documents) -> int:
                        docs = documents[n % len(documents)]
                        client.rerank(query, docs)
                        return len(docs)

                    report["server"][name] = timed_loop(call, args.warmup, args.duration)
                    log(f"  server, {name}: {report['server'][name]}")
            report["server_clean_shutdown"] = server.shutdown().clean
        for name, workload in requests.items():
            report["baseline"][name] = baseline(
                model_dir, args.device, server_dtype, workload, args.warmup, args.duration
            )
            log(f"  baseline, {name}: {report['baseline'][name]}")
    report["seconds"] = round(time.monotonic() - started, 1)
    lines = [
        f"GPU check on {card} ({shape} shape, torch {torch.__version__}), {report['seconds']} s",
        "",
        "| check | result |",
        "|---|---|",
    ]
    for dtype in ("float16", "bfloat16"):
        figures = report["precision"][dtype]
        lines.append(
            f"| {dtype} vs float32 | top-1 same on {figures['top1_same']}/{figures['requests']} requests, "
            f"top-10 overlap {figures['top10_overlap_mean']} (least {figures['top10_overlap_min']}), "
            f"largest difference {figures['max_abs_diff']} (float32 scores' spread "
            f"{report['precision']['float32_score_std']}), not finite {figures['not_finite']} |"
        )
    for name in requests:
        server_rate, base_rate = (
            report["server"][name]["pairs_per_s"],
            report["baseline"][name]["pairs_per_s"],
        )
        lines.append(
            f"| {name}, pairs/s ({server_dtype}) | server {server_rate}, baseline {base_rate}, "
            f"ratio {round(server_rate / base_rate, 2)} |"
        )
    lines.append(f"| server shut down cleanly | {report['server_clean_shutdown']} |")
    table = "\n".join(lines)
    print(table)
    report["table_markdown"] = table
    out_dir = (
        Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["server_clean_shutdown"] else 1


if __name__ == "__main__":
    sys.exit(main())
