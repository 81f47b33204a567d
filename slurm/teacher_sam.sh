#!/bin/bash
# A SAM-trained CNN teacher (LDAM-DRW + SAM, the teachers of the paper's CIFAR experiments):
# `deitlt teacher train RECIPE`. The default recipe is the embedded-digits ResNet-32; give RECIPE
# (and more GPUs with `sbatch --gpus-per-node=N --ntasks-per-node=N`) for a ResNet-50 teacher.
#
#   RECIPE=recipes/teacher_digits.yaml sbatch slurm/teacher_sam.sh [section.key=value ...]
#
# Environment [default]:
#   RECIPE         [recipes/teacher_digits.yaml]
#   DATA           shard directory -> data.shards [the recipe's]
#   RUN_DIR        run directory -> runtime.run_dir; resubmitting with it resumes [the recipe's]
#   NODES          nodes to launch on [the job's]
#   GPUS_PER_NODE  processes per node, one per GPU [the job's --ntasks-per-node]
#   DEVICE         cpu | cuda -> runtime.device, data.device [the recipe's]
#   MLFLOW_TRACKING_URI  [SQLite in the run directory]
#   PYTHON         [the repository's .venv/bin/python if present, else python3]
#   DRY_RUN=1      pass --dry-run            DEITLT_HOME   the repository [the submit directory]
#   DEITLT_SETUP   file sourced first (modules, NCCL variables)   MAX_RESTARTS  [100]
# See docs/cluster.md.
#
#SBATCH --job-name=deitlt-teacher-sam
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1          # a ResNet-32 on 32 px images does not need more
#SBATCH --ntasks-per-node=1        # = gpus-per-node: one process per GPU, started by srun
#SBATCH --cpus-per-task=8          # DALI decode + augmentation threads and the trainer
#SBATCH --time=24:00:00            # one allocation; the run continues across requeues
#SBATCH --signal=USR1@300          # tasks (no B:) get USR1 5 min before the limit: save, exit 75
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

RECIPE=${RECIPE:-recipes/teacher_digits.yaml}
deitlt_run srun --kill-on-bad-exit=0 --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" \
  "$PYTHON" -m deitlt_scale.cli teacher train "$RECIPE" "${DEITLT_OVERRIDES[@]}" "$@" "${DEITLT_FLAGS[@]}"
