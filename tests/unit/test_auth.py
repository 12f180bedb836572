"""The gRPC port's security pieces: the bearer token store and interceptor, the TLS files' checks,
and what the client sends."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from fake_reranker import FakeServer
from rerank_client import AsyncRerankerClient, RerankerClient, tls_credentials
from rerank_client.credentials import call_metadata
from rerank_server.edge import auth
from rerank_server.edge.auth import REFUSAL, BearerTokenInterceptor, TokenStore, bearer_token
from rerank_server.edge.tls import server_credentials
from throwaway_pki import Pki

TOKEN = "s3cret-token-alpha"
OTHER = "s3cret-token-beta"


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"\n  {TOKEN}  \n\n\t{OTHER}\n   \n")
    return path


# --- the token store -----------------------------------------------------------------------------


def test_tokens_are_read_one_a_line_ignoring_blank_lines_and_whitespace(tokens_file: Path) -> None:
    store = TokenStore(str(tokens_file))
    assert store.accepts(TOKEN) and store.accepts(OTHER)
    for wrong in ("", " ", TOKEN[:-1], TOKEN + "x", f"  {TOKEN}", TOKEN.upper(), f"{TOKEN}\n{OTHER}"):
        assert not store.accepts(wrong), repr(wrong)


def test_a_check_compares_against_every_token_without_stopping_at_a_match(
    tokens_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TokenStore(str(tokens_file))
    compared: list[tuple[bytes, bytes]] = []

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", compare_digest)
    for candidate in (TOKEN, OTHER, "wrong", "a much longer wrong token than any accepted one"):
        compared.clear()
        store.accepts(candidate)
        # Every token is compared, always through digests of one length: the time tells nothing.
        assert len(compared) == 2
        assert {len(a) for a, _ in compared} == {len(b) for _, b in compared} == {32}


def test_a_reload_replaces_the_tokens(tokens_file: Path) -> None:
    store = TokenStore(str(tokens_file))
    tokens_file.write_text("fresh-token\n")
    assert store.reload() is True
    assert store.accepts("fresh-token")
    assert not store.accepts(TOKEN) and not store.accepts(OTHER)


@pytest.mark.parametrize("damage", ["remove", "empty", "not utf-8"])
def test_a_reload_that_cannot_read_tokens_keeps_the_old_ones(
    tokens_file: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = TokenStore(str(tokens_file))
    if damage == "remove":
        tokens_file.unlink()
    elif damage == "empty":
        tokens_file.write_text("\n  \n")
    else:
        tokens_file.write_bytes(b"\xff\xfe bad\n")
    with caplog.at_level(logging.INFO):
        assert store.reload() is False
    assert store.accepts(TOKEN) and store.accepts(OTHER)
    assert "not reloaded, 2 kept" in caplog.text


@pytest.mark.parametrize(("content", "error"), [(None, "cannot read"), ("\n \n", "holds no token")])
def test_a_tokens_file_that_cannot_serve_is_refused_at_start(
    tmp_path: Path, content: str | None, error: str
) -> None:
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=error):
        TokenStore(str(path))


def test_the_log_counts_tokens_and_never_shows_them(
    tokens_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        store = TokenStore(str(tokens_file))
        tokens_file.write_text("fresh-token\n")
        store.reload()
        store.accepts("guessed-token")
    assert "2 loaded" in caplog.text and "1 reloaded" in caplog.text
    for secret in (TOKEN, OTHER, "fresh-token", "guessed-token"):
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", f"Bearer {TOKEN}"),), TOKEN),
        ((("x-other", "1"), ("authorization", f"bearer  {TOKEN} ")), TOKEN),
        ((("authorization", f"Basic {TOKEN}"),), None),
        ((("authorization", "Bearer "),), None),
        ((("authorization", TOKEN),), None),
        ((("x-authorization", f"Bearer {TOKEN}"),), None),
        ((), None),
        (None, None),
    ],
)
def test_the_bearer_token_is_read_from_the_authorization_metadata(
    metadata: tuple[tuple[str, str], ...] | None, token: str | None
) -> None:
    assert bearer_token(metadata) == token


# --- the interceptor -----------------------------------------------------------------------------


@dataclass
class CallDetails:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class Aborted(Exception):
    pass


class AbortingContext:
    """Records the status a handler aborts with, as grpc.aio's context does by raising."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted


