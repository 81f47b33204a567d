#!/bin/bash
# A published CNN teacher for CIFAR-10-LT / CIFAR-100-LT, ResNet-32 on 32 px images:
# `deitlt teacher train recipes/teacher_${METHOD}_${DATASET}lt_r${RHO}.yaml`.
#   METHOD=ldsam  LDAM-DRW + SAM (rho 0.8), 200 epochs (recipes/teacher_ldsam_*.yaml), IF 100 and 50
#   METHOD=paco   PaCo + SAM, 400 epochs (recipes/teacher_paco_*.yaml), IF 100
#
#   DATASET=cifar100 RHO=50 sbatch slurm/teacher_cifar.sh [section.key=value ...]
#   METHOD=paco DATASET=cifar10 sbatch slurm/teacher_cifar.sh
#   DRY_RUN=1 sbatch slurm/teacher_cifar.sh                  # build, print the layout, exit 0
#
# Environment [default]:
#   METHOD         ldsam | paco [ldsam]
#   DATASET        cifar10 | cifar100 [cifar10]      RHO   imbalance factor, 100 | 50 [100]
#   RECIPE         [recipes/teacher_${METHOD}_${DATASET}lt_r${RHO}.yaml]
#   DATA           shard directory -> data.shards [the recipe's]
#   RUN_DIR        run directory -> runtime.run_dir; resubmitting with it resumes [the recipe's]
#   NODES          nodes to launch on [the job's]
#   GPUS_PER_NODE  processes per node, one per GPU [the job's --ntasks-per-node]
#   DEVICE         cpu | cuda -> runtime.device, data.device [the recipe's]
#   MLFLOW_TRACKING_URI  [SQLite in the run directory]
#   PYTHON         [the repository's .venv/bin/python if present, else python3]
#   DRY_RUN=1      pass --dry-run            DEITLT_HOME   the repository [the submit directory]
#   DEITLT_SETUP   file sourced first (modules, NCCL variables)   MAX_RESTARTS  [100]
# The teacher file is written to RUN_DIR/teacher. See docs/teachers.md and docs/cluster.md.
#
#SBATCH --job-name=deitlt-teacher-cifar
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1          # the recipes' batch of 128 is one GPU's, as published
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

METHOD=${METHOD:-ldsam}
DATASET=${DATASET:-cifar10}
DATASET=${DATASET%-lt} # the recipes' headers spell it cifar10-lt
RHO=${RHO:-100}
[[ $METHOD == ldsam || $METHOD == paco ]] || deitlt_die "METHOD=$METHOD: use ldsam or paco"
[[ $DATASET == cifar10 || $DATASET == cifar100 ]] || deitlt_die "DATASET=$DATASET: use cifar10 or cifar100"
[[ $RHO == 100 || $RHO == 50 ]] || deitlt_die "RHO=$RHO: use 100 or 50 (the paper's imbalance factors)"
RECIPE=${RECIPE:-recipes/teacher_${METHOD}_${DATASET}lt_r${RHO}.yaml}
[[ -f $RECIPE ]] || deitlt_die "RECIPE=$RECIPE does not exist (PaCo recipes exist for RHO=100 only)"
deitlt_run srun --kill-on-bad-exit=0 --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" \
  "$PYTHON" -m deitlt_scale.cli teacher train "$RECIPE" "${DEITLT_OVERRIDES[@]}" "$@" "${DEITLT_FLAGS[@]}"
