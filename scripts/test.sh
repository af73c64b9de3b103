#!/usr/bin/env bash
# Set up (if needed), lint, and run the tests: the fast tier (a few minutes), or with --all every tier
# (end-to-end runs, torchrun, S3, benches; CI runs this form through .ci/run). Other arguments go to pytest.
#   bash scripts/test.sh            # fast tier
#   bash scripts/test.sh --all      # everything
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
tier=()
args=()
for a in "$@"; do
  if [ "$a" = "--all" ]; then tier=(-m "slow or not slow"); else args+=("$a"); fi
done
# --durations: the slowest tests, so that the tiers stay honest
exec .venv/bin/python -m pytest -q -ra --durations=20 "${tier[@]}" "${args[@]}"
