"""The real server secured: TLS, mutual TLS, bearer tokens (reloaded on SIGHUP), reflection off,
metrics on their own host, no secrets in the log; and README's secured client example."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rerank_client import RerankerClient, RerankError, UnauthenticatedError, UnavailableError, tls_credentials
from rerank_server.edge.auth import REFUSAL
from throwaway_pki import Pki, make_pki

from integration.conftest import StartServer
from integration.server_process import SERVER_SCRIPT, ServerProcess, wait_until

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
TOKEN = "tok-alpha-5b2e91d0"
ROTATED = "tok-gamma-0e77c3a4"
WRONG = "tok-wrong-c4a1f9e2"
MARKER = "zanzibar-marker-41d7"
#: Metrics on another loopback address than the gRPC port's 127.0.0.1: shows which setting binds them.
METRICS_HOST = "127.0.0.2"
DOCUMENTS = ["Pandas eat bamboo almost all day.", "Paris is the capital of France.", "Bamboo grows fast."]


def write_tokens(path: Path, *tokens: str) -> Path:
    path.write_text("".join(f"  {token}  \n\n" for token in tokens))
    return path


@pytest.fixture(scope="module")
def tls_tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokens(tmp_path_factory.mktemp("tls-tokens") / "tokens", TOKEN)


@pytest.fixture(scope="module")
def tls_server(
    start_module_server: StartServer, pki: Pki, tls_tokens: Path, bert_cross_encoder_dir: Path
) -> ServerProcess:
    """TLS, bearer tokens, no reflection, metrics on METRICS_HOST, everything logged."""
    return start_module_server(
        "--model", str(bert_cross_encoder_dir),
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--auth-tokens-file", str(tls_tokens),
        "--no-reflection", "--metrics-host", METRICS_HOST, "--log-level", "DEBUG",
        credentials=tls_credentials(pki.ca),
    )  # fmt: skip


@pytest.fixture(scope="module")
def mtls_server(
    start_module_server: StartServer,
    pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
    bert_cross_encoder_dir: Path,
) -> ServerProcess:
    """Mutual TLS and bearer tokens, reflection on (the default)."""
    tokens = write_tokens(tmp_path_factory.mktemp("mtls-tokens") / "tokens", TOKEN)
    return start_module_server(
        "--model", str(bert_cross_encoder_dir),
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
        "--auth-tokens-file", str(tokens),
        credentials=tls_credentials(pki.ca, pki.client_cert, pki.client_key),
    )  # fmt: skip


def tls_client(server: ServerProcess, pki: Pki, token: str | None) -> RerankerClient:
    return RerankerClient(
        server.target, credentials=tls_credentials(pki.ca), token=token, retry=None, timeout=60
    )


def accepted(server: ServerProcess, pki: Pki, token: str) -> bool:
    with tls_client(server, pki, token=token) as client:
        try:
            client.list_models()
        except UnauthenticatedError:
            return False
    return True


# --- TLS -----------------------------------------------------------------------------------------


def test_a_tls_port_refuses_plaintext_clients_and_serves_tls_ones(
    tls_server: ServerProcess, pki: Pki
) -> None:
    with RerankerClient(tls_server.target, token=TOKEN, retry=None, timeout=30) as plaintext:
        with pytest.raises(UnavailableError):
            plaintext.health()
        with pytest.raises(UnavailableError):
            plaintext.rerank("what do giant pandas eat?", DOCUMENTS)
    with tls_client(tls_server, pki, token=TOKEN) as client:
        result = client.rerank("what do giant pandas eat?", DOCUMENTS, top_n=2)
        assert len(result.results) == 2
        assert client.health() == "SERVING"
    assert "(TLS, bearer tokens)" in tls_server.log()


def test_mutual_tls_refuses_clients_without_a_certificate_it_trusts(
    mtls_server: ServerProcess, pki: Pki, tmp_path: Path
) -> None:
    stranger = make_pki(tmp_path / "stranger", "stranger CA")
    refused = {
        "no client certificate": tls_credentials(pki.ca),
        "a certificate another CA signed": tls_credentials(pki.ca, stranger.client_cert, stranger.client_key),
    }
    for credentials in refused.values():
        with (
            RerankerClient(
                mtls_server.target, credentials=credentials, token=TOKEN, retry=None, timeout=30
            ) as c,
            pytest.raises(UnavailableError),
        ):
            c.health()
    credentials = tls_credentials(pki.ca, pki.client_cert, pki.client_key)
    with RerankerClient(
        mtls_server.target, credentials=credentials, token=TOKEN, retry=None, timeout=60
    ) as c:
        assert c.health() == "SERVING"
        assert [r.index for r in c.rerank("what do giant pandas eat?", DOCUMENTS).results]


# --- bearer tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, WRONG, TOKEN[:-1]], ids=["no token", "wrong token", "a prefix"])
def test_calls_without_an_accepted_token_are_unauthenticated(
    tls_server: ServerProcess, pki: Pki, token: str | None
) -> None:
    with tls_client(tls_server, pki, token=token) as client:
        calls: dict[str, Callable[[], object]] = {
            "Rerank": lambda: client.rerank("q", DOCUMENTS),
            "StreamRerank": lambda: client.stream_rerank("q", iter(DOCUMENTS), top_n=1, chunk_size=1),
            "ListModels": client.list_models,
        }
        for method, call in calls.items():
            with pytest.raises(UnauthenticatedError) as refused:
                call()
            assert refused.value.message == REFUSAL, method
        # Health stays open for probes.
        assert client.health() == "SERVING"
    with tls_client(tls_server, pki, token=TOKEN) as client:
        assert client.list_models()[0].ready


def test_sighup_rereads_the_tokens_file(tls_server: ServerProcess, pki: Pki, tls_tokens: Path) -> None:
    try:
        write_tokens(tls_tokens, ROTATED)
        tls_server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: not accepted(tls_server, pki, TOKEN), 30, "the old token refused")
        assert accepted(tls_server, pki, ROTATED)

        # A file emptied by mistake keeps the tokens the server has.
        tls_tokens.write_text("\n")
        tls_server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "not reloaded" in tls_server.log(), 30, "the failed reload logged")
        assert accepted(tls_server, pki, ROTATED)
        assert not accepted(tls_server, pki, TOKEN)
    finally:
        write_tokens(tls_tokens, TOKEN)
        tls_server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: accepted(tls_server, pki, TOKEN), 30, "the first token restored")
    assert tls_server.process.poll() is None  # SIGHUP reloads, it does not stop the server


# --- reflection and metrics ----------------------------------------------------------------------


def list_services(
    server: ServerProcess, credentials: grpc.ChannelCredentials, token: str | None
) -> list[str]:
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.secure_channel(server.target, credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=30)
        return [s.name for r in responses for s in r.list_services_response.service]


def test_reflection_is_protected_by_tokens_and_can_be_turned_off(
    tls_server: ServerProcess, mtls_server: ServerProcess, pki: Pki
) -> None:
    mutual = tls_credentials(pki.ca, pki.client_cert, pki.client_key)
    assert "rerank.v1.Reranker" in list_services(mtls_server, mutual, TOKEN)
    with pytest.raises(grpc.RpcError) as refused:
        list_services(mtls_server, mutual, None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as off:
        list_services(tls_server, tls_credentials(pki.ca), TOKEN)
    assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_metrics_listen_on_the_metrics_host(tls_server: ServerProcess) -> None:
    with urllib.request.urlopen(
        f"http://{METRICS_HOST}:{tls_server.metrics_port}/metrics", timeout=30
    ) as got:
        assert b"rerank_requests_total" in got.read()
    # Not on the gRPC port's address (--host 127.0.0.1), which the metrics used before.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_server.metrics_port}/metrics", timeout=30)


# --- logs ----------------------------------------------------------------------------------------


def test_debug_logs_hold_neither_tokens_nor_request_text(tls_server: ServerProcess, pki: Pki) -> None:
    query = f"what does {MARKER} eat?"
    documents = [f"{MARKER} eats bamboo.", f"Paris {MARKER}.", "x" * 50_000 + MARKER]
    with tls_client(tls_server, pki, token=TOKEN) as client:
        client.rerank(query, documents, return_documents=True)
        client.stream_rerank(query, iter(documents * 3), top_n=2, chunk_size=2)
        with pytest.raises(RerankError):  # an error that quotes the request back to its caller
            client.rerank(query, documents, instruction=f"rank {MARKER}")
    with tls_client(tls_server, pki, token=WRONG) as client, pytest.raises(UnauthenticatedError):
        client.rerank(query, documents)
    log = tls_server.log()
    assert " DEBUG " in log  # the test means something only if DEBUG lines were written
    for secret in (MARKER, TOKEN, WRONG, ROTATED):
        assert secret not in log, f"{secret} in the server log"


# --- startup -------------------------------------------------------------------------------------


def test_a_tokens_file_without_tokens_stops_the_server_at_start(tmp_path: Path) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("\n   \n")
    done = subprocess.run(
        [str(SERVER_SCRIPT), "--auth-tokens-file", str(empty), "--port", "0", "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"--auth-tokens-file {empty} holds no token" in done.stderr


# --- README --------------------------------------------------------------------------------------


def readme_security_example() -> str:
    section = README.read_text().split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the Security section has one python example"
    return blocks[0]


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual tls"])
def test_the_readme_security_example_works(
    tls_server: ServerProcess, mtls_server: ServerProcess, pki: Pki, mutual: bool
) -> None:
    server = mtls_server if mutual else tls_server
    env = {**os.environ, "RERANK_TARGET": server.target, "RERANK_CA_FILE": str(pki.ca), "RERANK_TOKEN": TOKEN}
    if mutual:
        env |= {
            "RERANK_CLIENT_CERT_FILE": str(pki.client_cert),
            "RERANK_CLIENT_KEY_FILE": str(pki.client_key),
        }
    done = subprocess.run(
        [sys.executable, "-c", readme_security_example()],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "SERVING"
    assert "[RankedDocument(index=" in done.stdout


def test_the_container_health_check_speaks_tls(
    tls_server: ServerProcess, mtls_server: ServerProcess, pki: Pki
) -> None:
    """The image's HEALTHCHECK command works against a TLS port, and a mutual TLS one, without a token."""
    command = [sys.executable, "-m", "rerank_client.healthcheck", "--timeout", "10"]
    trusted = ["--ca-file", str(pki.ca)]
    client_cert = ["--cert-file", str(pki.client_cert), "--key-file", str(pki.client_key)]
    for server, extra in ((tls_server, trusted), (mtls_server, [*trusted, *client_cert])):
        check = subprocess.run([*command, server.target, *extra], capture_output=True, text=True, timeout=60)
        assert (check.returncode, check.stdout.strip()) == (0, "SERVING"), check.stderr
    plaintext = subprocess.run([*command, tls_server.target], capture_output=True, text=True, timeout=60)
    assert plaintext.returncode == 1
    without_cert = subprocess.run(
        [*command, mtls_server.target, *trusted], capture_output=True, text=True, timeout=60
    )
    assert without_cert.returncode == 1
