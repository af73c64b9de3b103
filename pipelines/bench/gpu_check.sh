#!/usr/bin/env bash
# The one-shot GPU check (pipelines/bench/gpu_check.py says what it measures): one JSON in --out.
#   bash pipelines/bench/gpu_check.sh [--out runs/gpu_check] [--tiny] [--dry-run]
# On a GPU machine without network: carry .venv along, or install the wheels first (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" pipelines/bench/gpu_check.py "$@"
