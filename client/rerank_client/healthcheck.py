"""`python -m rerank_client.healthcheck HOST:PORT`: exit 0 when the server reports SERVING.

For container health checks: it uses only grpcio and protobuf, through the
standard grpc.health.v1 service, which stays open when the server asks for tokens. Against a TLS
port give `--tls` (with `--ca-file` for a private CA, `--cert-file`/`--key-file` for mutual TLS,
and `--server-name` when the certificate does not name the address checked, such as 127.0.0.1).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rerank_client.client import RerankerClient
from rerank_client.credentials import tls_credentials


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rerank_client.healthcheck", description=__doc__)
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="server address")
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument("--tls", action="store_true", help="the port speaks TLS")
    parser.add_argument("--ca-file", help="PEM CA of the server's certificate (default: system roots)")
    parser.add_argument("--cert-file", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--key-file", help="PEM key of --cert-file")
    parser.add_argument("--server-name", help="the name the server's certificate holds")
    args = parser.parse_args(argv)
    tls = args.tls or any((args.ca_file, args.cert_file, args.key_file, args.server_name))
    try:
        credentials = tls_credentials(args.ca_file, args.cert_file, args.key_file) if tls else None
        options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
        with RerankerClient(args.target, credentials=credentials, retry=None, options=options) as client:
            status = client.health(args.service, timeout=args.timeout)
    except Exception as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
