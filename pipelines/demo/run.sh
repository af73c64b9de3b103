#!/usr/bin/env bash
# The demo pipeline, end to end on a laptop CPU in minutes, on real labelled photos installed offline
# (Fashion-MNIST, 10 classes of clothes, from Debian's dataset-fashion-mnist package):
#   1. shuffled WebDataset shards of a train and a test subset
#   2. a teacher: a small ViT (7x7 patches of 4 px, width 128, depth 4) trained supervised with
#      `mdtrain finetune` from scratch; no weights are downloaded anywhere
#   3. mdcache extract: the teacher runs ONCE over VIEWS augmented views per image; info, verify, and
#      show (a picture of the stored views, masks, targets and their fidelity: OUT/views.png)
#   4. mdtrain pretrain: a student of the same shape distils the cached targets (no teacher in memory);
#      the same student before any step (--stop-after 0) is the random-init floor
#   5. mdtrain knn on the frozen random-init student, distilled student and teacher; a short finetune
#      of the distilled student and mdtrain eval
# It ends with the numbers that matter side by side. Every size is a variable, e.g.
#   TRAIN_SIZE=500 TEST_SIZE=300 TEACHER_EPOCHS=1 PT_EPOCHS=1 FT_EPOCHS=1 bash pipelines/demo/run.sh
# The full comparison (K stored views vs a fresh crop every epoch, codecs, seeds) is pipelines/study/run.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
TRAIN_SIZE=${TRAIN_SIZE:-4000}
TEST_SIZE=${TEST_SIZE:-1000}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-6}
DATA=$OUT/data-$TRAIN_SIZE-$TEST_SIZE         # kept between runs, like the teacher of these sizes and epochs;
TEACHER_DIR=$OUT/teacher-$TRAIN_SIZE-e$TEACHER_EPOCHS  # the students below are trained afresh every run
VIEWS=${VIEWS:-2}
WORKERS=${WORKERS:-1}
MODEL=vit_tiny_patch16_224
ARGS=(img_size=28 patch_size=4 embed_dim=128 depth=4 num_heads=4)
flags() { local f=$1; shift; for kv in "$@"; do printf '%s\n%s\n' "$f" "$kv"; done; }
mapfile -t MODEL_ARGS < <(flags --model-arg "${ARGS[@]}")
mapfile -t STUDENT_ARGS < <(flags --student-arg "${ARGS[@]}")
mapfile -t TEACHER_ARGS < <(flags --teacher-arg "${ARGS[@]}" global_pool=avg)
warmup() { if [ "$1" -gt 1 ]; then echo 1; else echo 0; fi; }  # one warmup epoch, unless there is only one
last_json() { tail -n 1 | $PY -c "import json, sys; print(json.load(sys.stdin)['$1'])"; }

echo "== 1/5 data: Fashion-MNIST, $TRAIN_SIZE train + $TEST_SIZE test images -> shuffled shards in $DATA"
if [ ! -f "$DATA/classes.json" ]; then
  $PY pipelines/study/make_data.py --out "$DATA" --train-size "$TRAIN_SIZE" --test-size "$TEST_SIZE" \
      --shard-size $(( (TRAIN_SIZE + 3) / 4 ))
fi
TRAIN=$(ls "$DATA"/train-*.tar | paste -sd,)  # a comma-separated list of shards
TEST=$(ls "$DATA"/test-*.tar | paste -sd,)

echo "== 2/5 teacher: a small ViT trained supervised from scratch (mdtrain finetune)"
if [ ! -f "$TEACHER_DIR/best.safetensors" ]; then
  $PY -m mdtrain finetune --model "$MODEL" "${MODEL_ARGS[@]}" --image-size 28 --train "$TRAIN" --val "$TEST" \
      --out "$TEACHER_DIR" --epochs "$TEACHER_EPOCHS" --warmup-epochs "$(warmup "$TEACHER_EPOCHS")" --batch-size 64 --lr 1e-3 \
      --layer-decay 1.0 --aa none --reprob 0 --mixup 0 --cutmix 0 --drop-path 0.1 --global-pool avg \
      --crop-scale 0.35 1.0 --color-jitter 0 --workers "$WORKERS" --resume auto | tail -n 1
