#!/usr/bin/env bash
# The demo pipeline, end to end on a laptop CPU in minutes:
#   1. build a small real-image WebDataset set from photos bundled with scikit-image
#   2. mdcache extract with the MaskDistill teacher architecture (CLIP ViT-B/16). No weights can be
#      downloaded here, so the demo uses RANDOM teacher weights and says so; pass WEIGHTS=path/to/
#      ViT-B-16 checkpoint to use real ones.
#   3. mdcache info + verify (checksums and the teacher re-run on replayed views)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
DATA=$OUT/data
CACHE_ROOT=$OUT/cache
TEACHER=${TEACHER:-clip-b16}
if [ -n "${WEIGHTS:-}" ]; then TEACHER_ARGS=(--weights "$WEIGHTS"); else TEACHER_ARGS=(--random-init); fi

echo "== 1/3 demo data (scikit-image photos -> WebDataset shards in $DATA)"
$PY pipelines/demo/make_data.py --out "$DATA"

echo "== 2/3 mdcache extract --teacher $TEACHER ${TEACHER_ARGS[*]}"
CACHE=$($PY -m mdcache extract --teacher "$TEACHER" "${TEACHER_ARGS[@]}" \
    --source "$DATA/train-{000000..000003}.tar" --cache "$CACHE_ROOT" \
    --views 2 --codec int8 --batch-size 16 --calib-images 16 --workers 1 | tail -n 1)
echo "cache: $CACHE"

echo "== 3/3 mdcache info / verify"
$PY -m mdcache info "$CACHE"
$PY -m mdcache verify "$CACHE" --teacher-check 4 ${WEIGHTS:+--weights "$WEIGHTS"}
$PY -m mdcache ls "$CACHE_ROOT"
echo "demo done: cache at $CACHE"
