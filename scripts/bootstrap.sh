#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the given extras.
# torch comes first and pinned, so pip never swaps in another build:
#   CPU (default): TORCH_SPEC=torch==2.13.0
#   GPU: TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128 (pick your CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-server}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if [[ ",$extras," == *",server,"* ]]; then
  torch_args=("${TORCH_SPEC:-torch==2.13.0}")
  if [ -n "${TORCH_INDEX:-}" ]; then torch_args+=(--index-url "$TORCH_INDEX"); fi
  .venv/bin/python -m pip install --quiet "${torch_args[@]}"
fi
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
