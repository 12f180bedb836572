"""Soak: the real server under mixed load while its workers are killed and stopped, sampled over time.

    .venv/bin/python bench/soak.py --minutes 30 [--out bench/results/soak.json] [--report docs/reliability.md]

Starts `rerank-server` with its defaults (the embedded all-MiniLM-L6-v2, every limit at its default)
and two CPU replicas, so that a fault leaves one serving. For the whole run:

- interactive load: `--clients` threads send Rerank calls of mixed sizes (20 and 60 passages of
  mixed lengths), each after a short pause; one more thread sends tiny calls (3 short passages);
- one long StreamRerank after another, of passages of mixed lengths;
- a hostile input about every second (NUL, zero-width text, special tokens, sizes at and past the
  limits, unknown enum numbers, malformed streams), each with the status it must get;
- a fault every `--fault-every-s` (give or take half): SIGKILL or SIGSTOP of a random worker;
- every `--sample-every-s`: the front-end's and the workers' RSS, the front-end's open file
  descriptors and threads, the server's /dev/shm segments, the replicas ready.

Every answer is checked: a Rerank against the same request's answer before any fault (within
SCORE_TOLERANCE, as the batch a pair lands in changes bfloat16's rounding), a stream against itself
(every document scored once, the top_n the best of the scores streamed), a hostile input against its
expected status. A request is lost when it got no answer or a wrong one; a clear status after the
client's retries counts as failed, by code. After the load, one maximal Rerank (documents of
max_document_chars, as many as the message-size limit takes) measures the front-end's RSS before,
after and at its peak; then SIGTERM, and what the server left behind.

Writes JSON (`--out`) and the report (`--report`); `--report-only` renders the report from the JSON.
Exit code 1 when a request was lost, a resource grew past its bound, or the shutdown was not clean.
`tests/integration/test_soak.py` runs the same code for about 20 s.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import random
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from rerank.v1 import reranker_pb2 as pb
from rerank.v1 import reranker_pb2_grpc as pb_grpc
from rerank_bench.harness import ServerProcess
from rerank_bench.machine import (
    alive,
    machine_facts,
    proc_memory_mib,
    proc_open_fds,
    proc_threads,
    reset_peak_rss,
)
from rerank_bench.workloads import SHAPES, WORDS, Shape, TokenCounter, default_tokenizer_path, make_workload
from rerank_bench.workloads import stream_documents as mixed_passages
from rerank_client import RankedDocument, RerankerClient, RerankError, RetryPolicy
from rerank_server.settings import ServerSettings
from rerank_server.transport.shm import SHM_DIR, leftover_segments

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
# Two replicas: a fault leaves one serving. Everything else is the server's default.
FAULT_ARGS = ("--cpu-replicas", "2")
RETRY = RetryPolicy(max_attempts=20, initial_backoff=0.1, max_backoff=2.0)
# Rerank shapes of the interactive threads (drawn in turn), and the tiny thread's.
INTERACTIVE_SHAPES = {"mixed-20": SHAPES["mixed"], "mixed-60": Shape(60, 100, mixed=True)}
TINY_SHAPE = SHAPES["tiny"]
DISTINCT_REQUESTS = 4  # per shape: each answer is compared with the same request's before any fault
SCORE_TOLERANCE = 0.02  # normalized score; bfloat16's batch-dependent rounding stays within ~0.002
STREAM_TOP_N = 10
STREAM_PAUSE_S = 1.0  # after a failed stream, before the next
# A raw hostile call refused with UNAVAILABLE is tried again up to this often, this far apart.
HOSTILE_ATTEMPTS = 30
HOSTILE_RETRY_S = 1.0
QUERY = "what do the reports say about the harbour, the railway and the river in winter?"
# After the warm-up, how far each resource may grow before the run is judged leaking.
GROWTH_BOUNDS = {
    "frontend_rss_mib": 100.0,
    "frontend_fds": 16,
    "frontend_threads": 8,
    "shm_segments": 0,
}


@dataclass(frozen=True)
class SoakPlan:
    seconds: float
    clients: int = 3
    think_s: float = 0.5  # an interactive thread pauses up to this long between calls
    fault_every_s: float = 15.0
    sample_every_s: float = 5.0
    warmup_s: float = 30.0  # growth is measured from the first sample at or after this
    stream_documents: int = 20_000
    hostile_every_s: float = 1.0
    stop_grace_s: float = 90.0  # a SIGSTOPped worker still there after this is resumed, and reported
    call_timeout_s: float = 300.0  # a Rerank with no answer by then is lost
    settle_s: float = 5.0  # after the maximal request, before the front-end's RSS is read again
    maximal_request: bool = True
    server_args: tuple[str, ...] = ()
    seed: int = 0


class Tally:
    """Requests of each kind: sent, answered right, failed with a status (by code), lost (no answer or a
    wrong one), the first few reasons of either, and the latencies of the right answers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.kinds: dict[str, dict[str, Any]] = {}

    def count(self, kind: str, outcome: str, seconds: float, reason: str = "") -> None:
        """`outcome`: "ok", "lost", or the status code's name of a failure."""
        with self._lock:
            tally = self.kinds.setdefault(
                kind,
                {
                    "sent": 0,
                    "ok": 0,
                    "failed": Counter(),
                    "lost": 0,
                    "ms": [],
                    "lost_reasons": [],
                    "failures": [],
                },
            )
            tally["sent"] += 1
            if outcome == "ok":
                tally["ok"] += 1
                tally["ms"].append(seconds * 1000)
            elif outcome == "lost":
                tally["lost"] += 1
                _keep(tally["lost_reasons"], reason)
            else:
                tally["failed"][outcome] += 1
                _keep(tally["failures"], reason)

    def totals(self) -> dict[str, int]:
        with self._lock:
            kinds = list(self.kinds.values())
        return {
            "sent": sum(k["sent"] for k in kinds),
            "ok": sum(k["ok"] for k in kinds),
            "failed": sum(sum(k["failed"].values()) for k in kinds),
            "lost": sum(k["lost"] for k in kinds),
        }

    def summary(self, seconds: float) -> dict[str, dict[str, Any]]:
        with self._lock:
            kinds = {name: dict(k) for name, k in self.kinds.items()}
        out = {}
        for name, k in sorted(kinds.items()):
            ms = sorted(k.pop("ms"))
            out[name] = {
                **k,
                "failed": dict(k["failed"]),
                "per_s": round(k["ok"] / seconds, 2) if seconds else 0.0,
                "p50_ms": round(_percentile(ms, 0.5), 1),
                "p99_ms": round(_percentile(ms, 0.99), 1),
            }
        return out