async def _serve(_request: Any, _context: Any) -> str:
    return "served"


HANDLERS = {
    "/rerank.v1.Reranker/Rerank": grpc.unary_unary_rpc_method_handler(_serve),
    "/rerank.v1.Reranker/StreamRerank": grpc.stream_stream_rpc_method_handler(_serve),
    "/rerank.v1.Reranker/ListModels": grpc.unary_unary_rpc_method_handler(_serve),
    "/grpc.health.v1.Health/Check": grpc.unary_unary_rpc_method_handler(_serve),
    "/grpc.health.v1.Health/Watch": grpc.unary_stream_rpc_method_handler(_serve),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        _serve
    ),
    "/upload.v1.Upload/Put": grpc.stream_unary_rpc_method_handler(_serve),
}


async def continuation(details: CallDetails) -> grpc.RpcMethodHandler | None:
    """What gRPC's own lookup gives: the method's handler, None for an unknown method."""
    return HANDLERS.get(details.method)


async def intercept(tokens_file: Path, method: str, metadata: tuple[tuple[str, str], ...]) -> Any:
    interceptor = BearerTokenInterceptor(TokenStore(str(tokens_file)))
    return await interceptor.intercept_service(continuation, CallDetails(method, metadata))  # type: ignore[arg-type]


async def run_handler(handler: grpc.RpcMethodHandler) -> tuple[Any, AbortingContext]:
    behaviour = next(
        b
        for b in (handler.unary_unary, handler.unary_stream, handler.stream_unary, handler.stream_stream)
        if b is not None
    )
    context = AbortingContext()
    try:
        return await behaviour(None, context), context
    except Aborted:
        return None, context


