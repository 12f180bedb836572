"""What a client presents to a secured server: TLS credentials, and a bearer token on every call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc


def tls_credentials(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files, for `RerankerClient(target, credentials=...)`.

    `ca_file` is the CA that signed the server's certificate (None: the system's trusted roots);
    `cert_file` and `key_file`, given together, are this client's certificate and key, for a server
    that requires mutual TLS (`--tls-client-ca`).
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("give cert_file and key_file together (mutual TLS), or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file),
        certificate_chain=_read(cert_file),
    )


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def call_metadata(metadata: Sequence[tuple[str, str]], token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: the caller's, and `authorization: Bearer <token>` with a token."""
    if token is None:
        return tuple(metadata)
    # The message never quotes the token: it is a secret, and errors end up in logs.
    if not token or not token.isascii() or not token.isprintable() or token != token.strip():
        raise ValueError("token must be printable ASCII, not empty, without surrounding whitespace")
    if any(key.lower() == "authorization" for key, _ in metadata):
        raise ValueError("give the token as token= or as authorization metadata, not both")
    return (*metadata, ("authorization", f"Bearer {token}"))
