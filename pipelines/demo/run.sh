#!/usr/bin/env bash
# The demo: MaskDistill from a cache, end to end on a laptop CPU in about ten minutes, on real labelled
# photos installed offline (Fashion-MNIST, 10 classes of clothes, Debian's dataset-fashion-mnist):
#   1. shuffled WebDataset shards: TRAIN_SIZE training images (the students' only data), VAL_SIZE validation
#      images (finetune checkpoint selection) and TEST_SIZE test images (every number printed)
#   2. the teacher: a small ViT (7x7 patches of 4 px, width 128, depth 4) trained supervised on 55,000 other
#      Fashion-MNIST training images by pipelines/study/run.py, shipped in pipelines/demo/teacher/ (its
#      training record beside it); TEACHER=train trains one here instead (about 40 minutes on 2 cores)
#   3. mdcache extract: the teacher runs ONCE over VIEWS views per image (int8); info, verify, show
#   4. mdtrain pretrain: a student of the same shape distils the cached targets, no teacher in memory; the
#      same student before any step (--stop-after 0) is the random-init baseline
#   5. linear probe and k-NN of the random-init student, the distilled student and the teacher; then the
#      distilled student and the same model from scratch, finetuned for the same epochs on the same labels
# Every size is a variable, e.g. TRAIN_SIZE=400 PT_EPOCHS=1 FT_EPOCHS=1 bash pipelines/demo/run.sh
# The full comparison (K stored views vs a fresh crop every epoch, seeds, intervals) is pipelines/study/run.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
TRAIN_SIZE=${TRAIN_SIZE:-2000}
VAL_SIZE=${VAL_SIZE:-1000}
TEST_SIZE=${TEST_SIZE:-2000}
VIEWS=${VIEWS:-2}
PT_EPOCHS=${PT_EPOCHS:-40}
FT_EPOCHS=${FT_EPOCHS:-15}
WORKERS=${WORKERS:-0}      # 28 px images: loading in the training process is fastest on 2 cores
SEED=${SEED:-0}            # views, student init, masks, data order, finetunes: SEED=1 OUT=runs/demo-1 for another run
TEACHER=${TEACHER:-pipelines/demo/teacher/fmnist-vit.safetensors}
DATA=$OUT/data-$TRAIN_SIZE-$VAL_SIZE-$TEST_SIZE   # kept between runs; everything else is made afresh
MODEL=vit_tiny_patch16_224
ARGS=(img_size=28 patch_size=4 embed_dim=128 depth=4 num_heads=4)
flags() { local f=$1; shift; for kv in "$@"; do printf '%s\n%s\n' "$f" "$kv"; done; }
mapfile -t MODEL_ARGS < <(flags --model-arg "${ARGS[@]}")
mapfile -t STUDENT_ARGS < <(flags --student-arg "${ARGS[@]}")
last_json() { tail -n 1 | $PY -c "import json, sys; print(json.load(sys.stdin)['$1'])"; }
SECONDS=0

echo "== 1/5 data: Fashion-MNIST, $TRAIN_SIZE train + $VAL_SIZE validation + $TEST_SIZE test images -> $DATA"
if [ ! -f "$DATA/classes.json" ]; then
  $PY pipelines/study/make_data.py --out "$DATA" --train-size "$TRAIN_SIZE" --val-size "$VAL_SIZE" \
      --test-size "$TEST_SIZE" --shard-size $(( (TRAIN_SIZE + 7) / 8 ))
fi
TRAIN=$(ls "$DATA"/train-*.tar | paste -sd,)  # comma-separated lists of shards
VAL=$(ls "$DATA"/val-*.tar | paste -sd,)
TEST=$(ls "$DATA"/test-*.tar | paste -sd,)

echo "== 2/5 teacher: $TEACHER"
if [ "$TEACHER" = train ]; then  # the study's own teacher recipe, on its 55,000 images
  TEACHER=$($PY pipelines/study/run.py --out "$OUT/study" --only-teacher | tail -n 1)
fi
if [ ! -f "$TEACHER" ]; then
  echo "error: no teacher weights at $TEACHER (TEACHER=train trains the study's teacher here)" >&2; exit 1
fi
TEACHER_TOP1=$($PY -m mdtrain eval --weights "$TEACHER" --val "$TEST" --workers "$WORKERS" | last_json top1)