@pytest.mark.parametrize("method", sorted(HANDLERS))
@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", f"Basic {TOKEN}"),)],
    ids=["no token", "wrong token", "other scheme"],
)
async def test_calls_without_an_accepted_token_are_unauthenticated_except_health(
    tokens_file: Path, method: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    handler = await intercept(tokens_file, method, metadata)
    if method.startswith("/grpc.health.v1.Health/"):
        assert handler is HANDLERS[method]  # probes need no token
        return
    original = HANDLERS[method]
    assert handler is not original
    # The refusal is a handler of the method's own kind, so gRPC serves it as that method.
    assert (handler.request_streaming, handler.response_streaming) == (
        original.request_streaming,
        original.response_streaming,
    )
    assert handler.request_deserializer is None  # the caller's bytes are never parsed
    result, context = await run_handler(handler)
    assert result is None
    assert context.aborted == (grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


@pytest.mark.parametrize("method", sorted(HANDLERS))
@pytest.mark.parametrize("token", [TOKEN, OTHER])
async def test_calls_with_an_accepted_token_are_served(tokens_file: Path, method: str, token: str) -> None:
    handler = await intercept(tokens_file, method, (("authorization", f"Bearer {token}"),))
    assert handler is HANDLERS[method]


async def test_an_unknown_method_is_refused_without_a_token_and_unimplemented_with_one(
    tokens_file: Path,
) -> None:
    refused = await intercept(tokens_file, "/no.such.Service/Call", ())
    _, context = await run_handler(refused)
    assert context.aborted == (grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
    # With a token, gRPC answers UNIMPLEMENTED itself, for the missing handler.
    assert (
        await intercept(tokens_file, "/no.such.Service/Call", (("authorization", f"Bearer {TOKEN}"),)) is None
    )


# --- the TLS files -------------------------------------------------------------------------------


def test_no_certificate_means_plaintext() -> None:
    assert server_credentials("", "", "") is None


def test_tls_and_mutual_tls_credentials_from_pem_files(pki: Pki) -> None:
    assert isinstance(
        server_credentials(str(pki.server_cert), str(pki.server_key), ""), grpc.ServerCredentials
    )
    mutual = server_credentials(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    assert isinstance(mutual, grpc.ServerCredentials)


@pytest.mark.parametrize(
    ("files", "error"),
    [
        (("", "key", ""), "--tls-key needs --tls-cert"),
        (("", "", "ca"), "--tls-client-ca needs --tls-cert"),
        (("cert", "", ""), "--tls-cert needs --tls-key"),
        (("missing", "key", ""), "cannot read --tls-cert .*missing"),
        (("cert", "missing", ""), "cannot read --tls-key .*missing"),
        (("cert", "key", "missing"), "cannot read --tls-client-ca .*missing"),
        (("key", "key", ""), "--tls-cert .* is not a PEM file with a CERTIFICATE"),
        (("cert", "cert", ""), "--tls-key .* is not a PEM file with a PRIVATE KEY"),
        (("cert", "key", "junk"), "--tls-client-ca .* is not a PEM file with a CERTIFICATE"),
    ],
)
def test_tls_settings_that_cannot_serve_say_which_file(
    pki: Pki, tmp_path: Path, files: tuple[str, str, str], error: str
) -> None:
    junk = tmp_path / "junk"
    junk.write_text("not a certificate\n")
    paths = {
        "": "",
        "cert": str(pki.server_cert),
        "key": str(pki.server_key),
        "ca": str(pki.ca),
        "missing": str(tmp_path / "missing"),
        "junk": str(junk),
    }
    with pytest.raises(ValueError, match=error):
        server_credentials(*(paths[f] for f in files))


# --- what the client sends -----------------------------------------------------------------------


def test_the_client_token_goes_as_bearer_authorization_beside_other_metadata() -> None:
    assert call_metadata([("x-tenant", "acme")], TOKEN) == (
        ("x-tenant", "acme"),
        ("authorization", f"Bearer {TOKEN}"),
    )
    assert call_metadata([("x-tenant", "acme")], None) == (("x-tenant", "acme"),)


@pytest.mark.parametrize("token", ["", " padded ", "two\nlines", "caf\u00e9"])
def test_a_malformed_token_is_refused_without_quoting_it(token: str) -> None:
    with pytest.raises(ValueError) as raised:
        call_metadata((), token)
    assert token.strip() == "" or token.strip() not in str(raised.value)


def test_a_token_and_authorization_metadata_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        call_metadata([("Authorization", "Bearer x")], TOKEN)
    with pytest.raises(ValueError, match="not both"):
        RerankerClient("127.0.0.1:1", token=TOKEN, metadata=[("authorization", "Bearer x")])


def test_tls_credentials_need_the_client_certificate_and_key_together(pki: Pki) -> None:
    assert isinstance(tls_credentials(pki.ca), grpc.ChannelCredentials)
    assert isinstance(tls_credentials(pki.ca, pki.client_cert, pki.client_key), grpc.ChannelCredentials)
    with pytest.raises(ValueError, match="together"):
        tls_credentials(pki.ca, cert_file=pki.client_cert)
    with pytest.raises(FileNotFoundError):
        tls_credentials(pki.ca.with_name("missing.pem"))


def test_the_client_sends_its_token_with_every_call() -> None:
    fake = FakeServer().start()
    try:
        with RerankerClient(fake.target, token=TOKEN, metadata=[("x-tenant", "acme")], retry=None) as client:
            client.rerank("q", ["a", "bb"])
            client.stream_rerank("q", iter(["a", "bb", "ccc"]), top_n=2, chunk_size=1)
            client.list_models()
            assert client.health() == "SERVING"
        assert fake.reranker.attempts == {"Rerank": 1, "StreamRerank": 1, "ListModels": 1, "Check": 1}
        for seen in fake.reranker.metadata:
            assert (seen["authorization"], seen["x-tenant"]) == (f"Bearer {TOKEN}", "acme")
    finally:
        fake.stop()


async def test_the_async_client_sends_its_token_with_every_call() -> None:
    fake = FakeServer().start()
    try:
        async with AsyncRerankerClient(fake.target, token=TOKEN, retry=None) as client:
            await client.rerank("q", ["a", "bb"])
            await client.stream_rerank("q", ["a", "bb", "ccc"], top_n=2, chunk_size=1)
            await client.list_models()
            assert await client.health() == "SERVING"
        assert fake.reranker.attempts == {"Rerank": 1, "StreamRerank": 1, "ListModels": 1, "Check": 1}
        assert [seen["authorization"] for seen in fake.reranker.metadata] == [f"Bearer {TOKEN}"] * 4
    finally:
        fake.stop()
