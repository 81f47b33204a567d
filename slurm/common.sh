# shellcheck shell=bash
# Shared logic of the deitlt batch scripts (slurm/*.sh). Sourced, never submitted by itself.
#
#   deitlt_init        inside a SLURM job only: moves to the repository, picks PYTHON, checks the
#                      launch layout (NODES x GPUS_PER_NODE), exports the rendezvous and prints a
#                      banner. Fills DEITLT_OVERRIDES (from DATA, RUN_DIR, DEVICE) and DEITLT_FLAGS
#                      (--dry-run when DRY_RUN=1) for the launch line.
#   deitlt_run CMD...  runs the launch line (srun ...), keeps this batch shell alive through
#                      signals, and turns exit status 75 ("checkpoint saved, requeue me") into
#                      `scontrol requeue` of the job (of the element, in an array). Any other
#                      status becomes the job's.
#                      With DRY_RUN=1 it first prints the layout: every task's host, rank, local
#                      rank and resolved rendezvous, from an srun with the launch line's options.
#
# Signals, and why the batch shell traps them:
#   * `--signal=USR1@N` (no "B:") and `scancel --signal=USR1 JOB` reach the tasks of the job steps
#     only. The trainer finishes its step, saves a complete checkpoint and exits 75; srun returns the
#     highest task status (75), and this shell requeues.
#   * `--signal=B:USR1@N` and `scancel --batch --signal=USR1 JOB` reach this shell only. Bash's
#     default action for USR1 is to die, which would end the job with nobody left to requeue it, so
#     the trap forwards USR1 to srun, which forwards it to every task.
#   * SIGTERM (scancel, time limit, preemption) reaches this shell and the tasks alike, from
#     slurmstepd. The trap keeps the shell alive to read srun's status; it does not forward the
#     signal, because the tasks already have it. The trainer must treat repeated signals as one.
#   * A trapped signal makes `wait` return early with a status > 128, so waiting loops until srun
#     has really exited.
#   * `scontrol requeue` ends this batch step (TERM, then KILL) and puts the job back to PENDING with
#     the same id, environment, arguments and log (--open-mode=append); SLURM_RESTART_COUNT grows by
#     one and the trainer resumes from the newest complete checkpoint in its run directory. Only a
#     RUNNING job is requeued: one that is ending (`scancel JOB`, the time limit, a cancelling
#     preemption: JobState=COMPLETING) stays ended although SLURM would accept the requeue; the
#     status stays 75 and resubmitting resumes.
#   * A node failure is SLURM's business: with --requeue it requeues the job itself (this shell,
#     on the first node, is killed with the allocation), whatever status srun had returned.

# No `set -u`: bash < 4.4 (still common on clusters) treats an empty "${array[@]}" as unset.
set -o pipefail

readonly DEITLT_REQUEUE_STATUS=75

deitlt_log() {
  echo "deitlt[slurm]: $*"
}

deitlt_die() {
  echo "deitlt[slurm]: error: $*" >&2
  exit 2
}

