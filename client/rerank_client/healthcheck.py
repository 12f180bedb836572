"""`python -m rerank_client.healthcheck HOST:PORT`: exit 0 when the server reports SERVING.

For container health checks: it uses only grpcio and protobuf, through the
standard grpc.health.v1 service, which stays open when the server asks for tokens. Against a TLS
port give `--tls` (with `--ca-file` for a private CA, `--cert-file`/`--key-file` for mutual TLS,
and `--server-name` when the certificate does not name the address checked, such as 127.0.0.1).
It reads no environment variables: a probe says everything in its command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rerank_client import RerankerClient
from rerank_client.cli.options import TlsSettings, add_tls_arguments


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rerank_client.healthcheck", description=__doc__)
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="server address")
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    add_tls_arguments(parser, environment=False)
    args = parser.parse_args(argv)
    try:
        tls = TlsSettings.resolve(args, environ={})
        with RerankerClient(
            args.target, credentials=tls.credentials(), retry=None, options=tls.channel_options()
        ) as client:
            status = client.health(args.service, timeout=args.timeout)
    except Exception as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
