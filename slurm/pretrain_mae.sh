#!/bin/bash
# MAE pre-training of the DeiT-B student's encoder on the long-tailed training split, LiVT's
# settings: `deitlt pretrain recipes/mae_${DATASET}_b.yaml`.
#   DATASET=imagenetlt   224 px, 400 epochs, global batch 4096 (4 GPUs x 128 x accumulation 8)
#   DATASET=inat18       128 px, 800 epochs, global batch 3072 (4 GPUs x 192 x accumulation 4)
#
#   sbatch slurm/pretrain_mae.sh [section.key=value ...]
#   DATASET=inat18 sbatch slurm/pretrain_mae.sh
#   DRY_RUN=1 sbatch slurm/pretrain_mae.sh                  # build, print the layout, exit 0
# then the student from it (its position embeddings resampled to the student's size):
#   sbatch slurm/imagenetlt_deitlt_b.sh train.init_from=runs/mae_imagenetlt_b:latest
#
# Environment [default]:
#   DATASET        imagenetlt | inat18 [imagenetlt]
#   RECIPE         [recipes/mae_${DATASET}_b.yaml]
#   DATA           shard directory -> data.shards [the recipe's]
#   RUN_DIR        run directory -> runtime.run_dir; resubmitting with it resumes [the recipe's]
#   NODES          nodes to launch on [the job's]
#   GPUS_PER_NODE  processes per node, one per GPU [the job's --ntasks-per-node]
#   DEVICE         cpu | cuda -> runtime.device, data.device [the recipe's]
#   MLFLOW_TRACKING_URI  [SQLite in the run directory]
#   PYTHON         [the repository's .venv/bin/python if present, else python3]
#   DRY_RUN=1      pass --dry-run            DEITLT_HOME   the repository [the submit directory]
#   DEITLT_SETUP   file sourced first (modules, NCCL variables)   MAX_RESTARTS  [100]
# On another GPU count keep micro_batch x grad_accum x GPUs at the recipe's global batch.
# See docs/pretraining.md and docs/cluster.md.
#
#SBATCH --job-name=deitlt-pretrain-mae
#SBATCH --nodes=1                  # the recipes' global batch assumes 4 GPUs in all
#SBATCH --gpus-per-node=4
#SBATCH --ntasks-per-node=4        # = gpus-per-node: one process per GPU, started by srun
#SBATCH --cpus-per-task=16         # DALI decode and crop threads (data.num_threads=8) and more
#SBATCH --time=24:00:00            # one allocation; the run continues across requeues
#SBATCH --signal=USR1@600          # tasks (no B:) get USR1 10 min before the limit: save, exit 75
#SBATCH --requeue                  # exit 75 -> scontrol requeue (also after a node failure)
#SBATCH --open-mode=append         # requeued attempts append to the same log
#SBATCH --output=%x-%j.out

# SLURM runs a spool copy of this file, so find the repository from DEITLT_HOME or the submit dir.
for DEITLT_HOME in "${DEITLT_HOME:-}" "${SLURM_SUBMIT_DIR:-$PWD}" "${SLURM_SUBMIT_DIR:-$PWD}/.." "$(dirname "$0")/.."; do
  [[ -f $DEITLT_HOME/slurm/common.sh ]] && break
done
# shellcheck source=slurm/common.sh
source "$DEITLT_HOME/slurm/common.sh" || { echo "deitlt[slurm]: error: set DEITLT_HOME to the repository" >&2; exit 2; }
deitlt_init

DATASET=${DATASET:-imagenetlt}
[[ $DATASET == imagenetlt || $DATASET == inat18 ]] || deitlt_die "DATASET=$DATASET: use imagenetlt or inat18"
RECIPE=${RECIPE:-recipes/mae_${DATASET}_b.yaml}
[[ -f $RECIPE ]] || deitlt_die "RECIPE=$RECIPE does not exist"
deitlt_run srun --kill-on-bad-exit=0 --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" \
  "$PYTHON" -m deitlt_scale.cli pretrain "$RECIPE" "${DEITLT_OVERRIDES[@]}" "$@" "${DEITLT_FLAGS[@]}"
