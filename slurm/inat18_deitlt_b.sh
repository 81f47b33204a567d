#!/bin/bash
# DeiT-LT-B on iNaturalist-2018 with the ResNet-50 PaCo+SAM teacher, the paper's schedule
# (recipes/inat18_deitlt_b.yaml: 1000 epochs, 4 GPUs x micro-batch 128 x accumulation 4 = 2048).
#
#   sbatch slurm/inat18_deitlt_b.sh [section.key=value ...]     # overrides go to the trainer
#   DRY_RUN=1 sbatch slurm/inat18_deitlt_b.sh                   # build, print the layout, exit 0
#   sbatch --nodes=2 slurm/inat18_deitlt_b.sh train.micro_batch=64   # 8 GPUs: same batch and lr
#
# Environment [default]:
#   RECIPE         [recipes/inat18_deitlt_b.yaml]
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
#SBATCH --job-name=deitlt-inat18-b
#SBATCH --nodes=1                  # the recipe's global batch assumes 4 GPUs in all
#SBATCH --gpus-per-node=4
#SBATCH --ntasks-per-node=4        # = gpus-per-node: one process per GPU, started by srun
#SBATCH --cpus-per-task=16         # DALI decode + RandAugment threads (data.num_threads=8) and more
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

RECIPE=${RECIPE:-recipes/inat18_deitlt_b.yaml}
deitlt_run srun --kill-on-bad-exit=0 --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" \
  "$PYTHON" -m deitlt_scale.cli train "$RECIPE" "${DEITLT_OVERRIDES[@]}" "$@" "${DEITLT_FLAGS[@]}"
