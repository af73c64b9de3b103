#!/usr/bin/env bash
# The one-shot GPU check (pipelines/bench/gpu_check.py says what it measures): one JSON in --out.
#   bash pipelines/bench/gpu_check.sh [--out runs/gpu_check] [--tiny] [--dry-run] [--budget-s 420]
# Python: $PYTHON, else .venv/bin/python, else python3. On a GPU machine without network whose image holds
# PyTorch: run pipelines/bench/gpu_wheels.sh where pip works and bring .whl/ along; its wheels are installed
# into a scratch folder here first, unless this Python has the project's packages already (docs/benchmarks.md,
# "Running it on a machine without network").
set -euo pipefail
export MDCACHE_CHECK_T0=$(date +%s.%N)  # --budget-s counts from here: the install and start-up are in it
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if compgen -G ".whl/*.whl" > /dev/null && ! "$PY" -c "import open_clip, webdataset, zarr, numcodecs" 2> /dev/null; then
  SITE=$(mktemp -d /tmp/mdcache-site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || {
    echo "gpu_check: the wheels in .whl/ do not install with $("$PY" -V 2>&1) (made for another Python?):" \
         "bash pipelines/bench/gpu_wheels.sh --python-version X.Y where pip works, or remove .whl/" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" pipelines/bench/gpu_check.py "$@"
