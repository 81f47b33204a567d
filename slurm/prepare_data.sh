#!/bin/bash
# Long-tailed WebDataset shards on a CPU node: `deitlt data prepare ARGS...`; every argument is
# passed through (see `deitlt data prepare --help`). Write the shards to a file system that every
# GPU node mounts, then point the training jobs at them with DATA=... (docs/cluster.md).
#
#   sbatch slurm/prepare_data.sh ARGS...
#
# Environment [default]:
#   PYTHON         [the repository's .venv/bin/python if present, else python3]
#   DEITLT_HOME    the repository [the submit directory]
#   DEITLT_SETUP   file sourced first (modules)
#
#SBATCH --job-name=deitlt-prepare-data
#SBATCH --nodes=1
#SBATCH --ntasks=1                 # one process; it uses the cores below for decoding and writing
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00            # iNaturalist-2018 (437k images) is the longest
#SBATCH --requeue                  # shards are written atomically, so a rerun after a failure is safe
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# SLURM runs a spool copy of this file, so find the repository from DEITLT_HOME or the submit dir.
for DEITLT_HOME in "${DEITLT_HOME:-}" "${SLURM_SUBMIT_DIR:-$PWD}" "${SLURM_SUBMIT_DIR:-$PWD}/.." "$(dirname "$0")/.."; do
  [[ -f $DEITLT_HOME/slurm/common.sh ]] && break
done
# shellcheck source=slurm/common.sh
source "$DEITLT_HOME/slurm/common.sh" || { echo "deitlt[slurm]: error: set DEITLT_HOME to the repository" >&2; exit 2; }
deitlt_init

deitlt_run srun --ntasks=1 "$PYTHON" -m deitlt_scale.cli data prepare "$@"
