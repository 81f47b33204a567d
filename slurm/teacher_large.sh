#!/bin/bash
# A published CNN teacher for ImageNet-LT / iNaturalist-2018, ResNet-50 on 224 px images:
# `deitlt teacher train recipes/teacher_${METHOD}_${DATASET}.yaml`.
#   METHOD=ldsam  LDAM-DRW + SAM (rho steps 0.05 / 0.1 / 0.5), 90 epochs, global batch 256 (4 x 64)
#   METHOD=paco   PaCo + SAM, 400 epochs, global batch 128 (4 x 32)
#
#   DATASET=inat18 sbatch slurm/teacher_large.sh [section.key=value ...]
#   METHOD=paco DATASET=imagenetlt sbatch slurm/teacher_large.sh
#   DRY_RUN=1 sbatch slurm/teacher_large.sh                  # build, print the layout, exit 0
#
# Environment [default]:
#   METHOD         ldsam | paco [ldsam]
#   DATASET        imagenetlt | inat18 [imagenetlt]
#   RECIPE         [recipes/teacher_${METHOD}_${DATASET}.yaml]
#   DATA           shard directory -> data.shards [the recipe's]
#   RUN_DIR        run directory -> runtime.run_dir; resubmitting with it resumes [the recipe's]
#   NODES          nodes to launch on [the job's]
#   GPUS_PER_NODE  processes per node, one per GPU [the job's --ntasks-per-node]
#   DEVICE         cpu | cuda -> runtime.device, data.device [the recipe's]
#   MLFLOW_TRACKING_URI  [SQLite in the run directory]
#   PYTHON         [the repository's .venv/bin/python if present, else python3]
#   DRY_RUN=1      pass --dry-run            DEITLT_HOME   the repository [the submit directory]
#   DEITLT_SETUP   file sourced first (modules, NCCL variables)   MAX_RESTARTS  [100]
# On another GPU count keep micro_batch x GPUs at the recipe's global batch, e.g.
# `sbatch --gpus-per-node=8 --ntasks-per-node=8 slurm/teacher_large.sh train.micro_batch=32`.
# The teacher file is written to RUN_DIR/teacher. See docs/teachers.md and docs/cluster.md.
#
#SBATCH --job-name=deitlt-teacher-large
#SBATCH --nodes=1                  # the recipes' global batch assumes 4 GPUs in all
#SBATCH --gpus-per-node=4
#SBATCH --ntasks-per-node=4        # = gpus-per-node: one process per GPU, started by srun
#SBATCH --cpus-per-task=8          # DALI decode + augmentation threads and the trainer
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

METHOD=${METHOD:-ldsam}
DATASET=${DATASET:-imagenetlt}
[[ $METHOD == ldsam || $METHOD == paco ]] || deitlt_die "METHOD=$METHOD: use ldsam or paco"
[[ $DATASET == imagenetlt || $DATASET == inat18 ]] || deitlt_die "DATASET=$DATASET: use imagenetlt or inat18"
RECIPE=${RECIPE:-recipes/teacher_${METHOD}_${DATASET}.yaml}
deitlt_run srun --kill-on-bad-exit=0 --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" \
  "$PYTHON" -m deitlt_scale.cli teacher train "$RECIPE" "${DEITLT_OVERRIDES[@]}" "$@" "${DEITLT_FLAGS[@]}"
