"""TLS of the gRPC port: the server's credentials from PEM files, checked before anything starts."""

from __future__ import annotations

from pathlib import Path

import grpc


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """None (plaintext) without a certificate; TLS with `cert` and `key`; mutual TLS with
    `client_ca` too (clients must present a certificate it signed). Arguments are file paths ("" =
    not given); ValueError says which one is missing, unreadable or not PEM."""
    if not cert:
        if key:
            raise ValueError("--tls-key needs --tls-cert")
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not key:
        raise ValueError("--tls-cert needs --tls-key")
    chain = _read_pem(cert, "--tls-cert", "CERTIFICATE")
    private_key = _read_pem(key, "--tls-key", "PRIVATE KEY")
    roots = _read_pem(client_ca, "--tls-client-ca", "CERTIFICATE") if client_ca else None
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


def _read_pem(path: str, flag: str, label: str) -> bytes:
    """The file's bytes, once they look like PEM holding a `label` block (gRPC itself would fail
    only at the first handshake, or with a message that names no file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {flag} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data or f"{label}-----".encode() not in data:
        raise ValueError(f"{flag} {path} is not a PEM file with a {label}")
    return data
