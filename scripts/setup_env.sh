#!/usr/bin/env bash
# Create (or reuse) .venv and install the project; source it to get the venv's python on PATH.
# torch is pinned to the CPU build found on this machine's disk (a bare "torch" pulls a CUDA build).
# Usage: source scripts/setup_env.sh [extras]   e.g. extras=data,test
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_extras="${1:-data}"
if [ ! -x "$_root/.venv/bin/python" ]; then
    python3 -m venv "$_root/.venv"
fi
# shellcheck disable=SC1091
source "$_root/.venv/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e "$_root[$_extras]"
set +eu