deitlt_init() {
  [[ -n ${SLURM_JOB_ID:-} ]] ||
    deitlt_die "$(basename "$0") is a batch script: submit it with sbatch (see docs/cluster.md)"
  [[ -d $DEITLT_HOME/deitlt_scale ]] ||
    deitlt_die "DEITLT_HOME=$DEITLT_HOME is not the deitlt-scale repository; set DEITLT_HOME"
  DEITLT_HOME=$(cd "$DEITLT_HOME" && pwd)
  # Relative paths (RECIPE, DATA, RUN_DIR, the recipes' own paths) are relative to the repository.
  cd "$DEITLT_HOME" || deitlt_die "cannot enter $DEITLT_HOME"
  if [[ -n ${DEITLT_SETUP:-} ]]; then
    # shellcheck disable=SC1090  # a site file: module loads, conda activate, NCCL variables
    source "$DEITLT_SETUP" || deitlt_die "DEITLT_SETUP=$DEITLT_SETUP failed"
  fi
  if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x $DEITLT_HOME/.venv/bin/python ]] && PYTHON=$DEITLT_HOME/.venv/bin/python
  fi
  MAX_RESTARTS=${MAX_RESTARTS:-100}

  # Launch layout: one process per GPU. Resources come from the allocation; to change them pass
  # the options to sbatch (they override the #SBATCH lines), e.g. `sbatch --nodes=2 ...`.
  NODES=${NODES:-$SLURM_JOB_NUM_NODES}
  GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$((${SLURM_NTASKS:-1} / SLURM_JOB_NUM_NODES))}}
  [[ $NODES =~ ^[1-9][0-9]*$ ]] || deitlt_die "NODES=$NODES: use a positive integer"
  [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || deitlt_die "GPUS_PER_NODE=$GPUS_PER_NODE: use a positive integer"
  ((NODES <= SLURM_JOB_NUM_NODES)) ||
    deitlt_die "NODES=$NODES but the job has $SLURM_JOB_NUM_NODES node(s): submit with sbatch --nodes=$NODES"
  if [[ -n ${SLURM_NTASKS_PER_NODE:-} ]] && ((GPUS_PER_NODE > SLURM_NTASKS_PER_NODE)); then
    deitlt_die "GPUS_PER_NODE=$GPUS_PER_NODE but the job has $SLURM_NTASKS_PER_NODE task(s) per node: submit with sbatch --gpus-per-node=$GPUS_PER_NODE --ntasks-per-node=$GPUS_PER_NODE"
  fi
  if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 && $SLURM_GPUS_ON_NODE -ne $GPUS_PER_NODE ]]; then
    deitlt_log "warning: $SLURM_GPUS_ON_NODE GPU(s) per node but $GPUS_PER_NODE process(es) per node"
  fi
  # srun (22.05 and later) does not inherit --cpus-per-task from sbatch; without this each task
  # would be bound to one CPU where task/affinity is on, starving the DALI threads.
  if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
  fi
  export PYTHONUNBUFFERED=1

  # Rendezvous: the first host of the allocation, a port derived from the job id (stable across
  # requeues, distinct for jobs sharing a node); DEITLT_MASTER_ADDR/PORT override, and a
  # MASTER_ADDR inherited from the submitting shell is ignored. The rule has one definition,
  # deitlt_scale/engine/rendezvous.py, which the trainer imports and this shell runs.
  local rendezvous
  rendezvous=$("$PYTHON" -m deitlt_scale.engine.rendezvous) ||
    deitlt_die "no rendezvous for this job (SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-})"
  read -r MASTER_ADDR MASTER_PORT <<<"$rendezvous"
  export MASTER_ADDR MASTER_PORT
  # sbatch exports the submitting shell's environment: a torchrun-style RANK/WORLD_SIZE left
  # there would take precedence over SLURM's ranks in every task.
  unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK

  DEITLT_OVERRIDES=()
  [[ -n ${DATA:-} ]] && DEITLT_OVERRIDES+=("data.shards=$DATA")
  [[ -n ${RUN_DIR:-} ]] && DEITLT_OVERRIDES+=("runtime.run_dir=$RUN_DIR")
  case ${DEVICE:-} in
    "" | auto) ;;
    cpu) DEITLT_OVERRIDES+=(runtime.device=cpu data.device=cpu) ;;
    cuda | gpu) DEITLT_OVERRIDES+=(runtime.device=cuda data.device=gpu) ;;
    *) deitlt_die "DEVICE=$DEVICE: use cpu, cuda or auto" ;;
  esac
  DEITLT_FLAGS=()
  case ${DRY_RUN:-0} in
    "" | 0) ;;
    1) DEITLT_FLAGS+=(--dry-run) ;;
    *) deitlt_die "DRY_RUN=$DRY_RUN: use 1 or 0" ;;
  esac

  deitlt_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}" \
    "on ${SLURM_JOB_NODELIST:-?}: $NODES node(s) x $GPUS_PER_NODE process(es)," \
    "${SLURM_CPUS_PER_TASK:-?} cpu(s) each, $(date -Is)"
  deitlt_log "repository $DEITLT_HOME, python $PYTHON"
  deitlt_log "rendezvous MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
  deitlt_log "tracking ${MLFLOW_TRACKING_URI:-SQLite in the run directory}"
}

