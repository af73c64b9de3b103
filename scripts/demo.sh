#!/usr/bin/env bash
# Set up (if needed) and run the demo pipeline on Fashion-MNIST (installed offline by setup.sh): no downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec bash pipelines/demo/run.sh "$@"
