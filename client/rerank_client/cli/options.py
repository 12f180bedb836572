"""How the command line's flags and RERANK_CLI_* variables resolve: where the server is, how the channel
is secured, the token, and typed values. Flags override variables; the server's own RERANK_* variables
are never read (RERANK_MODEL, for one, is what a server serves)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from rerank_client import RerankerClient, tls_credentials

ENV_PREFIX = "RERANK_CLI_"
DEFAULT_TARGET = "localhost:50051"


class UsageError(Exception):
    """A flag or environment variable is wrong: reported as argparse reports bad usage (exit 2)."""


@dataclass(frozen=True)
class TlsSettings:
    """How the channel is secured: plaintext, unless TLS is asked for or implied by a TLS file or name."""

    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    @classmethod
    def resolve(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> TlsSettings:
        """The flags of add_tls_arguments, each over its RERANK_CLI_* variable in `environ`."""
        names = ("ca_file", "cert_file", "key_file", "server_name")
        values = {name: getattr(args, name) or env_value(environ, name.upper()) for name in names}
        if args.tls is not None:
            enabled = bool(args.tls)
        else:
            enabled = env_bool(environ, "TLS", default=any(values.values()))
        return cls(enabled, **values)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.enabled:
            return None
        if (self.cert_file is None) != (self.key_file is None):
            raise UsageError("give --cert-file and --key-file together (mutual TLS), or neither")
        try:
            return tls_credentials(self.ca_file, self.cert_file, self.key_file)
        except OSError as error:
            raise UsageError(f"cannot read {error.filename}: {error.strerror}") from None

    def channel_options(self) -> list[tuple[str, str]]:
        return (
            [("grpc.ssl_target_name_override", self.server_name)] if self.enabled and self.server_name else []
        )


def add_tls_arguments(parser: argparse.ArgumentParser, *, environment: bool) -> None:
    """--tls, --ca-file, --cert-file, --key-file, --server-name (shared with the container health check).

    `environment`: the help names the RERANK_CLI_* variable of each (TlsSettings.resolve reads them).
    """

    def env(name: str) -> str:
        return f" (env {ENV_PREFIX}{name})" if environment else ""

    group = parser.add_argument_group("TLS")
    group.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the port speaks TLS; implied by any option below" + env("TLS"),
    )
    group.add_argument(
        "--ca-file",
        metavar="FILE",
        help="PEM CA of the server's certificate (default: system roots)" + env("CA_FILE"),
    )
    group.add_argument(
        "--cert-file", metavar="FILE", help="PEM client certificate, for mutual TLS" + env("CERT_FILE")
    )
    group.add_argument("--key-file", metavar="FILE", help="PEM key of --cert-file" + env("KEY_FILE"))
    group.add_argument(
        "--server-name",
        metavar="NAME",
        help="the name the server's certificate holds, when it does not name the target's host"
        + env("SERVER_NAME"),
    )


@dataclass(frozen=True)
class Connection:
    """Where the server is and what a call presents to it."""

    target: str
    tls: TlsSettings
    token: str | None = field(default=None, repr=False)  # a secret: never printed

    @classmethod
    def resolve(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> Connection:
        target = args.target or env_value(environ, "TARGET") or DEFAULT_TARGET
        return cls(target, TlsSettings.resolve(args, environ), _token(args, environ))

    def open(self, *, retry: bool = True) -> RerankerClient:
        """A client of the server; `retry=False` answers at once (health reports the state now)."""
        options: dict[str, Any] = {} if retry else {"retry": None}
        try:
            return RerankerClient(
                self.target,
                credentials=self.tls.credentials(),
                token=self.token,
                options=self.tls.channel_options(),
                **options,
            )
        except ValueError as error:  # a malformed token: the message never quotes it
            raise UsageError(str(error)) from None


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """--token or --token-file, else RERANK_CLI_TOKEN or RERANK_CLI_TOKEN_FILE (not both); None: no token."""
    if args.token is not None:
        return str(args.token)
    if args.token_file is not None:
        return _read_token(args.token_file, "--token-file")
    token, token_file = env_value(environ, "TOKEN"), env_value(environ, "TOKEN_FILE")
    if token is not None and token_file is not None:
        raise UsageError(f"set {ENV_PREFIX}TOKEN or {ENV_PREFIX}TOKEN_FILE, not both")
    return _read_token(token_file, f"{ENV_PREFIX}TOKEN_FILE") if token_file is not None else token


def _read_token(path: str, source: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read the token file {path} ({source}): {error}") from None
    if not token:
        raise UsageError(f"the token file {path} ({source}) is empty")
    return token


def env_value(environ: Mapping[str, str], name: str) -> str | None:
    """RERANK_CLI_<name>; an empty value counts as unset."""
    return environ.get(ENV_PREFIX + name) or None


def env_bool(environ: Mapping[str, str], name: str, *, default: bool) -> bool:
    value = env_value(environ, name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{ENV_PREFIX}{name} must be true or false, not {value!r}")


def env_count(environ: Mapping[str, str], name: str, default: int) -> int:
    value = env_value(environ, name)
    if value is None:
        return default
    try:
        return whole_number(value)
    except argparse.ArgumentTypeError as error:
        raise UsageError(f"{ENV_PREFIX}{name}: {error}") from None


def whole_number(text: str) -> int:
    """A whole number of at least 0 (an argparse type)."""
    try:
        number = int(text)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, not {text!r}")
    return number


def positive_seconds(text: str) -> float:
    """A positive number of seconds (an argparse type)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return seconds