def _keep(reasons: list[str], reason: str, most: int = 5) -> None:
    if len(reasons) < most and reason not in reasons:
        reasons.append(reason)


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def timed_call(tally: Tally, kind: str, call: Callable[[], str | None]) -> str:
    """Run one request and count it; `call` returns None when the answer is right, else why it is
    wrong. Returns how it went: "ok", "lost", or the failure's status code."""
    began = time.monotonic()
    reason = ""
    try:
        wrong = call()
    except RerankError as error:
        deadline = error.code == grpc.StatusCode.DEADLINE_EXCEEDED  # no answer within the call's time
        outcome, reason = ("lost", f"no answer: {error}") if deadline else (error.code.name, str(error))
    except Exception as error:  # a broken answer or a client failure: the request is lost
        outcome, reason = "lost", f"{type(error).__name__}: {error}"
    else:
        outcome, reason = ("ok", "") if wrong is None else ("lost", wrong)
    tally.count(kind, outcome, time.monotonic() - began, reason)
    return outcome


# The load.


@dataclass(frozen=True)
class Known:
    """A Rerank request and its answer before any fault, by document index."""

    query: str
    documents: list[str]
    scores: dict[int, float]


def known_requests(client: RerankerClient, counter: TokenCounter, shape: Shape, seed: int) -> list[Known]:
    workload = make_workload("soak", counter, seed, shape=shape, blocks=DISTINCT_REQUESTS)
    known = []
    for n in range(DISTINCT_REQUESTS):
        query, documents = workload.request(n)
        result = client.rerank(query, documents)
        known.append(Known(query, documents, {r.index: r.score for r in result.results}))
    return known


def check_rerank(client: RerankerClient, known: Known, timeout: float) -> str | None:
    results = client.rerank(known.query, known.documents, timeout=timeout).results
    if sorted(r.index for r in results) != sorted(known.scores):
        return "the answer's documents are not the request's"
    worst = max(abs(r.score - known.scores[r.index]) for r in results)
    if worst > SCORE_TOLERANCE:
        return f"a score {worst:.4f} away from the same request's before any fault"
    if any(a.score < b.score for a, b in itertools.pairwise(results)):
        return "results not sorted by score"
    return None


def rerank_loop(
    client: RerankerClient,
    requests: list[Known],
    tally: Tally,
    kind: str,
    stop: threading.Event,
    plan: SoakPlan,
    seed: int,
) -> None:
    """Rerank calls of the known requests, drawn at random, each after a pause of up to think_s."""
    rng = random.Random(seed)
    while not stop.is_set():
        known = rng.choice(requests)
        timed_call(tally, kind, functools.partial(check_rerank, client, known, plan.call_timeout_s))
        stop.wait(rng.uniform(0, plan.think_s))


def stream_loop(
    client: RerankerClient, counter: TokenCounter, tally: Tally, stop: threading.Event, plan: SoakPlan
) -> None:
    """One long StreamRerank after another, until the run ends."""
    for n in itertools.count():
        if stop.is_set():
            return
        outcome = timed_call(tally, "stream", functools.partial(one_stream, client, counter, n, stop, plan))
        if outcome != "ok":
            stop.wait(STREAM_PAUSE_S)


