"""The `rerank` command line: reading documents, settings from flags over RERANK_CLI_* variables,
its output, exit codes; end to end against the in-process fake server (a document's score is its length)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from fake_reranker import MODEL, MODELS, Failure, FakeServer
from grpc_health.v1 import health_pb2
from rerank_client import RankedDocument
from rerank_client.cli import main
from rerank_client.cli.commands import build_parser
from rerank_client.cli.documents import ONE_CALL_DOCUMENTS, DocumentReader, InputError, take_head
from rerank_client.cli.options import TlsSettings
from rerank_client.cli.output import Progress, cut, one_line, render_table

TOKEN = "tok-cli-3f9a"
#: Every variable the CLI reads, and server settings it must not read.
CLI_VARIABLES = ("TARGET", "TOKEN", "TOKEN_FILE", "TLS", "CA_FILE", "CERT_FILE", "KEY_FILE", "SERVER_NAME")
CLI_VARIABLES += ("MODEL", "TOP_N", "INSTRUCTION")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CLI_VARIABLES:
        monkeypatch.delenv(f"RERANK_CLI_{name}", raising=False)
    for name in ("COLUMNS", "RERANK_MODEL", "RERANK_TARGET", "RERANK_TLS_CERT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer().start()
    yield fake
    fake.stop()


def stdin_bytes(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))


RunJson = Callable[..., dict]


@pytest.fixture
def run_json(capsys: pytest.CaptureFixture[str]) -> RunJson:
    """Runs `rerank ARGV` to success, and returns its JSON output."""

    def run(*argv: str) -> dict:
        assert main(list(argv)) == 0
        return json.loads(capsys.readouterr().out)

    return run


# --- reading documents -----------------------------------------------------------------------------


def test_lines_are_documents_and_blank_lines_are_skipped_but_counted_in_the_index() -> None:
    reader = DocumentReader(["first\n", "\n", "  \t\n", "second line \r\n", "third"])
    assert list(reader) == ["first", "second line ", "third"]
    assert reader.input_format == "lines"
    assert [reader.input_index(i) for i in range(3)] == [0, 3, 4]


def test_leading_blank_lines_shift_every_index() -> None:
    reader = DocumentReader(["\n", "\n", "a\n", "b\n", "\n"])
    assert list(reader) == ["a", "b"]
    assert [reader.input_index(i) for i in range(2)] == [2, 3]


def test_json_lines_are_detected_from_the_first_non_blank_line() -> None:
    lines = ["\n", '{"text": "alpha", "id": 7}\n', "\n", '{"id": 8, "text": "line\\nbreak"}\n']
    reader = DocumentReader(lines)
    assert list(reader) == ["alpha", "line\nbreak"]
    assert reader.input_format == "jsonl"
    assert [reader.input_index(i) for i in range(2)] == [1, 3]


def test_a_first_line_that_is_not_a_text_object_means_plain_lines() -> None:
    for first in ('{"title": "no text"}', '["text"]', "{not json", '{"text": 3}'):
        reader = DocumentReader([first + "\n", '{"text": "kept as it is"}\n'])
        assert list(reader) == [first, '{"text": "kept as it is"}'], first
        assert reader.input_format == "lines"


def test_a_format_can_be_forced() -> None:
    line = '{"text": "x"}\n'
    assert list(DocumentReader([line], "lines")) == ['{"text": "x"}']
    with pytest.raises(InputError, match=r"line 1: not valid JSON"):
        list(DocumentReader(["plain text\n"], "jsonl"))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"text": "unterminated}', r"line 3: not valid JSON \(Unterminated string"),
        ('{"txt": "typo"}', r'line 3: not a JSON object with a "text" string'),
        ('{"text": null}', r'line 3: not a JSON object with a "text" string'),
        ("plain words", r"line 3: not valid JSON"),
    ],
)
def test_a_bad_json_line_is_a_clear_error_naming_its_line(bad: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        list(DocumentReader(['{"text": "a"}\n', "\n", bad + "\n", '{"text": "b"}\n']))


def test_the_head_is_read_lazily_up_to_one_past_a_single_calls_limit() -> None:
    taken = 0

    def documents() -> Iterator[str]:
        nonlocal taken
        while True:
            taken += 1
            yield "doc"

    source = documents()
    head, over = take_head(source)
    assert over and len(head) == ONE_CALL_DOCUMENTS + 1 == taken
    head, over = take_head(iter(["a", "b"]))
    assert (head, over) == (["a", "b"], False)
    head, over = take_head(iter(["x" * (9 * 2**20), "y"]))
    assert over and len(head) == 1  # 8 MiB of text passed by one document


# --- output --------------------------------------------------------------------------------------------


def test_table_cells_are_one_line_cut_to_the_width() -> None:
    assert one_line("a\nb\t c\x1b[31m  d") == "a b c [31m d"
    assert cut("abcdef", 6) == "abcdef"
    assert cut("abcdefg", 6) == "abcde…"
    assert cut("熊猫吃竹子", 6) == "熊猫…"  # wide characters take two columns
    table = render_table(("n", "text"), [("1", "short"), ("22", "x" * 50)], "><", 20)
    assert table.splitlines() == [" n  text", " 1  short", "22  " + "x" * 15 + "…"]
    assert render_table(("n", "text"), [("1", "x" * 200)], "><", None).splitlines()[1] == "1  " + "x" * 200


def test_progress_shows_documents_scored_and_their_rate_at_most_every_interval() -> None:
    now = [100.0]
    terminal = io.StringIO()
    progress = Progress(terminal, clock=lambda: now[0], every_s=0.5)
    batch = [RankedDocument(index=i, score=0.0) for i in range(1000)]
    now[0] = 101.0
    progress.add(batch)
    now[0] = 101.2
    progress.add(batch)  # within the interval: counted, not shown
    now[0] = 102.0
    progress.add(batch)
    progress.clear()
    assert terminal.getvalue() == (
        "\r\x1b[K1,000 documents scored, 1,000/s\r\x1b[K3,000 documents scored, 1,500/s\r\x1b[K"
    )


# --- end to end, against the fake server ---------------------------------------------------------------

DOCS = ["bb", "", "dddd", "a", "ccc"]  # scores (lengths) 2, -, 4, 1, 3: the blank line is skipped


def write_docs(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "docs.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_table_ranks_the_file_by_score_with_indexes_into_the_input(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "30")
    path = write_docs(tmp_path, [*DOCS, "e" * 40])
    assert main(["q", str(path), "--target", server.target, "--top-n", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "rank    score  index  document",
        "   1  40.0000      5  eeeeeee…",  # cut to 30 columns
        "   2   4.0000      2  dddd",
        "   3   3.0000      4  ccc",
    ]
    (request,) = server.reranker.requests
    assert list(request.documents) == [d for d in DOCS if d] + ["e" * 40]
    assert (request.query, request.top_n, request.return_documents) == ("q", 3, False)


def test_json_output_has_results_model_usage_and_timings(
    server: FakeServer, tmp_path: Path, run_json: RunJson
) -> None:
    path = write_docs(tmp_path, DOCS)
    output = run_json("q", str(path), "--target", server.target, "--top-n", "0", "--json")
    assert output["results"] == [
        {"index": 2, "score": 4.0, "document": "dddd"},
        {"index": 4, "score": 3.0, "document": "ccc"},
        {"index": 0, "score": 2.0, "document": "bb"},
        {"index": 3, "score": 1.0, "document": "a"},
    ]
    assert output["model"] == MODEL
    assert output["usage"]["documents"] == 4
    assert output["timings"] == {"tokenize_ms": 1.25, "queue_ms": 2.5, "inference_ms": 5.0, "total_ms": 9.0}
    assert output["streamed"] is False


def test_documents_come_from_standard_input_without_a_file_or_with_dash(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, run_json: RunJson
) -> None:
    for argv in (["q"], ["q", "-"]):
        # A byte-order mark is dropped; JSON lines are detected on standard input too.
        stdin_bytes(monkeypatch, b'\xef\xbb\xbf{"text": "pandas"}\n\n{"text": "eat bamboo"}\n')
        output = run_json(*argv, "--target", server.target, "--json")
        assert [(r["index"], r["document"]) for r in output["results"]] == [(2, "eat bamboo"), (0, "pandas")]


def test_options_reach_the_request(server: FakeServer, tmp_path: Path) -> None:
    path = write_docs(tmp_path, DOCS)
    argv = ["q", str(path), "--target", server.target, "--model", "other", "--instruction", "find it"]
    argv += ["--max-length", "64", "--truncation", "chunk", "--raw-scores", "--cutoff-layer", "9"]
    assert main(argv) == 0
    (request,) = server.reranker.requests
    assert (request.model, request.instruction, request.max_length) == ("other", "find it", 64)
    assert (request.raw_scores, request.cutoff_layer, request.top_n) == (True, 9, 10)
    assert request.truncation == 3  # TRUNCATION_CHUNK


def test_an_input_over_one_calls_limit_is_streamed(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, run_json: RunJson
) -> None:
    lines = [("x" * (i % 97)) + str(i) for i in range(ONE_CALL_DOCUMENTS + 300)]
    lines.insert(5, "")
    stdin_bytes(monkeypatch, "".join(line + "\n" for line in lines).encode())
    output = run_json("q", "--target", server.target, "--json", "--top-n", "3")
    assert server.reranker.attempts["StreamRerank"] == 1 and server.reranker.attempts["Rerank"] == 0
    best = sorted((i for i, line in enumerate(lines) if line), key=lambda i: (-len(lines[i]), i))[:3]
    assert [r["index"] for r in output["results"]] == best
    assert [r["document"] for r in output["results"]] == [lines[i] for i in best]
    assert output["streamed"] is True and output["usage"]["documents"] == ONE_CALL_DOCUMENTS + 300


def test_stream_and_no_stream_force_the_choice(server: FakeServer, tmp_path: Path, run_json: RunJson) -> None:
    path = write_docs(tmp_path, DOCS)
    assert run_json("q", str(path), "--target", server.target, "--json", "--stream")["streamed"] is True
    big = write_docs(tmp_path, [str(i) for i in range(ONE_CALL_DOCUMENTS + 5)])
    output = run_json("q", str(big), "--target", server.target, "--json", "--no-stream", "-n", "0")
    assert output["streamed"] is False and len(output["results"]) == ONE_CALL_DOCUMENTS + 5
    assert server.reranker.attempts == {"StreamRerank": 1, "Rerank": 1}


def test_top_n_zero_cannot_stream(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_docs(tmp_path, DOCS)
    with pytest.raises(SystemExit) as exited:
        main(["q", str(path), "--target", server.target, "--stream", "--top-n", "0"])
    assert exited.value.code == 2
    assert "a stream needs --top-n of at least 1" in capsys.readouterr().err
    big = write_docs(tmp_path, ["doc"] * (ONE_CALL_DOCUMENTS + 1))
    with pytest.raises(SystemExit) as exited:
        main(["q", str(big), "--target", server.target, "--top-n", "0"])
    assert exited.value.code == 2
    assert "this input is streamed: give --top-n N" in capsys.readouterr().err
    assert not server.reranker.attempts


def test_models_as_a_table_and_as_json(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], run_json: RunJson
) -> None:
    monkeypatch.setenv("RERANK_CLI_TARGET", server.target)
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "family", "max_length", "dtype", "ready", "devices"]
    assert lines[1].split() == [MODEL, "cross-encoder", "512", "float32", "1/2", "cpu:0,cpu:1"]
    assert len(lines) == 1 + len(MODELS)
    output = run_json("models", "--json")
    assert [m["name"] for m in output["models"]] == [m.name for m in MODELS]
    assert output["models"][2]["max_cutoff_layer"] == 40


def test_health_exits_0_only_when_serving(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--target", server.target]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["health", "--target", server.target]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"
    assert main(["health", "rerank.v1.Reranker", "--target", server.target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"service": "rerank.v1.Reranker", "status": "SERVING"}
    assert main(["health", "nothing-of-that-name", "--target", server.target]) == 1
    assert capsys.readouterr().out == "SERVICE_UNKNOWN\n"


def test_a_query_that_is_a_command_word_is_given_with_query(
    server: FakeServer, tmp_path: Path, run_json: RunJson
) -> None:
    path = write_docs(tmp_path, DOCS)
    output = run_json("--query", "models", str(path), "--target", server.target, "--json")
    assert len(output["results"]) == 4
    assert server.reranker.requests[0].query == "models"
    run_json("-q", "health", str(path), "--target", server.target, "--json")
    assert server.reranker.requests[1].query == "health"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give a QUERY"),
        (["q", "file", "extra"], "unexpected argument after FILE: 'extra'"),
        (["models", "extra"], "unexpected argument after 'models': 'extra'"),
        (["health", "a", "b"], "unexpected argument after 'health a': 'b'"),
        (["models", "--top-n", "3"], "--top-n is for reranking, not for 'models'"),
        (["health", "--model", "m"], "--model is for reranking, not for 'health'"),
        (["q", "--top-n", "-1"], "must be a whole number of at least 0, not '-1'"),
        (["q", "--timeout", "0"], "must be a positive number of seconds"),
        (["q", "--truncation", "middle"], "invalid choice: 'middle'"),
        (["q", "--token", "a", "--token-file", "f"], "not allowed with argument"),
        (["q", "--cert-file", "c.pem"], "give --cert-file and --key-file together"),
    ],
)
def test_bad_usage_exits_2_with_argparses_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: rerank") and message in err


# --- settings: flags over RERANK_CLI_* variables ---------------------------------------------------------


def test_environment_variables_supply_target_model_top_n_instruction_and_token(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_json: RunJson
) -> None:
    path = write_docs(tmp_path, DOCS)
    environment = {"TARGET": server.target, "MODEL": "other", "TOP_N": "2", "INSTRUCTION": "env says"}
    for name, value in {**environment, "TOKEN": TOKEN}.items():
        monkeypatch.setenv(f"RERANK_CLI_{name}", value)
    monkeypatch.setenv("RERANK_MODEL", "the-servers-model")  # a server setting: not read
    assert len(run_json("q", str(path), "--json")["results"]) == 2
    request = server.reranker.requests[-1]
    assert (request.model, request.top_n, request.instruction) == ("other", 2, "env says")
    assert server.reranker.metadata[-1]["authorization"] == f"Bearer {TOKEN}"

    token_file = tmp_path / "token"
    token_file.write_text("  tok-from-flag-file \n")
    argv = ["q", str(path), "--json", "--model", MODEL, "-n", "1", "--instruction", "flag says"]
    assert len(run_json(*argv, "--token-file", str(token_file))["results"]) == 1
    request = server.reranker.requests[-1]
    assert (request.model, request.top_n, request.instruction) == (MODEL, 1, "flag says")
    assert server.reranker.metadata[-1]["authorization"] == "Bearer tok-from-flag-file"
    run_json(*argv, "--token", "tok-from-flag")
    assert server.reranker.metadata[-1]["authorization"] == "Bearer tok-from-flag"


def test_the_token_file_variable_and_no_token(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RERANK_CLI_TARGET", server.target)
    assert main(["models"]) == 0
    assert "authorization" not in server.reranker.metadata[-1]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("RERANK_CLI_TOKEN_FILE", str(token_file))
    assert main(["models"]) == 0
    assert server.reranker.metadata[-1]["authorization"] == f"Bearer {TOKEN}"
    monkeypatch.setenv("RERANK_CLI_TOKEN", TOKEN)
    with pytest.raises(SystemExit) as exited:
        main(["models"])
    assert exited.value.code == 2
    assert "set RERANK_CLI_TOKEN or RERANK_CLI_TOKEN_FILE, not both" in capsys.readouterr().err


def test_a_token_is_never_printed(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "tök-9d1"  # not ASCII: refused before any call
    monkeypatch.setenv("RERANK_CLI_TOKEN", secret)
    with pytest.raises(SystemExit):
        main(["models", "--target", server.target])
    with pytest.raises(SystemExit):
        main(["--help"])
    server.reranker.fail("ListModels", Failure(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown token"))
    assert main(["models", "--target", server.target, "--token", "tok-good-9d1"]) == 1
    captured = capsys.readouterr()
    assert "UNAUTHENTICATED: missing or unknown token" in captured.err
    assert "9d1" not in captured.out + captured.err


def test_tls_settings_come_from_flags_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:

    def resolve(*argv: str, **environ: str) -> TlsSettings:
        args = build_parser().parse_intermixed_args(["q", *argv])
        return TlsSettings.resolve(args, {f"RERANK_CLI_{k}": v for k, v in environ.items()})

    assert resolve() == TlsSettings(enabled=False)
    assert resolve("--tls") == TlsSettings(enabled=True)
    assert resolve(TLS="yes") == TlsSettings(enabled=True)
    assert resolve("--no-tls", TLS="true") == TlsSettings(enabled=False)
    assert resolve(CA_FILE="env-ca.pem") == TlsSettings(enabled=True, ca_file="env-ca.pem")
    assert resolve("--ca-file", "flag.pem", CA_FILE="env.pem", SERVER_NAME="rerank.example") == TlsSettings(
        enabled=True, ca_file="flag.pem", server_name="rerank.example"
    )
    assert resolve(TLS="false", CA_FILE="ca.pem").enabled is False
    assert resolve("--server-name", "n").channel_options() == [("grpc.ssl_target_name_override", "n")]
    with pytest.raises(Exception, match="RERANK_CLI_TLS must be true or false, not 'maybe'"):
        resolve(TLS="maybe")


def test_a_bad_top_n_variable_is_a_usage_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RERANK_CLI_TOP_N", "ten")
    with pytest.raises(SystemExit) as exited:
        main(["q", "docs.txt"])
    assert exited.value.code == 2
    assert "RERANK_CLI_TOP_N: must be a whole number of at least 0, not 'ten'" in capsys.readouterr().err


# --- failures ------------------------------------------------------------------------------------------


def test_a_failed_call_prints_its_status_and_exits_1(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_docs(tmp_path, DOCS)
    server.reranker.fail("Rerank", Failure(grpc.StatusCode.NOT_FOUND, "no model 'nope'; served: fake-model"))
    assert main(["q", str(path), "--target", server.target, "--model", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "rerank: NOT_FOUND: no model 'nope'; served: fake-model\n"
    assert captured.out == ""


def test_an_unreadable_input_exits_3(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["q", str(tmp_path / "missing.txt"), "--target", server.target]) == 3
    assert f"rerank: cannot read {tmp_path / 'missing.txt'}: No such file" in capsys.readouterr().err
    stdin_bytes(monkeypatch, b"\n  \n")
    assert main(["q", "--target", server.target]) == 3
    assert "no documents in the input" in capsys.readouterr().err
    stdin_bytes(monkeypatch, b"fine\n\xff\xfe broken\n")
    assert main(["q", "--target", server.target]) == 3
    assert "not UTF-8" in capsys.readouterr().err
    path = write_docs(tmp_path, ['{"text": "a"}', '{"text": "b"'])
    assert main(["q", str(path), "--target", server.target]) == 3
    assert "rerank: line 2: not valid JSON" in capsys.readouterr().err
    assert not server.reranker.attempts


def test_bad_json_deep_in_a_stream_ends_it_with_the_input_error(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(ONE_CALL_DOCUMENTS + 2000)]
    lines[1500] = "{oops"
    stdin_bytes(monkeypatch, "\n".join(lines).encode())
    assert main(["q", "--target", server.target]) == 3
    assert capsys.readouterr().err.startswith("rerank: line 1501: not valid JSON (Expecting property name")


def test_ctrl_c_exits_130_without_a_traceback(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Interrupted(io.StringIO):
        def __iter__(self) -> Iterator[str]:
            yield "one\n"
            raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", Interrupted())
    assert main(["q", "--target", server.target]) == 130
    assert capsys.readouterr().err == ""


def test_a_closed_standard_output_exits_quietly(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    stderr = io.StringIO()
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    monkeypatch.setattr("sys.stderr", stderr)
    assert main(["q", str(write_docs(tmp_path, DOCS)), "--target", server.target]) == 141
    assert stderr.getvalue() == ""


def test_the_container_health_check_shares_the_tls_flags(
    server: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rerank_client import healthcheck

    monkeypatch.setenv("RERANK_CLI_TLS", "true")  # the CLI's variables: not read by the probe
    assert healthcheck.main([server.target]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert healthcheck.main([server.target, "--cert-file", "client.pem"]) == 1
    assert "unhealthy: give --cert-file and --key-file together" in capsys.readouterr().err
    assert healthcheck.main([server.target, "--ca-file", "/nonexistent/ca.pem"]) == 1
    assert "unhealthy: cannot read /nonexistent/ca.pem" in capsys.readouterr().err
