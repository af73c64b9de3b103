#!/usr/bin/env bash
# SLURM multi-node pretraining with torchrun: one task per node, torchrun starts GPUS_PER_NODE ranks on
# each and they meet at the first node (c10d rendezvous). The student reads the shared cache through a
# per-node --local-cache; `--resume auto` makes a re-queued job continue from OUT/last.ckpt.
#
#   CACHE=s3://bucket/mdcache/<cache-id> NODES=4 GPUS_PER_NODE=8 bash pipelines/imagenet/slurm_pretrain.sh [--dry-run]
#
# --dry-run prints the batch script instead of submitting it.
set -euo pipefail
DRY_RUN=0; [ "${1:-}" = "--dry-run" ] && DRY_RUN=1
CACHE=${CACHE:?set CACHE to the cache directory made by mdcache extract, e.g. s3://team-bucket/mdcache/<cache-id>}
NODES=${NODES:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
BATCH=${BATCH:-2048}
EPOCHS=${EPOCHS:-300}
PARTITION=${PARTITION:-gpu}
TIME=${TIME:-48:00:00}
VENV=${VENV:-$PWD/.venv}
OUT=${OUT:-runs/imagenet/pretrain}
LOGS=${LOGS:-runs/slurm}
WORLD=$((NODES * GPUS_PER_NODE))
if [ $((BATCH % WORLD)) != 0 ]; then
  echo "slurm_pretrain: BATCH=$BATCH is not a multiple of NODES x GPUS_PER_NODE = $WORLD" >&2
  exit 2
fi

script=$(cat <<SCRIPT
#!/usr/bin/env bash
#SBATCH --job-name=mdtrain-pretrain
#SBATCH --partition=$PARTITION
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --cpus-per-task=$((GPUS_PER_NODE * 10))
#SBATCH --time=$TIME
#SBATCH --requeue
#SBATCH --output=$LOGS/pretrain-%j.log
set -euo pipefail
source "$VENV/bin/activate"
export HF_HUB_OFFLINE=1
MASTER=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes $NODES --nproc-per-node $GPUS_PER_NODE --rdzv-backend c10d --rdzv-id "\$SLURM_JOB_ID" \\
    --rdzv-endpoint "\$MASTER:29500" -m mdtrain pretrain --cache "$CACHE" --student beitv2_base_patch16_224 \\
    --epochs $EPOCHS --batch-size $((BATCH / WORLD)) --warmup-epochs 10 --workers 9 \\
    --local-cache /tmp/mdcache-local --out "$OUT" --resume auto
SCRIPT
)
if [ "$DRY_RUN" = 1 ]; then
  echo "# sbatch script (submitted with: sbatch <this script>)"
  echo "$script"
  exit 0
fi
mkdir -p "$LOGS"
echo "$script" | sbatch
