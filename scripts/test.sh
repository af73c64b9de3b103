#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The FFCV path is part of the suite: a missing ffcv fails the run instead of skipping its tests.
if ! .venv/bin/python -c "import ffcv" 2>/dev/null; then
  echo "test: ffcv is not importable in .venv (scripts/setup.sh installs it after libturbojpeg0-dev, libopencv-dev," \
       "pkg-config); the FFCV tests cannot run" >&2
  exit 1
fi
.venv/bin/ruff check mdcache mdtrain tests scripts pipelines docs/examples
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
