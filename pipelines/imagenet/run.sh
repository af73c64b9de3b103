#!/usr/bin/env bash
# The real recipe: MaskDistill ViT-B/16 from CLIP ViT-B/16 on ImageNet-1k, through a shared cache.
# Not run in CI (needs GPUs, ImageNet in WebDataset shards, and the OpenAI CLIP weights).
#
#   IMAGENET=s3://bucket/imagenet CACHE_ROOT=s3://bucket/mdcache CLIP_WEIGHTS=/path/ViT-B-16.safetensors \
#   GPUS=8 bash pipelines/imagenet/run.sh [--dry-run]
#
# --dry-run prints every command instead of running it. On SLURM: slurm_extract.sh (an array job of
# cooperating extractors) and slurm_pretrain.sh (multi-node torchrun), both with --dry-run too.
#
# Defaults follow docs/method.md: 300 epochs, batch 2048 (lr 1.5e-3), 75/196 block masking,
# Smooth-L1, LayerNorm targets from the last block (tap final), ColorJitter 0.4 stored per view;
# a BEiT v2 student (relative position bias, LayerScale 0.1), AdamW betas 0.9/0.98, no drop path;
# finetune 100 epochs, lr 5e-4 at batch 1024, layer decay 0.65, mean pooling.
# The tap is an open question: settle it first with the study on an ImageNet subset, once per tap,
#   python pipelines/study/run.py --data IMAGENET100_SHARDS --teacher clip-b16 --teacher-weights "$CLIP_WEIGHTS" \
#       --tap ln_post --image-size 224 --model vit_base_patch16_224 --model-args "" --out runs/study-ln_post
set -euo pipefail
DRY_RUN=0; [ "${1:-}" = "--dry-run" ] && DRY_RUN=1
run() { if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }  # dry run: paste-able
IMAGENET=${IMAGENET:?set IMAGENET to the folder or bucket holding train-000000.tar ... train-001023.tar and val-000000.tar ... val-000063.tar}
CACHE_ROOT=${CACHE_ROOT:?set CACHE_ROOT, e.g. s3://team-bucket/mdcache}
CLIP_WEIGHTS=${CLIP_WEIGHTS:?set CLIP_WEIGHTS to a local or fsspec path of the OpenAI ViT-B-16 open_clip weights}
GPUS=${GPUS:-8}
VIEWS=${VIEWS:-8}            # stored views per image: more views = less overfitting to the cache, more bytes
OUT=${OUT:-runs/imagenet}
TRAIN="$IMAGENET/train-{000000..001023}.tar"
VAL="$IMAGENET/val-{000000..000063}.tar"

# 1. Teacher targets, once for the whole team (resumable; run it on several machines at once if you like).
run torchrun --nproc-per-node "$GPUS" -m mdcache extract --teacher clip-b16 --teacher-weights "$CLIP_WEIGHTS" \
    --source "$TRAIN" --root "$CACHE_ROOT" --views "$VIEWS" --codec int8 --batch-size 128 --workers 8
if [ "$DRY_RUN" = 1 ]; then
  CACHE="$CACHE_ROOT/<cache-id>"
else  # all shards committed: the same command prints the cache URL at once
  CACHE=$(python -m mdcache extract --teacher clip-b16 --teacher-weights "$CLIP_WEIGHTS" --source "$TRAIN" \
      --root "$CACHE_ROOT" --views "$VIEWS" --codec int8 | tail -n 1)
fi
run python -m mdcache verify "$CACHE" --teacher-check 256 --teacher-weights "$CLIP_WEIGHTS"

# 2. Pretrain (2048 = 8 GPUs x 256).
run torchrun --nproc-per-node "$GPUS" -m mdtrain pretrain --cache "$CACHE" --student beitv2_base_patch16_224 \
    --epochs 300 --batch-size $((2048 / GPUS)) --warmup-epochs 10 \
    --workers 10 --local-cache /tmp/mdcache-local --out "$OUT/pretrain"

# 3. Quick signal, then finetune (BEiT v2 recipe) and evaluate.
run python -m mdtrain knn --weights "$OUT/pretrain/student.safetensors" --train "$TRAIN" --val "$VAL"
run torchrun --nproc-per-node "$GPUS" -m mdtrain finetune --init "$OUT/pretrain/student.safetensors" \
    --model beitv2_base_patch16_224 --train "$TRAIN" --val "$VAL" --epochs 100 --warmup-epochs 20 \
    --batch-size $((1024 / GPUS)) --layer-decay 0.65 --drop-path 0.1 --out "$OUT/finetune"
run torchrun --nproc-per-node "$GPUS" -m mdtrain eval --weights "$OUT/finetune/best.safetensors" --val "$VAL"
