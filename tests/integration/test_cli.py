"""The installed `rerank` command against the real server: the same scores as the client, from a file,
standard input or a stream; models and health; a TLS server that takes bearer tokens; no torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from rerank_client import RerankerClient, tls_credentials
from throwaway_pki import Pki

from integration.conftest import StartServer
from integration.server_process import ServerProcess

pytestmark = pytest.mark.integration

RERANK = Path(sys.executable).with_name("rerank")  # the console script installed beside this Python
TOLERANCE = 1e-5
QUERY = "what do giant pandas eat?"
WORDS = ["panda", "bamboo", "bear", "forest", "china", "eats", "sleeps", "mountain", "river", "leaf", "zoo"]
TOKEN = "tok-cli-7c21e9"


def documents(n: int) -> list[str]:
    """n distinct documents of varied length (numbers in words: the tiny vocabulary has no digits)."""
    out = []
    for i in range(n):
        number = " ".join(WORDS[int(digit)] for digit in str(i))
        out.append(" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(2 + i % 9)) + f" number {number}")
    return out


def rerank(
    *argv: str, env: Mapping[str, str] = {}, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`rerank ARGV` in a subprocess, with none of this process's RERANK_* variables."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_") and k != "COLUMNS"}
    return subprocess.run(
        [str(RERANK), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env={**environment, **env},
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def server(start_module_server: StartServer, bert_cross_encoder_dir: Path) -> ServerProcess:
    # float32: the CLI's scores are compared with the client's within 1e-5.
    return start_module_server("--model", f"tiny-bert={bert_cross_encoder_dir}", "--dtype", "float32")


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[RerankerClient]:
    with RerankerClient(server.target, retry=None, timeout=120) as c:
        yield c


def test_table_and_json_give_the_clients_scores_with_indexes_into_the_file(
    server: ServerProcess, client: RerankerClient, tmp_path: Path
) -> None:
    lines = documents(40)
    lines[3:3] = ["", "   "]  # blank lines: skipped, yet counted in the index
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(lines) + "\n")
    sent = [line for line in lines if line.strip()]
    line_of = [i for i, line in enumerate(lines) if line.strip()]
    expected = client.rerank(QUERY, sent)

    as_json = rerank(QUERY, str(path), "--target", server.target, "--top-n", "0", "--json")
    assert as_json.returncode == 0, as_json.stderr
    output = json.loads(as_json.stdout)
    assert output["model"] == "tiny-bert" and output["streamed"] is False
    assert output["usage"]["documents"] == 40 and output["timings"]["total_ms"] > 0
    assert len(output["results"]) == 40
    for got, want in zip(output["results"], expected.results, strict=True):
        assert got["score"] == pytest.approx(want.score, abs=TOLERANCE)
        assert got["index"] == line_of[want.index]
        assert got["document"] == lines[got["index"]]

    table = rerank(QUERY, str(path), "--target", server.target, "-n", "5")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["rank", "score", "index", "document"]
    assert len(rows) == 5
    for rank, (row, want) in enumerate(zip(rows, expected.results, strict=False), start=1):
        cells = row.split(maxsplit=3)
        assert int(cells[0]) == rank
        assert float(cells[1]) == pytest.approx(want.score, abs=5e-5 + TOLERANCE)
        assert int(cells[2]) == line_of[want.index]
        assert cells[3] == lines[line_of[want.index]]  # a pipe: not cut


def test_json_lines_on_standard_input(server: ServerProcess, client: RerankerClient) -> None:
    texts = documents(12)
    stdin = "".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(texts))
    result = rerank(QUERY, "--target", server.target, "--json", "-n", "3", stdin=stdin)
    assert result.returncode == 0, result.stderr
    expected = client.rerank(QUERY, texts, top_n=3)
    got = json.loads(result.stdout)["results"]
    assert [r["index"] for r in got] == [r.index for r in expected.results]
    assert [r["score"] for r in got] == pytest.approx([r.score for r in expected.results], abs=TOLERANCE)


def test_a_large_input_is_streamed_and_gives_a_plain_reranks_top_n(
    server: ServerProcess, client: RerankerClient
) -> None:
    texts = documents(3000)
    unary = client.rerank(QUERY, texts)
    unary_score = {r.index: r.score for r in unary.results}
    result = rerank(QUERY, "--target", server.target, "--json", stdin="".join(t + "\n" for t in texts))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress line: standard error is not a terminal
    output = json.loads(result.stdout)
    assert output["streamed"] is True and output["usage"]["documents"] == 3000
    got = output["results"]
    assert len(got) == 10  # the default top_n
    # Batches differ between the two calls: equal scores may differ in the last bits and swap.
    for streamed, plain in zip(got, unary.results[:10], strict=True):
        assert streamed["score"] == pytest.approx(plain.score, abs=TOLERANCE)
        assert streamed["score"] == pytest.approx(unary_score[streamed["index"]], abs=TOLERANCE)
        assert streamed["document"] == texts[streamed["index"]]
    assert len({r["index"] for r in got} ^ {r.index for r in unary.results[:10]}) <= 2


def test_models_and_health(server: ServerProcess, client: RerankerClient) -> None:
    env = {"RERANK_CLI_TARGET": server.target}
    models = rerank("models", "--json", env=env)
    assert models.returncode == 0, models.stderr
    (model,) = json.loads(models.stdout)["models"]
    (info,) = client.list_models()
    assert (model["name"], model["family"], model["max_length"], model["ready"]) == (
        info.name, info.family, info.max_length, True,
    )  # fmt: skip
    table = rerank("models", env=env)
    assert table.stdout.splitlines()[1].split()[:2] == ["tiny-bert", info.family]

    for service in ([], ["liveness"], ["rerank.v1.Reranker"]):
        health = rerank("health", *service, env=env)
        assert (health.returncode, health.stdout) == (0, "SERVING\n"), service
    unknown = rerank("health", "no-such-service", env=env)
    assert (unknown.returncode, unknown.stdout) == (1, "SERVICE_UNKNOWN\n")


def test_a_failed_call_prints_its_status_and_exits_1(server: ServerProcess) -> None:
    result = rerank(QUERY, "--target", server.target, "--model", "nope", stdin="a\nb\n")
    assert result.returncode == 1
    assert result.stderr.startswith("rerank: NOT_FOUND: ") and "tiny-bert" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_command_never_imports_torch(server: ServerProcess) -> None:
    command = [sys.executable, "-X", "importtime", str(RERANK), QUERY, "--target", server.target, "--stream"]
    result = subprocess.run(command, input="a\nb\n", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "rerank_client.cli" in imported and "grpc" in imported
    heavy = {"torch", "numpy", "pydantic", "transformers", "rerank_server"}
    assert not {name for name in imported if name.split(".")[0] in heavy}


def test_ctrl_c_during_a_stream_exits_130_quietly(server: ServerProcess) -> None:
    scored_before = server.metric("rerank_pairs_scored_total")
    process = subprocess.Popen(
        [str(RERANK), QUERY, "--target", server.target, "--stream"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None
    # More than the first chunk, so the stream is under way, then standard input stays open.
    process.stdin.write("".join(t + "\n" for t in documents(1500)).encode())
    process.stdin.flush()
    deadline = time.monotonic() + 30
    while server.metric("rerank_pairs_scored_total") < scored_before + 1000:
        assert time.monotonic() < deadline, "the stream did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr == b""


def test_a_closed_standard_output_exits_quietly(server: ServerProcess) -> None:
    process = subprocess.Popen(
        [str(RERANK), QUERY, "--target", server.target, "-n", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.close()  # as `| head` does once it has what it wants
    _, stderr = process.communicate("".join(t + "\n" for t in documents(50)).encode(), timeout=60)
    assert process.returncode == 141
    assert stderr == b""


# --- a TLS server that takes bearer tokens ------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, bert_cross_encoder_dir: Path
) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("secured")
    tokens = directory / "tokens"
    tokens.write_text(TOKEN + "\n")
    args = ["--model", str(bert_cross_encoder_dir), "--auth-tokens-file", str(tokens)]
    args += ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    with ServerProcess(args, directory / "server.log") as server:
        server.wait_serving(credentials=tls_credentials(pki.ca))
        yield server
        assert server.stop(signal.SIGTERM) == 0, server.log()
        assert server.leftover_shared_memory() == []


def test_a_token_from_a_flag_or_the_environment_reaches_a_tls_server(
    secured: ServerProcess, pki: Pki, tmp_path: Path
) -> None:
    stdin = "Pandas eat bamboo.\nParis is in France.\n"
    with_flags = rerank(
        QUERY, "--target", secured.target, "--ca-file", str(pki.ca), "--token", TOKEN, stdin=stdin
    )
    assert with_flags.returncode == 0, with_flags.stderr
    assert len(with_flags.stdout.splitlines()) == 3
    env = {"RERANK_CLI_TARGET": secured.target, "RERANK_CLI_CA_FILE": str(pki.ca), "RERANK_CLI_TOKEN": TOKEN}
    from_env = rerank(QUERY, "--json", env=env, stdin=stdin)
    assert from_env.returncode == 0, from_env.stderr
    assert len(json.loads(from_env.stdout)["results"]) == 2
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    models = rerank("models", "--token-file", str(token_file), env={**env, "RERANK_CLI_TOKEN": ""})
    assert models.returncode == 0, models.stderr

    refused = rerank(QUERY, "--target", secured.target, "--ca-file", str(pki.ca), stdin=stdin)
    assert refused.returncode == 1
    assert refused.stderr.startswith("rerank: UNAUTHENTICATED: ")
    wrong = rerank("models", env={**env, "RERANK_CLI_TOKEN": "tok-wrong-55aa"})
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
    plaintext = rerank("models", "--target", secured.target, "--token", TOKEN, "--no-tls", env=env)
    assert plaintext.returncode == 1 and plaintext.stderr.startswith("rerank: UNAVAILABLE: ")
    # Health stays open without a token; no output ever holds the token.
    health = rerank("health", "--target", secured.target, "--tls", "--ca-file", str(pki.ca))
    assert (health.returncode, health.stdout) == (0, "SERVING\n")
    for result in (with_flags, from_env, models, refused, wrong, plaintext, health):
        assert TOKEN not in result.stdout + result.stderr
