"""What the model-family options cost: the layerwise cutoff, and chunking long documents.

Two measurements, each through the real server and against a raw in-process baseline in the same run:
- layerwise: time per pair of a MiniCPM-layerwise-shaped model (randomly initialized, built offline
  with the tests' builder) at a low and at the last cutoff layer; their ratio is the saving a
  request's `cutoff_layer` buys. The baseline calls the model implementation directly on the same rows.
- chunking: documents longer than max_length, scored with TRUNCATION_END and TRUNCATION_CHUNK on
  the MiniLM-L6-shaped cross-encoder of rerank_bench; the baseline is transformers' own
  truncating tokenizer and model, one request at a time.

Usage: .venv/bin/python bench/families_bench.py [--duration 10] [--warmup 2]
Runs offline on 127.0.0.1; every loop is bounded in count and time; servers are stopped (or killed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rerank_bench import log
from rerank_bench.harness import ServerProcess
from rerank_bench.loadgen import MAX_REQUESTS
from rerank_bench.machine import machine_facts
from rerank_bench.model import build_model_in_subprocess
from rerank_bench.workloads import Shape, TokenCounter, make_workload
from rerank_client import RerankerClient

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "families.json"
# The server runs in float32, as the baselines here do: these figures compare options, not dtypes.
FLOAT32 = ("--dtype", "float32")
LAYERWISE_SHAPE = {"hidden": 256, "layers": 16, "start_layer": 4}  # 16 heads of 16; MiniCPM's ratios
DOCUMENTS_PER_REQUEST = 16
MIN_REQUESTS = 3


def timed_loop(call: Callable[[int], int], warmup: float, duration: float) -> dict[str, float]:
    """call(n) -> pairs, first unmeasured for `warmup` seconds (at least once), then measured for at
    least `duration` seconds and MIN_REQUESTS calls; pairs/s and ms per pair of the measured part."""
    begin = time.perf_counter()
    n = 0
    while n == 0 or time.perf_counter() - begin < warmup:
        call(n)
        n += 1
    started = time.perf_counter()
    pairs = requests = 0
    while requests < MIN_REQUESTS or time.perf_counter() - started < duration:
        if requests >= MAX_REQUESTS:
            break
        pairs += call(n + requests)
        requests += 1
    elapsed = time.perf_counter() - started
    return {
        "requests": requests,
        "pairs": pairs,
        "pairs_per_s": round(pairs / elapsed, 2),
        "ms_per_pair": round(1000 * elapsed / pairs, 3),
    }


def layerwise_documents() -> tuple[str, list[list[str]]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import CORPUS

    blocks = [
        [" ".join(CORPUS[(i + j) % len(CORPUS)] for j in range(6)) for i in range(start, start + 16)]
        for start in range(0, 32, 4)
    ]
    return "what do giant pandas eat?", blocks


def bench_layerwise(scratch: Path, warmup: float, duration: float) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_layerwise import build_minicpm_layerwise

    model_dir = build_minicpm_layerwise(
        scratch / "layerwise", kv_heads=LAYERWISE_SHAPE["hidden"] // 16, **LAYERWISE_SHAPE
    )
    low, high = LAYERWISE_SHAPE["start_layer"] * 2, LAYERWISE_SHAPE["layers"]
    query, blocks = layerwise_documents()
    results: dict[str, Any] = {"shape": LAYERWISE_SHAPE, "cutoffs": [low, high]}

    log("layerwise: rerank-server")
    args = ["--model", f"layerwise={model_dir}", "--devices", "cpu", "--threads-per-replica", "2", *FLOAT32]
    with ServerProcess(args, scratch / "layerwise.log") as server:
        server.wait_serving()
        with RerankerClient(server.target, retry=None, timeout=120) as client:
            served = {}
            for cutoff in (low, high):

                def call(n: int, cutoff: int = cutoff) -> int:
                    documents = blocks[n % len(blocks)]
                    client.rerank(query, documents, model="layerwise", cutoff_layer=cutoff)
                    return len(documents)

                served[cutoff] = timed_loop(call, warmup, duration)
        results["server"] = served
        results["server_clean_shutdown"] = server.shutdown().clean
    # The baseline runs after the server is gone, so neither competes for the cores.
    log("layerwise: in-process baseline")
    results["baseline"] = layerwise_baseline(model_dir, query, blocks, (low, high), warmup, duration)
    for side in ("baseline", "server"):
        figures = results[side]
        results[f"{side}_ratio_low_to_last"] = round(
            figures[low]["ms_per_pair"] / figures[high]["ms_per_pair"], 3
        )
    results["layers_ratio"] = round(low / high, 3)
    return results


def layerwise_baseline(
    model_dir: Path,
    query: str,
    blocks: list[list[str]],
    cutoffs: tuple[int, int],
    warmup: float,
    duration: float,
) -> dict[int, dict[str, float]]:
    """The project's model implementation called directly on the rows the server would build."""
    import torch
    from rerank_server.families import describe_model, load_row_builder
    from rerank_server.families.base import RowOptions, pack_rows
    from rerank_server.families.minicpm_layerwise_model import LayerwiseMiniCPM

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    spec = describe_model(str(model_dir))
    builder = load_row_builder(spec)
    model = LayerwiseMiniCPM.load(str(model_dir), device="cpu", dtype=torch.float32)
    figures = {}
    for cutoff in cutoffs:
        options = RowOptions(max_length=spec.default_max_length, cutoff_layer=cutoff)
        batches = [pack_rows(builder.rows(query, block, options, 0), spec) for block in blocks]

        def call(n: int, batches: list = batches) -> int:
            batch = batches[n % len(batches)]
            with torch.inference_mode():
                model.score(
                    torch.from_numpy(batch.padded("input_ids", spec.pad_token_id)),
                    torch.from_numpy(batch.lengths).long(),
                    torch.from_numpy(batch.values["cutoff_layer"]).long(),
                )
            return batch.rows

        figures[cutoff] = timed_loop(call, warmup, duration)
    return figures


