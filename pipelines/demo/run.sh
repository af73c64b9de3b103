#!/usr/bin/env bash
# The demo pipeline, end to end on a laptop CPU in minutes:
#   1. build a small real-image WebDataset set from photos bundled with scikit-image
#   2. mdcache extract with the MaskDistill teacher architecture (CLIP ViT-B/16). No weights can be
#      downloaded here, so the demo uses RANDOM teacher weights and says so; pass WEIGHTS=path/to/
#      ViT-B-16 checkpoint to use real ones.
#   3. mdcache info + verify (checksums and the teacher re-run on replayed views)
#   4. mdtrain pretrain: a ViT-Tiny student distils the cached targets (no teacher in memory)
#   5. mdtrain knn on the frozen student, mdtrain finetune (BEiT v2 recipe, short), mdtrain eval
# The numbers are a smoke signal on 10 classes x 12 photos, not a result: see docs/ for real recipes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
DATA=$OUT/data
CACHE_ROOT=$OUT/cache
TEACHER=${TEACHER:-clip-b16}
if [ -n "${WEIGHTS:-}" ]; then TEACHER_ARGS=(--weights "$WEIGHTS"); else TEACHER_ARGS=(--random-init); fi

echo "== 1/5 demo data (scikit-image photos -> WebDataset shards in $DATA)"
$PY pipelines/demo/make_data.py --out "$DATA"

echo "== 2/5 mdcache extract --teacher $TEACHER ${TEACHER_ARGS[*]}"
CACHE=$($PY -m mdcache extract --teacher "$TEACHER" "${TEACHER_ARGS[@]}" \
    --source "$DATA/train-{000000..000003}.tar" --cache "$CACHE_ROOT" \
    --views 2 --codec int8 --batch-size 16 --calib-images 16 --workers 1 | tail -n 1)
echo "cache: $CACHE"

echo "== 3/5 mdcache info / verify"
$PY -m mdcache info "$CACHE"
$PY -m mdcache verify "$CACHE" --teacher-check 4 ${WEIGHTS:+--weights "$WEIGHTS"}
$PY -m mdcache ls "$CACHE_ROOT"

STUDENT=${STUDENT:-vit_tiny_patch16_224}
echo "== 4/5 mdtrain pretrain --student $STUDENT (from the cache)"
$PY -m mdtrain pretrain --cache "$CACHE" --student "$STUDENT" --out "$OUT/pretrain" \
    --epochs "${PT_EPOCHS:-4}" --warmup-epochs 1 --batch-size 16 --blr 1.5e-4 --workers 1 --log-every 2

echo "== 5/5 mdtrain knn / finetune / eval"
$PY -m mdtrain knn --weights "$OUT/pretrain/student.safetensors" \
    --train "$DATA/train-{000000..000003}.tar" --val "$DATA/val-000000.tar" --workers 1
$PY -m mdtrain finetune --init "$OUT/pretrain/student.safetensors" --model "$STUDENT" \
    --train "$DATA/train-{000000..000003}.tar" --val "$DATA/val-000000.tar" --out "$OUT/finetune" \
    --epochs "${FT_EPOCHS:-3}" --warmup-epochs 1 --batch-size 16 --blr 2e-3 --workers 1
$PY -m mdtrain eval --weights "$OUT/finetune/best.safetensors" --val "$DATA/val-000000.tar" --workers 1
echo "demo done: cache $CACHE, pretrained student $OUT/pretrain/student.safetensors, finetuned $OUT/finetune/"