# Set by the traps; read by the wait loop of deitlt_run.
DEITLT_CHILD=""
DEITLT_INTERRUPTED=0
DEITLT_SIGNAL=""
DEITLT_REQUEUED=0

_deitlt_on_signal() {
  DEITLT_INTERRUPTED=1
  DEITLT_SIGNAL=$1
  ((DEITLT_REQUEUED)) && return 0 # the TERM that ends this step after `scontrol requeue`
  deitlt_log "batch shell received SIG$1 at $(date -Is)"
  if [[ $1 == USR1 && -n $DEITLT_CHILD ]]; then
    kill -USR1 "$DEITLT_CHILD" 2>/dev/null || true
  fi
}

# With DRY_RUN=1, before the launch line: one line per task of the same srun geometry, saying
# where it runs and how it resolves the rendezvous (a node that cannot fails the dry run).
_deitlt_layout() {
  local srun_options=()
  shift # srun
  while [[ ${1:-} == -* ]]; do
    srun_options+=("$1")
    shift
  done
  deitlt_log "layout of the launch:"
  srun "${srun_options[@]}" "$PYTHON" -m deitlt_scale.engine.rendezvous --layout ||
    deitlt_die "the layout step failed (see the lines above)"
}

deitlt_run() {
  trap '_deitlt_on_signal USR1' USR1
  trap '_deitlt_on_signal TERM' TERM
  [[ ${DRY_RUN:-0} == 1 && $1 == srun ]] && _deitlt_layout "$@"
  deitlt_log "launch: $(printf '%q ' "$@")"
  "$@" &
  DEITLT_CHILD=$!
  local status
  while :; do
    DEITLT_INTERRUPTED=0
    wait "$DEITLT_CHILD"
    status=$?
    ((DEITLT_INTERRUPTED)) || break
    # `wait` returned because of a trapped signal: keep waiting while the launch line runs.
    kill -0 "$DEITLT_CHILD" 2>/dev/null && continue
    # It ended around the signal; collect its status unless that `wait` already did (127).
    local late
    wait "$DEITLT_CHILD" 2>/dev/null
    late=$?
    ((late != 127)) && status=$late
    break
  done
  # When the child's exit races the signal, bash can answer -1 (no status left to read): the
  # signal ended the launch line, so the status is the usual 128+N.
  ((status >= 0)) || status=$((128 + $(kill -l "${DEITLT_SIGNAL:-TERM}")))

  if ((status == 0)); then
    deitlt_log "finished at $(date -Is)"
    exit 0
  fi
  if ((status != DEITLT_REQUEUE_STATUS)); then
    deitlt_log "failed with exit status $status at $(date -Is)"
    exit "$status"
  fi
  local restarts=${SLURM_RESTART_COUNT:-0}
  if ((restarts >= MAX_RESTARTS)); then
    deitlt_log "exit status 75 but MAX_RESTARTS=$MAX_RESTARTS requeues are used up; resubmit to resume"
    exit "$status"
  fi
  # Requeue only a job that is still RUNNING (the trainer stopped on USR1 before the time limit).
  # After `scancel JOB`, the time limit or a cancelling preemption the job is COMPLETING: the
  # trainer saved on the SIGTERM, but SLURM would still accept a requeue during KillWait and run
  # the job again. A job that is ending stays ended. (No answer from slurmctld: try the requeue.)
  local state
  # An array element is named ARRAY_TASK: the first element's own id is also the array's id,
  # which `scontrol` would take for every element of the array.
  local job=$SLURM_JOB_ID
  [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]] &&
    job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  state=$(scontrol show job -o "$job" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n 1)
  if [[ -n $state && $state != JobState=RUNNING ]]; then
    deitlt_log "exit status 75 (checkpoint saved) but the job is ending ($state: cancelled, time limit or preemption): not requeued; resubmit the same command to resume"
    exit "$status"
  fi
  deitlt_log "exit status 75 (checkpoint saved): scontrol requeue $job, restart $((restarts + 1))"
  DEITLT_REQUEUED=1
  if scontrol requeue "$job"; then
    exit 0
  fi
  DEITLT_REQUEUED=0
  deitlt_log "requeue refused (job cancelled or not requeueable); resubmit the same command to resume"
  exit "$status"
}