def bench_chunking(scratch: Path, warmup: float, duration: float, doc_tokens: int) -> dict[str, Any]:
    model_dir = scratch / "cross-encoder"
    build_model_in_subprocess(model_dir, 0)
    counter = TokenCounter(model_dir / "tokenizer.json")
    workload = make_workload("long", counter, 0, shape=Shape(DOCUMENTS_PER_REQUEST, doc_tokens))
    results: dict[str, Any] = {"workload": workload.facts(), "max_length": 512}

    log("chunking: rerank-server")
    args = ["--model", f"ce={model_dir}", "--devices", "cpu", "--threads-per-replica", "2", *FLOAT32]
    with ServerProcess(args, scratch / "chunking.log") as server:
        server.wait_serving()
        with RerankerClient(server.target, retry=None, timeout=300) as client:
            for truncation in ("end", "chunk"):
                windows = [0, 0]

                def call(n: int, truncation: str = truncation, windows: list[int] = windows) -> int:
                    query, documents = workload.request(n)
                    usage = client.rerank(query, documents, truncation=truncation).usage
                    windows[0] += usage.windows
                    windows[1] += usage.documents
                    return len(documents)

                figures = timed_loop(call, warmup, duration)
                figures["windows_per_document"] = round(windows[0] / max(1, windows[1]), 2)
                results[f"server_{truncation}"] = figures
        results["server_clean_shutdown"] = server.shutdown().clean
    log("chunking: in-process baseline (transformers, truncating)")
    results["baseline_end"] = chunk_baseline(model_dir, workload, warmup, duration)
    results["chunk_to_end_time_ratio"] = round(
        results["server_chunk"]["ms_per_pair"] / results["server_end"]["ms_per_pair"], 2
    )
    return results


def chunk_baseline(model_dir: Path, workload: Any, warmup: float, duration: float) -> dict[str, float]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()

    def call(n: int) -> int:
        query, documents = workload.request(n)
        inputs = tokenizer(
            [query] * len(documents),
            documents,
            padding=True,
            truncation="only_second",
            max_length=512,
            return_tensors="pt",
        )
        with torch.inference_mode():
            model(**inputs).logits.view(-1).tolist()
        return len(documents)

    return timed_loop(call, warmup, duration)


def markdown(layerwise: dict[str, Any], chunking: dict[str, Any]) -> str:
    low, high = layerwise["cutoffs"]
    lines = [
        "| measurement | baseline (in-process) | server |",
        "|---|---:|---:|",
        f"| layerwise, ms per pair at cutoff {low} | {layerwise['baseline'][low]['ms_per_pair']} "
        f"| {layerwise['server'][low]['ms_per_pair']} |",
        f"| layerwise, ms per pair at cutoff {high} (last) | {layerwise['baseline'][high]['ms_per_pair']} "
        f"| {layerwise['server'][high]['ms_per_pair']} |",
        f"| layerwise, time ratio cutoff {low} / {high} (layers: {layerwise['layers_ratio']}) "
        f"| {layerwise['baseline_ratio_low_to_last']} | {layerwise['server_ratio_low_to_last']} |",
        f"| long documents, ms per document, truncated (END) | {chunking['baseline_end']['ms_per_pair']} "
        f"| {chunking['server_end']['ms_per_pair']} |",
        f"| long documents, ms per document, chunked (CHUNK, "
        f"{chunking['server_chunk']['windows_per_document']} windows each) | - "
        f"| {chunking['server_chunk']['ms_per_pair']} |",
        f"| chunked / truncated time | - | {chunking['chunk_to_end_time_ratio']} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase")
    parser.add_argument(
        "--doc-tokens", type=int, default=1500, help="about this many tokens per long document"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory(prefix="families-bench-") as scratch:
        layerwise = bench_layerwise(Path(scratch), args.warmup, args.duration)
        chunking = bench_chunking(Path(scratch), args.warmup, args.duration, args.doc_tokens)
    table = markdown(layerwise, chunking)
    print(table)
    ok = layerwise["server_clean_shutdown"] and chunking["server_clean_shutdown"]
    report = {
        "machine": machine_facts(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "layerwise": {
            k: ({str(c): f for c, f in v.items()} if k in ("baseline", "server") else v)
            for k, v in layerwise.items()
        },
        "chunking": chunking,
        "ok": ok,
        "table_markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
