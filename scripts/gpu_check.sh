#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions run through `bash -c` under timeout look unreachable
# The GPU check of deitlt-scale, for a lent GPU machine without network access (python3 3.12,
# torch (CUDA), timm, torchvision, triton, numpy, pytest, safetensors preinstalled; no deepspeed,
# DALI, webdataset or mlflow). It needs build/wheels, made here beforehand by
#
#     bash scripts/prepare_gpu_wheels.sh      # deepspeed 0.19.8 wheel + its small deps, ~8 MB
#
# and carried along with the working tree (build/ is ignored by git). On the GPU machine, from the
# repository root:
#
#     bash scripts/gpu_check.sh               # OUT=<dir> chooses where the log goes
#
# Steps, each under a time limit, all within BUDGET_S seconds (default 450, so under 8 minutes):
#   1. a venv with --system-site-packages; the carried wheels installed from build/wheels only
#      (pip resolves DeepSpeed's requirements against what the image has); the project with --no-deps
#   2. versions and features (bf16, timm's fused attention), and which test modules cannot import
#   3. pytest -m gpu on the test modules that import here (DALI's are left out, with the reason)
#   4. a 2-step compiled DeepSpeed bf16 run with a co-located ResNet-50 teacher (bench step, tiny)
#   5. deitlt bench step --synthetic for DeiT-S and DeiT-B (batch 128, 224 px, ResNet-50 teacher)
#      against the reference recipe, measured in the same process; then, if at least 150 s of
#      the budget are left, DeiT-B's step without each optimisation (side stream, fused AdamW,
#      bf16 channels_last teacher, compile) in the same rounds as the step (--ablate), and, if
#      120 s are left, the compiled student with CUDA graphs (compile mode reduce-overhead)
#   6. a summary table and the DeiT-B goals (>= 3000 images/s, >= 40% MFU, >= 2.5x reference)
# The whole output is printed and written to $OUT/gpu_check.log (default build/gpu-check/).
# Exit status: 0 when every step passed and the goals were met, 1 when a step failed, 3 when
# everything ran but a goal was missed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR=${OUT:-$REPO/build/gpu-check}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$REPO/build/wheels}
VENV=${VENV:-$REPO/build/gpu-venv}
BUDGET_S=${BUDGET_S:-450}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log

export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$REPO/build/inductor-cache}

START=$SECONDS
FAILED=()

# run_step NAME CAP_SECONDS COMMAND...: run under min(cap, what is left of the budget).
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt 30 ]; then
    echo
    echo "== $name: not run, the ${BUDGET_S}s budget is spent"
    FAILED+=("$name (not run)")
    return 1
  fi
  local limit=$((cap < left ? cap : left))
  echo
  echo "== $name (limit ${limit}s) at $(date -u +%H:%M:%S) UTC"
  echo "\$ $*"
  local t0=$SECONDS rc=0
  # bash -c so that the exported functions below can run under timeout as well
  timeout --kill-after=10 "$limit" bash -c '"$@"' run_step "$@" || rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  if [ "$rc" -ne 0 ]; then
    FAILED+=("$name (exit $rc)")
  fi
  return "$rc"
}

# run_if_budget MIN_SECONDS NAME CAP COMMAND...: run_step, or say why not when less than
# MIN_SECONDS of the budget is left (not a failure: the step is optional).
run_if_budget() {
  local min=$1
  shift
  local left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt "$min" ]; then
    echo
    echo "== $1: skipped, optional and only ${left}s of the budget left (needs ${min}s)"
    return 0
  fi
  run_step "$@"
}

install_project() {
  set -e
  "$PYTHON" -m venv --system-site-packages "$VENV"
  local py=$VENV/bin/python
  # Offline: only build/wheels, plus what the image already has (torch, numpy, packaging, ...).
  "$py" -m pip install --quiet --no-index --find-links "$WHEELS" "setuptools>=70.1"
  "$py" -m pip install --quiet --no-index --find-links "$WHEELS" "deepspeed==0.19.8"
  "$py" -m pip install --quiet --no-index --no-deps --no-build-isolation "$REPO"
  "$py" -m pip list 2>/dev/null | grep -Ei "^(torch|timm|deepspeed|pydantic|deitlt)" || true
}

bench() {  # bench MODEL BATCH [extra args]: the step benchmark on synthetic data, 224 px
  local model=$1 batch=$2
  shift 2
  "$VENV/bin/deitlt" bench step --synthetic --device cuda --model "$model" --teacher resnet50 \
    --batch "$batch" "$@"
}

export -f install_project bench
export PYTHON WHEELS VENV REPO

main() {
  echo "deitlt-scale GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs"
  echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PYTHON" --version
  if ! ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
    echo "error: no DeepSpeed wheel in $WHEELS; run scripts/prepare_gpu_wheels.sh first" >&2
    return 1
  fi

  run_step "install (venv, carried wheels, project --no-deps)" 90 install_project || return 1
  local py=$VENV/bin/python
  run_step "environment" 60 "$py" scripts/gpu_check.py env || return 1

  local tests
  tests=$("$py" scripts/gpu_check.py select-tests)
  if [ -n "$tests" ]; then
    # shellcheck disable=SC2086  # one argument per selected file
    run_step "pytest -m gpu" 150 "$py" -m pytest -m gpu -q -rs -p no:cacheprovider $tests
  else
    echo "== pytest -m gpu: no test module imports here"
    FAILED+=("pytest -m gpu (nothing selected)")
  fi

  run_step "smoke: 2 compiled DeepSpeed bf16 steps with a ResNet-50 teacher" 120 \
    bench deit_tiny_distilled_patch16_224 32 --model-args depth=2 --warmup 1 --steps 1 --rounds 1
  # 5 warm-up steps (compilation), then 3 alternating rounds of 10 steps per recipe
  run_step "bench step DeiT-S/16 + ResNet-50, batch 128, 224 px" 150 \
    bench deit_small_distilled_patch16_224 128 --warmup 5 --steps 10 --rounds 3
  run_step "bench step DeiT-B/16 + ResNet-50, batch 128, 224 px" 180 \
    bench deit_base_distilled_patch16_224 128 --warmup 5 --steps 10 --rounds 3
  # What each optimisation is worth: the step without it, measured in the same rounds. Last, and
  # only with enough budget left: the goal figures above must not wait for it.
  run_if_budget 150 "ablations DeiT-B/16 + ResNet-50, batch 128, 224 px" 200 \
    bench deit_base_distilled_patch16_224 128 --warmup 5 --steps 10 --rounds 3 \
    --ablate teacher.side_stream=false optim.fused=false \
    teacher.dtype=fp32,teacher.channels_last=false model.compile=false
  run_if_budget 120 "compile mode reduce-overhead (CUDA graphs), DeiT-B/16, batch 128" 150 \
    bench deit_base_distilled_patch16_224 128 --warmup 5 --steps 10 --rounds 3 \
    --ablate model.compile_mode=reduce-overhead

  sleep 1 # let tee write the last benchmark lines before the summary reads them
  echo
  echo "== summary after $((SECONDS - START))s"
  local goals=0
  "$py" scripts/gpu_check.py summary "$LOG.partial" || goals=$?
  if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "FAILED steps:"
    printf '  %s\n' "${FAILED[@]}"
    return 1
  fi
  echo "all steps passed"
  return "$goals"
}

# Print as it runs and keep the whole output; the summary reads what has been written so far.
main 2>&1 | tee "$LOG.partial"
status=${PIPESTATUS[0]}
mv "$LOG.partial" "$LOG"
echo "log: $LOG (exit $status)"
exit "$status"
