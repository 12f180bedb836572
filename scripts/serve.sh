#!/usr/bin/env bash
# Install the server into .venv and run it; arguments go to rerank-server (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh server
exec .venv/bin/rerank-server "$@"
