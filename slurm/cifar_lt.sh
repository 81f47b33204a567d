#!/bin/bash
# DeiT-LT-B on CIFAR-10-LT / CIFAR-100-LT with the ResNet-32 PaCo+SAM teacher, the paper's schedule
# (recipes/cifar{10,100}lt_r{100,50}.yaml: 1200 epochs, 2 GPUs x 128 x accumulation 4 = 1024).
#
#   DATASET=cifar100 RHO=50 sbatch slurm/cifar_lt.sh [section.key=value ...]
#   DRY_RUN=1 sbatch slurm/cifar_lt.sh                      # build, print the layout, exit 0
#
# Environment [default]:
#   DATASET        cifar10 | cifar100 [cifar10]      RHO   imbalance factor, 100 | 50 [100]
#   RECIPE         [recipes/${DATASET}lt_r${RHO}.yaml]
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
#SBATCH --job-name=deitlt-cifar-lt
#SBATCH --nodes=1                  # the recipes' global batch assumes 2 GPUs in all
#SBATCH --gpus-per-node=2
#SBATCH --ntasks-per-node=2        # = gpus-per-node: one process per GPU, started by srun
#SBATCH --cpus-per-task=8          # DALI decode + RandAugment threads and the trainer
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

DATASET=${DATASET:-cifar10}
DATASET=${DATASET%-lt} # the recipes' headers spell it cifar10-lt
RHO=${RHO:-100}
[[ $DATASET == cifar10 || $DATASET == cifar100 ]] || deitlt_die "DATASET=$DATASET: use cifar10 or cifar100"
[[ $RHO == 100 || $RHO == 50 ]] || deitlt_die "RHO=$RHO: use 100 or 50 (the paper's imbalance factors)"
RECIPE=${RECIPE:-recipes/${DATASET}lt_r${RHO}.yaml}
deitlt_run srun --kill-on-bad-exit=0 --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" \
  "$PYTHON" -m deitlt_scale.cli train "$RECIPE" "${DEITLT_OVERRIDES[@]}" "$@" "${DEITLT_FLAGS[@]}"
