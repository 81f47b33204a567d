#!/bin/bash
# One element of an experiment grid's job array: `deitlt experiment element OUT STAGE/NAME-seedS`
# with S = SLURM_ARRAY_TASK_ID. Submitted by `deitlt experiment submit`, never by hand: it writes
# the plan (OUT/plan.json) and submits one array per teacher and per row, the rows depending on
# their teacher's element of the same seed (--dependency=aftercorr).
#
#   sbatch --array=0-4 slurm/experiment.sh OUT STAGE NAME      # what `submit` runs
#
# Environment [default]:
#   PYTHON         [the repository's .venv/bin/python if present, else python3]
#   DEITLT_HOME    the repository [the submit directory]
#   DEITLT_SETUP   file sourced first (modules, NCCL variables)   MAX_RESTARTS  [100]
# Each element is an ordinary requeue-safe training job (slurm/common.sh): it checkpoints on
# USR1/SIGTERM, exits 75 and is requeued; a requeued element resumes its run.
#
#SBATCH --job-name=deitlt-experiment
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1        # the grids' recipes train one process each
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120          # tasks get USR1 2 min before the limit: save, exit 75
#SBATCH --requeue                  # exit 75 -> scontrol requeue (also after a node failure)
#SBATCH --open-mode=append         # requeued attempts append to the run's log

# SLURM runs a spool copy of this file, so find the repository from DEITLT_HOME or the submit dir.
for DEITLT_HOME in "${DEITLT_HOME:-}" "${SLURM_SUBMIT_DIR:-$PWD}" "${SLURM_SUBMIT_DIR:-$PWD}/.." "$(dirname "$0")/.."; do
  [[ -f $DEITLT_HOME/slurm/common.sh ]] && break
done
# shellcheck source=slurm/common.sh
source "$DEITLT_HOME/slurm/common.sh" || { echo "deitlt[slurm]: error: set DEITLT_HOME to the repository" >&2; exit 2; }
deitlt_init

OUT=$1
STAGE=$2
NAME=$3
[[ -n $OUT && -n $NAME && ($STAGE == teachers || $STAGE == rows) ]] ||
  deitlt_die "usage: sbatch --array=SEEDS slurm/experiment.sh OUT teachers|rows NAME (deitlt experiment submit writes it)"
[[ -n ${SLURM_ARRAY_TASK_ID:-} ]] || deitlt_die "submit as an array: the task id is the seed"
deitlt_run srun --kill-on-bad-exit=0 --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" \
  "$PYTHON" -m deitlt_scale.cli experiment element "$OUT" "$STAGE/$NAME-seed$SLURM_ARRAY_TASK_ID"