echo "== 3/5 mdcache extract --teacher timm:$MODEL (the teacher runs once: $VIEWS views per image, int8)"
CACHE=$($PY -m mdcache extract --teacher "timm:$MODEL" --teacher-weights "$TEACHER" --source "$TRAIN" \
    --root "$OUT/cache" --image-size 28 --views "$VIEWS" --crop-scale 0.6 1.0 --color-jitter 0 --codec int8 \
    --batch-size 256 --workers "$WORKERS" --seed "$SEED" | tail -n 1)
echo "cache: $CACHE"
$PY -m mdcache info "$CACHE"
$PY -m mdcache verify "$CACHE" --teacher-check 8 --teacher-weights "$TEACHER"
$PY -m mdcache show "$CACHE" --out "$OUT/views.png" --n 4 --teacher-weights "$TEACHER"  # views, masks, targets

echo "== 4/5 mdtrain pretrain: the student distils the cached targets for $PT_EPOCHS epochs (no teacher in memory)"
PRETRAIN=(--cache "$CACHE" --student "$MODEL" "${STUDENT_ARGS[@]}" --batch-size 64 --lr 1e-3 --workers "$WORKERS"
          --seed "$SEED" --no-progress)
rm -rf "$OUT/random-init" "$OUT/pretrain" "$OUT/finetune" "$OUT/scratch"
$PY -m mdtrain pretrain "${PRETRAIN[@]}" --out "$OUT/random-init" --epochs 1 --warmup-epochs 0 --stop-after 0 >/dev/null
$PY -m mdtrain pretrain "${PRETRAIN[@]}" --out "$OUT/pretrain" --epochs "$PT_EPOCHS" \
    --warmup-epochs $(( PT_EPOCHS > 8 ? PT_EPOCHS / 8 : 0 )) --log-every 50

echo "== 5/5 frozen features (linear probe, k-NN), then finetuning: distilled vs from scratch, $FT_EPOCHS epochs each"
probe() { $PY -m mdtrain linprobe --weights "$1" --train "$TRAIN" --val "$TEST" --crop-pct 1 --workers "$WORKERS" | last_json top1; }
knn() { $PY -m mdtrain knn --weights "$1" --train "$TRAIN" --val "$TEST" --crop-pct 1 --workers "$WORKERS" | last_json top1; }
LP_RANDOM=$(probe "$OUT/random-init/student.safetensors")
LP_STUDENT=$(probe "$OUT/pretrain/student.safetensors")
LP_TEACHER=$(probe "$TEACHER")
KNN_RANDOM=$(knn "$OUT/random-init/student.safetensors")
KNN_STUDENT=$(knn "$OUT/pretrain/student.safetensors")
KNN_TEACHER=$(knn "$TEACHER")
finetune() {  # $1: output folder, then --init PATH or nothing (from scratch); the same recipe either way
  local out=$1; shift
  $PY -m mdtrain finetune "$@" --model "$MODEL" "${MODEL_ARGS[@]}" --image-size 28 --train "$TRAIN" --val "$VAL" \
      --out "$out" --epochs "$FT_EPOCHS" --batch-size 64 --lr 1e-3 --drop-path 0.1 --aa none --reprob 0 --mixup 0 \
      --cutmix 0 --crop-scale 0.6 1.0 --crop-pct 1 --color-jitter 0 --workers "$WORKERS" --seed "$SEED" --log-every 0 \
      | tail -n 1
  $PY -m mdtrain eval --weights "$out/best.safetensors" --val "$TEST" --workers "$WORKERS" | last_json top1
}
FT=$(finetune "$OUT/finetune" --init "$OUT/pretrain/student.safetensors" --layer-decay 0.75 | tail -n 1)
SCRATCH=$(finetune "$OUT/scratch" --layer-decay 1.0 | tail -n 1)

printf '\n%-44s %s\n' "Fashion-MNIST test split ($TEST_SIZE images)" "top-1 %"
printf '%-44s %6.2f\n' "teacher as a classifier" "$TEACHER_TOP1" \
    "linear probe, random-init student" "$LP_RANDOM" "linear probe, distilled student" "$LP_STUDENT" \
    "linear probe, teacher" "$LP_TEACHER" \
    "k-NN, random-init student" "$KNN_RANDOM" "k-NN, distilled student" "$KNN_STUDENT" "k-NN, teacher" "$KNN_TEACHER" \
    "finetuned, distilled student ($FT_EPOCHS epochs)" "$FT" "finetuned, from scratch ($FT_EPOCHS epochs)" "$SCRATCH"
echo "demo done in $(( SECONDS / 60 )) min $(( SECONDS % 60 )) s: cache $CACHE (pictured in $OUT/views.png)," \
     "student $OUT/pretrain/student.safetensors, finetuned $OUT/finetune/best.safetensors"