def one_stream(
    client: RerankerClient, counter: TokenCounter, n: int, stop: threading.Event, plan: SoakPlan
) -> str | None:
    """A StreamRerank of `stream_documents` passages (fewer, whole, when the run ends first)."""
    passages = _Counted(mixed_passages(counter, plan.stream_documents, seed=plan.seed + n), stop)
    scored: dict[int, float] = {}
    duplicates: list[int] = []

    def on_scored(batch: list[RankedDocument]) -> None:
        for ranked in batch:
            if ranked.index in scored:
                duplicates.append(ranked.index)
            scored[ranked.index] = ranked.score

    final = client.stream_rerank(
        QUERY, passages, top_n=STREAM_TOP_N, on_scored=on_scored, timeout=plan.seconds + 600
    )
    return check_stream(final.results, final.usage.documents, passages.sent, scored, duplicates)


class _Counted:
    """The passages of one stream, ended early when the run ends; counts what was taken."""

    def __init__(self, passages: Iterable[str], stop: threading.Event) -> None:
        self._passages = iter(passages)
        self._stop = stop
        self.sent = 0

    def __iter__(self) -> Iterator[str]:
        for passage in self._passages:
            if self._stop.is_set() and self.sent:
                return
            self.sent += 1
            yield passage


def check_stream(
    top: list[RankedDocument], documents: int, sent: int, scored: dict[int, float], duplicates: list[int]
) -> str | None:
    if duplicates:
        return f"documents scored twice: {duplicates[:5]}"
    if documents != sent or len(scored) != sent or (scored and max(scored) != sent - 1):
        return f"{sent} documents sent, {documents} counted, {len(scored)} scored"
    if len(top) != min(STREAM_TOP_N, sent):
        return f"{len(top)} results for top_n {STREAM_TOP_N}"
    if any(scored.get(r.index) != r.score for r in top):
        return "a top_n score differs from the one streamed"
    kept = {r.index for r in top}
    lowest = min((r.score for r in top), default=0.0)
    if any(score > lowest for index, score in scored.items() if index not in kept):
        return "a document outside the top_n scored higher than one in it"
    return None


# Hostile inputs.


@dataclass(frozen=True)
class Hostile:
    name: str
    send: Callable[[RerankerClient, pb_grpc.RerankerStub], object]  # raises RerankError or grpc.RpcError
    expect: str  # the status code's name it must get (OK: a ranking of every document)


def hostile_inputs(settings: ServerSettings) -> list[Hostile]:
    """Inputs no client should send, each with the status the server must answer."""
    doc_limit, query_limit = settings.max_document_chars, settings.max_query_chars

    def rerank(query: str, documents: list[str], **options: Any) -> Callable[..., object]:
        def send(client: RerankerClient, stub: pb_grpc.RerankerStub) -> None:
            result = client.rerank(query, documents, **options)
            if len(result.results) != len(documents):
                raise AssertionError(f"{len(result.results)} results for {len(documents)} documents")

        return send

    def raw(request: pb.RerankRequest) -> Callable[..., object]:
        return lambda client, stub: stub.Rerank(request, timeout=60)

    def stream(messages: list[pb.StreamRerankRequest]) -> Callable[..., object]:
        return lambda client, stub: list(stub.StreamRerank(iter(messages), timeout=60))

    header = pb.StreamRerankRequest(header=pb.RerankRequest(query="q", documents=["a"], top_n=1))
    chunk = pb.StreamRerankRequest(documents=pb.DocumentChunk(documents=["b"]))
    invalid, ok = "INVALID_ARGUMENT", "OK"
    unknown_truncation = pb.Truncation.ValueType(99)  # a number the enum does not name
    cases = [
        ("NUL and control characters", rerank("\x00what\x01 \x1b[31m", ["\x00", "a\x07b\x7f", "\x9f"]), ok),
        ("only zero-width characters", rerank("\u200b\u200d\ufeff", ["\u2060", "\u200c"]), ok),
        ("text that spells special tokens", rerank("[SEP] </s> <|im_end|>", ["[CLS][PAD]", "<s>"]), ok),
        ("a query of only whitespace", rerank(" \t\n\u3000", ["a"]), invalid),
        ("a document of max_document_chars", rerank("q", [("word " * doc_limit)[:doc_limit]]), ok),
        ("a document one character longer", rerank("q", ["x" * (doc_limit + 1)]), invalid),
        ("a query one past max_query_chars", rerank("q" * (query_limit + 1), ["a"]), invalid),
        ("max_documents + 1 documents", rerank("q", ["d"] * (settings.max_documents + 1)), invalid),
        ("no documents", rerank("q", []), invalid),
        ("top_n 2**32 - 1", rerank("q", ["a", "b"], top_n=2**32 - 1), ok),
        ("max_length 2**32 - 1", rerank("q", ["a"], max_length=2**32 - 1), invalid),
        ("cutoff_layer for a model without layers", rerank("q", ["a"], cutoff_layer=7), invalid),
        ("a model the server does not serve", rerank("q", ["a"], model="no/such-model\x00"), "NOT_FOUND"),
        (
            "an unknown truncation number",
            raw(pb.RerankRequest(query="q", documents=["a"], truncation=unknown_truncation)),
            invalid,
        ),
        ("a stream without a header", stream([chunk]), invalid),
        ("a stream with two headers", stream([header, header, chunk]), invalid),
    ]
    return [Hostile(name, send, expect) for name, send, expect in cases]


