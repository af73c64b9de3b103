#!/usr/bin/env bash
# Set up (if needed) and run the demo pipeline on photos shipped with scikit-image: no downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec bash pipelines/demo/run.sh "$@"
