#!/usr/bin/env bash
# SLURM array job: every task extracts into the SAME shared cache. Shard claims in the cache make the
# tasks cooperate (each shard is computed once; a task that dies has its shards taken over when its
# claim expires), so the array can have any size and tasks can be re-queued freely.
#
#   IMAGENET=s3://bucket/imagenet CACHE_ROOT=s3://bucket/mdcache CLIP_WEIGHTS=s3://bucket/weights/ViT-B-16.safetensors \
#   TASKS=16 GPUS_PER_TASK=4 bash pipelines/imagenet/slurm_extract.sh [--dry-run]
#
# --dry-run prints the batch script and the sbatch command instead of submitting.
set -euo pipefail
DRY_RUN=0; [ "${1:-}" = "--dry-run" ] && DRY_RUN=1
IMAGENET=${IMAGENET:?set IMAGENET to the folder or bucket holding train-000000.tar ... train-001023.tar}
CACHE_ROOT=${CACHE_ROOT:?set CACHE_ROOT, e.g. s3://team-bucket/mdcache}
CLIP_WEIGHTS=${CLIP_WEIGHTS:?set CLIP_WEIGHTS to the OpenAI ViT-B-16 open_clip weights (path or URL)}
TASKS=${TASKS:-16}
GPUS_PER_TASK=${GPUS_PER_TASK:-4}
CPUS_PER_TASK=${CPUS_PER_TASK:-$((GPUS_PER_TASK * 8))}
VIEWS=${VIEWS:-8}
PARTITION=${PARTITION:-gpu}
TIME=${TIME:-12:00:00}
VENV=${VENV:-$PWD/.venv}
LOGS=${LOGS:-runs/slurm}

script=$(cat <<SCRIPT
#!/usr/bin/env bash
#SBATCH --job-name=mdcache-extract
#SBATCH --array=0-$((TASKS - 1))
#SBATCH --partition=$PARTITION
#SBATCH --nodes=1
#SBATCH --gpus-per-task=$GPUS_PER_TASK
#SBATCH --cpus-per-task=$CPUS_PER_TASK
#SBATCH --time=$TIME
#SBATCH --requeue
#SBATCH --output=$LOGS/extract-%A_%a.log
set -euo pipefail
source "$VENV/bin/activate"
export HF_HUB_OFFLINE=1
# Every task runs the same command: the claims decide who computes which shard.
torchrun --standalone --nproc-per-node $GPUS_PER_TASK -m mdcache extract --teacher clip-b16 \\
    --teacher-weights "$CLIP_WEIGHTS" --source "$IMAGENET/train-{000000..001023}.tar" --root "$CACHE_ROOT" \\
    --views $VIEWS --codec int8 --batch-size 128 --workers $((CPUS_PER_TASK / GPUS_PER_TASK - 1))
SCRIPT
)
if [ "$DRY_RUN" = 1 ]; then
  echo "# sbatch script (submitted with: sbatch <this script>)"
  echo "$script"
  exit 0
fi
mkdir -p "$LOGS"
echo "$script" | sbatch