def send_hostile(case: Hostile, client: RerankerClient, stub: pb_grpc.RerankerStub) -> str:
    """The status `case` got. A raw call refused with UNAVAILABLE (no replica ready, while a fault
    recovers) is retried as the typed client would, before its input is judged."""
    for _ in range(HOSTILE_ATTEMPTS):
        try:
            case.send(client, stub)
            return "OK"
        except RerankError as error:
            got = error.code.name
        except grpc.RpcError as error:
            got = error.code().name
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        if got != "UNAVAILABLE" or case.expect == "UNAVAILABLE":
            return got
        time.sleep(HOSTILE_RETRY_S)
    return got


def hostile_loop(
    client: RerankerClient,
    stub: pb_grpc.RerankerStub,
    cases: list[Hostile],
    tally: Tally,
    outcomes: dict[str, Counter[str]],
    stop: threading.Event,
    plan: SoakPlan,
) -> None:
    """The cases in turn, one about every `hostile_every_s`; a status other than the expected one is a
    wrong answer."""
    n = 0
    while not stop.wait(plan.hostile_every_s):
        case = cases[n % len(cases)]
        n += 1
        began = time.monotonic()
        got = send_hostile(case, client, stub)
        outcomes.setdefault(case.name, Counter())[got] += 1
        seconds = time.monotonic() - began
        if got == case.expect:
            tally.count("hostile", "ok", seconds)
        else:
            tally.count("hostile", "lost", seconds, f"{case.name}: got {got}, expected {case.expect}")


# Faults.


@dataclass
class Fault:
    at_s: float
    signal: str
    pid: int
    gone_after_s: float | None = None  # the worker ended: killed by us, or found hung by the server
    ready_after_s: float | None = None  # every replica ready again
    resumed: bool = False  # a SIGSTOP the server did not notice within stop_grace_s: resumed by SIGCONT


class FaultInjector:
    """Every `fault_every_s` (give or take half), SIGKILL a random worker or SIGSTOP a random serving
    one, and follow each fault until its worker is gone and every replica is ready again."""

    def __init__(self, server: ServerProcess, client: RerankerClient, replicas: int, plan: SoakPlan) -> None:
        self._server = server
        self._client = client
        self._replicas = replicas
        self._plan = plan
        self._rng = random.Random(plan.seed)
        self.faults: list[Fault] = []
        self.injecting = threading.Event()
        self.stop = threading.Event()
        self._began = time.monotonic()

    def run(self) -> None:
        next_at = self._began + self._interval()
        pending: list[Fault] = []
        while not self.stop.is_set() and (self.injecting.is_set() or pending):
            now = time.monotonic() - self._began
            ready = _ready(self._client) if pending else self._replicas
            for fault in list(pending):
                if fault.gone_after_s is None and not alive(fault.pid):
                    fault.gone_after_s = round(now - fault.at_s, 2)
                if fault.gone_after_s is not None and ready >= self._replicas:
                    fault.ready_after_s = round(now - fault.at_s, 2)
                    pending.remove(fault)
                elif fault.signal == "SIGSTOP" and now - fault.at_s > self._plan.stop_grace_s:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(fault.pid, signal.SIGCONT)
                    fault.resumed = True
                    pending.remove(fault)
            if self.injecting.is_set() and time.monotonic() >= next_at:
                injected = self._inject(now, {f.pid for f in pending})
                if injected is not None:
                    self.faults.append(injected)
                    pending.append(injected)
                next_at = time.monotonic() + self._interval()
            self.stop.wait(0.1)
        for fault in pending:  # the run is over: nothing may stay stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(fault.pid, signal.SIGCONT)

    def _interval(self) -> float:
        return self._plan.fault_every_s * self._rng.uniform(0.5, 1.5)

    def _inject(self, now: float, faulted: set[int]) -> Fault | None:
        sig = self._rng.choice([signal.SIGKILL, signal.SIGSTOP])
        workers = serving_worker_pids(self._server) if sig == signal.SIGSTOP else self._server.worker_pids()
        running = [pid for pid in workers if pid not in faulted]
        if not running:
            return None
        pid = self._rng.choice(running)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return None
        return Fault(round(now, 2), sig.name, pid)


def serving_worker_pids(server: ServerProcess) -> list[int]:
    """Workers that said they are ready (the pool logs "ready (pid N)"). Only these are SIGSTOPped: the
    server notices a stopped worker by a batch it holds too long, and one still loading holds none."""
    log = server.log()
    return [pid for pid in server.worker_pids() if f"ready (pid {pid})" in log]


