#!/usr/bin/env bash
# Create .venv and install ramgpt into it (CPU torch 2.13.0 unless torch is already there).
# Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned, so the project's range is already satisfied and nothing pulls a CUDA
# build; a machine with its own CUDA torch in the venv keeps it.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then
  python -m pip install -q -e ".[dev]"
else
  python -m pip install -q -e .
fi
