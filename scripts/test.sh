#!/usr/bin/env bash
# Install the server and the test tools into .venv, then run the checks and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh server,test,tracing
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRPC_VERBOSITY=${GRPC_VERBOSITY:-ERROR}
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy client/rerank_client server/rerank_server
.venv/bin/python -m pytest "$@"