def fault_summary(faults: list[Fault]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("SIGKILL", "SIGSTOP"):
        these = [f for f in faults if f.signal == name]
        ready = sorted(f.ready_after_s for f in these if f.ready_after_s is not None)
        out[name] = {
            "injected": len(these),
            "recovered": len(ready),
            "resumed_undetected": sum(f.resumed for f in these),
            "ready_after_s_p50": round(statistics.median(ready), 2) if ready else None,
            "ready_after_s_max": ready[-1] if ready else None,
        }
    return out


# Resources over time.


def shm_usage(pid: int) -> tuple[int, float]:
    """The server's /dev/shm segments: how many, and their size in MiB."""
    names = leftover_segments(pid)
    size = 0
    for name in names:
        with contextlib.suppress(OSError):
            size += os.stat(os.path.join(SHM_DIR, name)).st_size
    return len(names), round(size / MIB, 2)


def sample(server: ServerProcess, began: float, tally: Tally, ready: int) -> dict[str, Any]:
    pid = server.process.pid
    memory = proc_memory_mib(pid)
    workers = server.worker_pids()
    segments, shm_mib = shm_usage(pid)
    return {
        "t_s": round(time.monotonic() - began, 1),
        "frontend_rss_mib": round(memory.get("VmRSS", 0.0), 1),
        "frontend_fds": proc_open_fds(pid) or 0,
        "frontend_threads": proc_threads(pid) or 0,
        "workers": len(workers),
        "workers_rss_mib": round(sum(proc_memory_mib(w).get("VmRSS", 0.0) for w in workers), 1),
        "shm_segments": segments,
        "shm_mib": shm_mib,
        "ready_replicas": ready,
        **tally.totals(),
    }


def growth(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, dict[str, float]]:
    """Per resource: its value at the first sample after the warm-up, its most since, and the growth."""
    after = [s for s in samples if s["t_s"] >= warmup_s] or samples[-1:]
    if not after:
        return {}
    out = {}
    for key, bound in GROWTH_BOUNDS.items():
        base, most = after[0][key], max(s[key] for s in after)
        out[key] = {"after_warmup": base, "most": most, "growth": round(most - base, 1), "bound": bound}
    return out


def within_bounds(grown: dict[str, dict[str, float]]) -> bool:
    return all(g["growth"] <= g["bound"] for g in grown.values())


# The maximal request.


def maximal_request(
    server: ServerProcess, client: RerankerClient, settings: ServerSettings, plan: SoakPlan
) -> dict[str, Any]:
    """A Rerank as large as the message-size limit allows, of documents at max_document_chars, with the
    front-end's RSS before it, at its peak (the kernel's high-water mark, reset just before) and after."""
    chars = settings.max_document_chars
    rng = random.Random(plan.seed)
    words: list[str] = []
    length = 0
    while length < chars + 1000:
        words.append(rng.choice(WORDS))
        length += len(words[-1]) + 1
    text = " ".join(words)
    base = pb.RerankRequest(query=QUERY, top_n=STREAM_TOP_N).ByteSize()
    per_document = pb.RerankRequest(documents=[text[:chars]]).ByteSize()
    limit = settings.max_message_mb * MIB
    count = min(settings.max_documents, (limit - base) // per_document)
    documents = [text[n % 997 : n % 997 + chars] for n in range(count)]  # distinct, each `chars` long
    pid = server.process.pid
    time.sleep(1.0)
    before = proc_memory_mib(pid).get("VmRSS", 0.0)
    peak_reset = reset_peak_rss(pid)
    began = time.monotonic()
    out: dict[str, Any] = {
        "documents": count,
        "document_chars": chars,
        "message_mib": round((base + count * per_document) / MIB, 2),
        "limit_mib": settings.max_message_mb,
        "peak_reset": peak_reset,
        "settle_s": plan.settle_s,
    }
    try:
        result = client.rerank(QUERY, documents, top_n=STREAM_TOP_N, timeout=plan.call_timeout_s)
        out.update(status="OK", truncated=result.usage.truncated, tokens=result.usage.tokens)
    except RerankError as error:
        out.update(status=error.code.name, message=error.message)
    out["seconds"] = round(time.monotonic() - began, 2)
    memory = proc_memory_mib(pid)
    del documents, text
    time.sleep(plan.settle_s)
    out.update(
        rss_before_mib=round(before, 1),
        rss_peak_mib=round(memory.get("VmHWM", 0.0), 1),
        rss_after_mib=round(memory.get("VmRSS", 0.0), 1),
        rss_settled_mib=round(proc_memory_mib(pid).get("VmRSS", 0.0), 1),
    )
    out["peak_over_before_mib"] = round(out["rss_peak_mib"] - before, 1)
    return out


# The run.


def run_soak(
    plan: SoakPlan, log_path: Path, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Start the server, run the plan, stop the server; everything measured, as one JSON-able dict."""
    server_args = [*FAULT_ARGS, *plan.server_args]
    settings = ServerSettings.from_args(server_args)
    counter = TokenCounter(default_tokenizer_path())
    tally = Tally()
    hostile_outcomes: dict[str, Counter[str]] = {}
    samples: list[dict[str, Any]] = []
    with ServerProcess(server_args, log_path) as server:
        server.wait_serving()
        progress(f"server up at {server.target}; log {log_path}")
        channel = grpc.insecure_channel(server.target)
        with RerankerClient(server.target, retry=RETRY, timeout=plan.call_timeout_s) as client:
            replicas = client.list_models()[0].replicas
            interactive = [
                k
                for i, shape in enumerate(INTERACTIVE_SHAPES.values())
                for k in known_requests(client, counter, shape, plan.seed + i)
            ]
            tiny = known_requests(client, counter, TINY_SHAPE, plan.seed + 10)
            progress("expected answers known; load and faults start")
            stop = threading.Event()
            injector = FaultInjector(server, client, replicas, plan)
            injector.injecting.set()
            threads = [
                *(
                    threading.Thread(
                        target=rerank_loop,
                        args=(client, interactive, tally, "interactive", stop, plan, plan.seed + n),
                    )
                    for n in range(plan.clients)
                ),
                threading.Thread(
                    target=rerank_loop, args=(client, tiny, tally, "tiny", stop, plan, plan.seed - 1)
                ),
                threading.Thread(target=stream_loop, args=(client, counter, tally, stop, plan)),
                threading.Thread(
                    target=hostile_loop,
                    args=(
                        client,
                        pb_grpc.RerankerStub(channel),
                        hostile_inputs(settings),
                        tally,
                        hostile_outcomes,
                        stop,
                        plan,
                    ),
                ),
            ]
            faulting = threading.Thread(target=injector.run, daemon=True)
            began = time.monotonic()
            for thread in threads:
                thread.daemon = True
                thread.start()
            faulting.start()
            deadline = began + plan.seconds
            while (left := deadline - time.monotonic()) > 0:
                samples.append(sample(server, began, tally, _ready(client)))
                progress(_progress_line(samples[-1]))
                time.sleep(min(plan.sample_every_s, max(0.0, left)))
            injector.injecting.clear()  # the last faults are followed until their workers are back
            faulting.join(plan.stop_grace_s + 30)
            injector.stop.set()
            stop.set()
            load_seconds = time.monotonic() - began
            for thread in threads:
                thread.join(plan.call_timeout_s + 60)
            drain_seconds = time.monotonic() - began - load_seconds
            hung = sum(thread.is_alive() for thread in threads)
            samples.append(sample(server, began, tally, _ready(client)))
            progress(
                f"load stopped after {load_seconds:.0f} s, drained in {drain_seconds:.0f} s; {hung} hung"
            )
            maximal = maximal_request(server, client, settings, plan) if plan.maximal_request else None
            if maximal is not None:
                progress(f"maximal request: {maximal}")
                samples.append(sample(server, began, tally, _ready(client)))
        channel.close()
        shutdown = server.shutdown()
    grown = growth(samples[:-1] if maximal else samples, plan.warmup_s)
    totals = tally.totals()
    totals["lost"] += hung  # a thread still waiting holds a request with no answer
    return {
        "plan": asdict(plan),
        "server_args": server_args,
        "machine": machine_facts(),
        "load_seconds": round(load_seconds, 1),  # faults for plan.seconds, load until they recovered
        "drain_seconds": round(drain_seconds, 1),  # then the calls under way finishing
        "totals": totals,
        "hung_threads": hung,
        "requests": tally.summary(load_seconds + drain_seconds),
        "faults": [asdict(f) for f in injector.faults],
        "fault_summary": fault_summary(injector.faults),
        "hostile": {
            case.name: {"expect": case.expect, "outcomes": dict(hostile_outcomes.get(case.name, {}))}
            for case in hostile_inputs(settings)
        },
        "samples": samples,
        "growth": grown,
        "within_bounds": within_bounds(grown),
        "maximal_request": maximal,
        "shutdown": {**asdict(shutdown), "clean": shutdown.clean},
    }


def _ready(client: RerankerClient) -> int:
    try:
        return client.list_models(timeout=10)[0].ready_replicas
    except RerankError:
        return 0


def _progress_line(s: dict[str, Any]) -> str:
    return (
        f"{s['t_s']:>7.1f} s  rss {s['frontend_rss_mib']:.0f} MiB  fds {s['frontend_fds']}  "
        f"threads {s['frontend_threads']}  shm {s['shm_segments']}  ready {s['ready_replicas']}  "
        f"ok {s['ok']}  failed {s['failed']}  lost {s['lost']}"
    )


def passed(result: dict[str, Any]) -> bool:
    return result["totals"]["lost"] == 0 and result["within_bounds"] and result["shutdown"]["clean"]


# The report.


def render(result: dict[str, Any]) -> str:
    """docs/reliability.md: the summary the issue asks for, then a table per part of the run."""
    return "\n".join(
        [
            *_summary(result),
            *_requests_section(result),
            *_faults_section(result),
            *_hostile_section(result),
            *_resources_section(result),
            *_maximal_section(result["maximal_request"]),
        ]
    )


def _summary(result: dict[str, Any]) -> list[str]:
    plan, totals, machine = result["plan"], result["totals"], result["machine"]
    kills, stops = result["fault_summary"]["SIGKILL"], result["fault_summary"]["SIGSTOP"]
    hostile_sent = sum(sum(h["outcomes"].values()) for h in result["hostile"].values())
    server = " ".join(["rerank-server", *result["server_args"]])
    lines = [
        "# Reliability",
        "",
        f"Written by `bench/soak.py` on {machine['date']} from {plan['seconds'] / 60:g} minutes of mixed "
        f"load and faults against the real server (`{server}`: the embedded default model, every other "
        f"setting at its default) on {machine['cores']} cores ({machine['cpu_model']}). Rerun it with "
        "`.venv/bin/python bench/soak.py --minutes 30`. The tests that check these properties on every "
        "run: `tests/integration/test_hostile_inputs.py` (property-based hostile input), `test_chaos.py` "
        "(8 clients while workers are killed and stopped), `test_soak.py` (this script for 20 s).",
        "",
        "| | |",
        "|---|---|",
        f"| load held | {result['load_seconds']:.0f} s (faults for the first {plan['seconds']:.0f} s, load "
        f"until they recovered; then {result['drain_seconds']:.0f} s for the calls under way to finish): "
        f"{plan['clients']} interactive clients (Rerank of "
        f"20 and 60 passages), 1 client of tiny requests, one StreamRerank after another "
        f"({plan['stream_documents']:,} passages each), a hostile input every {plan['hostile_every_s']:g} "
        f"s: {totals['sent']:,} requests, {totals['ok']:,} answered right |",
        f"| faults injected | {kills['injected']} SIGKILL and {stops['injected']} SIGSTOP of a random "
        f"worker, about every {plan['fault_every_s']:g} s; every replica ready again after a median "
        f"{_s(kills['ready_after_s_p50'])} (kill) and {_s(stops['ready_after_s_p50'])} (stop); stops "
        f"the server never noticed: {stops['resumed_undetected']} |",
        f"| inputs tried | {len(result['hostile'])} kinds of hostile input, {hostile_sent:,} sent |",
        f"| requests lost | **{totals['lost']}** (no answer, or a wrong one); failed with a clear "
        f"status after the client's retries: {totals['failed']} |",
    ]
    maximal = result["maximal_request"]
    if maximal:
        lines.append(
            f"| memory of a maximal request | {maximal['message_mib']} MiB ({maximal['documents']} "
            f"documents of {maximal['document_chars']:,} characters): the front-end's RSS peaked "
            f"{maximal['peak_over_before_mib']:.0f} MiB over its {maximal['rss_before_mib']:.0f} MiB "
            f"before, {maximal['rss_settled_mib']:.0f} MiB {maximal['settle_s']:g} s after "
            f"({maximal['status']}) |"
        )
    shutdown = result["shutdown"]
    return [
        *lines,
        f"| resources after the warm-up | {_growth_line(result['growth'])}: "
        f"{'within' if result['within_bounds'] else '**past**'} the bounds |",
        f"| shutdown | exit code {shutdown['exit_code']}, workers left running {shutdown['left_running']}, "
        f"shared memory left {shutdown['shm_left']} |",
    ]


def _requests_section(result: dict[str, Any]) -> list[str]:
    requests = result["requests"]
    lines = [
        "",
        "## Requests",
        "",
        "| kind | sent | answered right | per s | p50 ms | p99 ms | failed (status) | lost |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for kind, k in requests.items():
        failed = ", ".join(f"{code} {n}" for code, n in sorted(k["failed"].items())) or "0"
        lines.append(
            f"| {kind} | {k['sent']:,} | {k['ok']:,} | {k['per_s']} | {k['p50_ms']:.0f} "
            f"| {k['p99_ms']:.0f} | {failed} | {k['lost']} |"
        )
    for title, key in (("Lost", "lost_reasons"), ("Failed", "failures")):
        reasons = [f"- {kind}: {reason}" for kind, k in requests.items() for reason in k[key]]
        if reasons:
            lines += ["", f"{title} (the first few distinct reasons of each kind):", "", *reasons]
    return [
        *lines,
        "",
        "A Rerank's answer is compared with the same request's before any fault (the same documents, "
        f"scores within {SCORE_TOLERANCE}); a stream's with itself (every document scored once, the "
        "top_n the best of what was streamed); a hostile input's status with the one it must get. "
        "The client retries UNAVAILABLE and RESOURCE_EXHAUSTED (up to 20 attempts, backoff up to 2 s). "
        "A stream fails with UNAVAILABLE, as documented, when no replica comes back within 60 s (while "
        "none is, a stream's pairs wait and a Rerank is refused for its client to retry) or a replica "
        "lost the same pairs twice; the client does "
        "not retry a stream under way (a second chunk taken from the caller's documents, or a "
        "response received), only one refused at its header, before the server accepted it.",
    ]


def _faults_section(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Faults",
        "",
        "| signal | injected | recovered | all ready again after, median s | max s | stops not noticed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, f in result["fault_summary"].items():
        lines.append(
            f"| {name} | {f['injected']} | {f['recovered']} | {_s(f['ready_after_s_p50'], '')} "
            f"| {_s(f['ready_after_s_max'], '')} | {f['resumed_undetected']} |"
        )
    return [
        *lines,
        "",
        "A SIGKILLed worker is noticed at once (its pipe closes); a SIGSTOPped one only once a batch it "
        "holds runs far past its prediction (`--batch-timeout-factor`, and at least "
        "`--batch-timeout-floor-s`), so its recovery includes that wait. A stop the server did not notice "
        f"within {result['plan']['stop_grace_s']:g} s is resumed with SIGCONT and counted above. The "
        "batches a faulted worker held run again on another replica.",
    ]


def _hostile_section(result: dict[str, Any]) -> list[str]:
    lines = ["", "## Hostile inputs", "", "| input | must get | got |", "|---|---|---|"]
    for name, h in result["hostile"].items():
        got = ", ".join(f"{code} x{n}" for code, n in sorted(h["outcomes"].items())) or "not sent"
        lines.append(f"| {name} | {h['expect']} | {got} |")
    return lines


def _resources_section(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Resources over time",
        "",
        "The front-end's RSS, open file descriptors and threads; the workers' RSS together; the "
        "server's segments in /dev/shm; the replicas ready; the requests so far. The last rows are "
        "after the load, and after the maximal request. The workers' RSS is shown, not bounded: the "
        "faults restart workers, so it rises and falls with them.",
        "",
        "| s | front-end RSS MiB | fds | threads | workers RSS MiB | workers | shm segments | shm MiB "
        "| ready | answered | failed | lost |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in _thin(result["samples"], 30):
        lines.append(
            f"| {s['t_s']:.0f} | {s['frontend_rss_mib']:.0f} | {s['frontend_fds']} "
            f"| {s['frontend_threads']} | {s['workers_rss_mib']:.0f} | {s['workers']} "
            f"| {s['shm_segments']} | {s['shm_mib']} | {s['ready_replicas']} | {s['ok']:,} "
            f"| {s['failed']} | {s['lost']} |"
        )
    lines += [
        "",
        f"Growth after the warm-up ({result['plan']['warmup_s']:g} s; the maximal request's sample "
        "left out), against the bound the run is judged by:",
        "",
        "| resource | after the warm-up | most | growth | bound |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, g in result["growth"].items():
        lines.append(f"| {key} | {g['after_warmup']} | {g['most']} | {g['growth']} | {g['bound']} |")
    return lines


def _maximal_section(maximal: dict[str, Any] | None) -> list[str]:
    if not maximal:
        return []
    reset = "" if maximal["peak_reset"] else " (the reset failed here: the peak is since the start)"
    return [
        "",
        "## The memory of a maximal request",
        "",
        f"One Rerank of {maximal['documents']} documents of {maximal['document_chars']:,} characters of "
        f"prose, {maximal['message_mib']} MiB: as many as the {maximal['limit_mib']} MiB message limit "
        "takes, sent after the load. The peak is the kernel's high-water mark of the front-end's RSS "
        f"(VmHWM), reset just before the call{reset}; settled is the RSS {maximal['settle_s']:g} s after.",
        "",
        "| status | seconds | RSS before MiB | peak MiB | peak - before MiB | after MiB | settled MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {maximal['status']} | {maximal['seconds']} | {maximal['rss_before_mib']} "
        f"| {maximal['rss_peak_mib']} | {maximal['peak_over_before_mib']} | {maximal['rss_after_mib']} "
        f"| {maximal['rss_settled_mib']} |",
        "",
    ]


def _s(value: float | None, unit: str = " s") -> str:
    return "-" if value is None else f"{value:g}{unit}"


def _growth_line(grown: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{key} {g['growth']:+g}" for key, g in grown.items())


def _thin(rows: list[dict[str, Any]], most: int) -> list[dict[str, Any]]:
    """At most `most` rows, evenly spread, always with the last."""
    if len(rows) <= most:
        return rows
    step = len(rows) / most
    picked = [rows[int(i * step)] for i in range(most - 1)]
    return [*picked, rows[-1]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load and faults go on")
    parser.add_argument("--clients", type=int, default=3, help="interactive client threads")
    parser.add_argument("--fault-every-s", type=float, default=15.0, help="mean seconds between faults")
    parser.add_argument("--sample-every-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=30.0, help="growth is measured after this")
    parser.add_argument("--stream-documents", type=int, default=20_000, help="passages per stream")
    parser.add_argument("--no-maximal", action="store_true", help="skip the maximal request")
    parser.add_argument("--server-args", default="", help="more rerank-server flags, as one string")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("--report-only", action="store_true", help="render --report from --out, run nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        result = json.loads(args.out.read_text())
    else:
        plan = SoakPlan(
            seconds=args.minutes * 60,
            clients=args.clients,
            fault_every_s=args.fault_every_s,
            sample_every_s=args.sample_every_s,
            warmup_s=args.warmup_s,
            stream_documents=args.stream_documents,
            maximal_request=not args.no_maximal,
            server_args=tuple(shlex.split(args.server_args)),
        )
        log_path = Path(tempfile.mkdtemp(prefix="rerank-soak-")) / "server.log"
        result = run_soak(plan, log_path, progress=lambda line: print(line, file=sys.stderr, flush=True))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.report.write_text(render(result))
    totals, shutdown = result["totals"], result["shutdown"]
    print(
        f"{args.out}, {args.report}: lost {totals['lost']}, within bounds {result['within_bounds']}, "
        f"clean shutdown {shutdown['clean']}"
    )
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