fi
TEACHER_W="$TEACHER_DIR/best.safetensors"

echo "== 3/5 mdcache extract --teacher timm:$MODEL (the teacher runs once: $VIEWS views per image, int8)"
CACHE=$($PY -m mdcache extract --teacher "timm:$MODEL" "${TEACHER_ARGS[@]}" --weights "$TEACHER_W" \
    --source "$TRAIN" --cache "$OUT/cache" --image-size 28 --views "$VIEWS" --codec int8 \
    --batch-size 64 --workers "$WORKERS" | tail -n 1)
echo "cache: $CACHE"
$PY -m mdcache info "$CACHE"
$PY -m mdcache verify "$CACHE" --teacher-check 8 --weights "$TEACHER_W"
$PY -m mdcache show "$CACHE" --out "$OUT/views.png" --n 4 --weights "$TEACHER_W"  # views, masks, targets, fidelity

echo "== 4/5 mdtrain pretrain: the student distils the cached targets (no teacher in memory)"
PRETRAIN=(--cache "$CACHE" --student "$MODEL" "${STUDENT_ARGS[@]}" --batch-size 64 --blr 1.5e-3
          --workers "$WORKERS" --seed 0)
rm -rf "$OUT/random-init" "$OUT/pretrain" "$OUT/finetune"
$PY -m mdtrain pretrain "${PRETRAIN[@]}" --out "$OUT/random-init" --epochs 1 --warmup-epochs 0 --stop-after 0 --no-progress >/dev/null
$PY -m mdtrain pretrain "${PRETRAIN[@]}" --out "$OUT/pretrain" --epochs "${PT_EPOCHS:=4}" \
    --warmup-epochs "$(warmup "$PT_EPOCHS")" \
    --no-progress --log-every 20

echo "== 5/5 mdtrain knn (frozen features), finetune, eval"
knn() { $PY -m mdtrain knn --weights "$1" --train "$TRAIN" --val "$TEST" --workers "$WORKERS" | last_json top1; }
KNN_RANDOM=$(knn "$OUT/random-init/student.safetensors")
KNN_STUDENT=$(knn "$OUT/pretrain/student.safetensors")
KNN_TEACHER=$(knn "$TEACHER_W")
$PY -m mdtrain finetune --init "$OUT/pretrain/student.safetensors" --model "$MODEL" "${MODEL_ARGS[@]}" --image-size 28 --train "$TRAIN" --val "$TEST" \
    --out "$OUT/finetune" --epochs "${FT_EPOCHS:=2}" --warmup-epochs "$(warmup "$FT_EPOCHS")" --batch-size 64 --lr 1e-3 \
    --aa none --reprob 0 --mixup 0 --cutmix 0 --crop-scale 0.35 1.0 --color-jitter 0 --workers "$WORKERS" \
    | tail -n 1
FT=$($PY -m mdtrain eval --weights "$OUT/finetune/best.safetensors" --val "$TEST" --workers "$WORKERS" | last_json top1)
TEACHER_TOP1=$($PY -m mdtrain eval --weights "$TEACHER_W" --val "$TEST" --workers "$WORKERS" | last_json top1)

printf '\n%-34s %s\n' "Fashion-MNIST test split" "top-1 %"
printf '%-34s %6.2f\n' "k-NN, random-init student" "$KNN_RANDOM" "k-NN, distilled student" "$KNN_STUDENT" \
    "k-NN, teacher" "$KNN_TEACHER" "finetuned distilled student" "$FT" "teacher as a classifier" "$TEACHER_TOP1"
echo "demo done: cache $CACHE (pictured in $OUT/views.png), student $OUT/pretrain/student.safetensors," \
     "finetuned $OUT/finetune/best.safetensors"
