#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions run through `bash -c` under timeout look unreachable
# The GPU check of deitlt-scale, for a lent GPU machine without network access (python3 3.12,
# torch (CUDA), timm, torchvision, triton, numpy, pytest, safetensors preinstalled; no deepspeed,
# DALI, webdataset or mlflow). It needs build/wheels and build/payload, made here beforehand by
#
#     bash scripts/prepare_gpu_payload.sh     # runs prepare_gpu_wheels.sh too; prints the transfers
#
# and carried to the machine as that script's transfer list says (build/ is ignored by git; the
# payload goes in parts of at most 60 MiB, one transfer each, the last one running this script).
# On the GPU machine, from the repository root:
#
#     bash scripts/gpu_check.sh               # OUT=<dir> chooses where the log goes
#     DRY_RUN=1 bash scripts/gpu_check.sh     # prints the steps and their limits, runs none
#
# Steps, each under a time limit, all within BUDGET_S seconds (default 450, so under 8 minutes):
#   1. a venv with --system-site-packages that also sees python3's own site-packages (the image's
#      python3 is itself a venv); the carried wheels installed from build/wheels only (pip
#      resolves DeepSpeed's requirements against what the image has); the project with --no-deps
#   2. the DALI payload rebuilt from its parts (sha256 checked) into the venv, and a DALI
#      pipeline run on the CPU and with nvJPEG on the GPU (a failure here fails only the steps
#      that need DALI)
#   3. versions and features (bf16, timm's fused attention, DALI)
#   4. a 2-step compiled DeepSpeed bf16 run with a co-located ResNet-50 teacher (bench step, tiny)
#   5. deitlt bench step --synthetic for DeiT-B (batch 128, 224 px, ResNet-50 teacher) against the
#      reference recipe, measured in the same process
#   6. deitlt bench data --device gpu: the DALI train pipeline with nvJPEG decoding and GPU
#      augmentation against the reference loader (PIL + timm, one worker per CPU), 224 px
#   7. deitlt train of DeiT-S/16 in the production configuration (recipes/imagenetlt_deitlt_b.yaml:
#      data.device=gpu, compiled student, DeepSpeed ZeRO 1 bf16, ResNet-50 teacher, grad_accum 4)
#      on generated shards, with a random teacher
#   8. deitlt bench step --synthetic for DeiT-S, as 5
#   9. pytest -m gpu on the test modules that import here
#  10. if at least 150 s of the budget are left, DeiT-B's step without each optimisation (side
#      stream, fused AdamW, bf16 channels_last teacher, compile) in the same rounds as the step
#      (--ablate), and, if 120 s are left, the compiled student with CUDA graphs
#  11. a summary table and the DeiT-B goals (>= 3000 images/s, >= 40% MFU, >= 2.5x reference)
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
PAYLOAD=${PAYLOAD:-$REPO/build/payload}
WORK=${WORK:-$REPO/build/gpu-work} # generated shards, the random teacher, the training run
BUDGET_S=${BUDGET_S:-450}
DRY_RUN=${DRY_RUN:-0}
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
  if [ "$DRY_RUN" = 1 ]; then
    echo "== $name: dry run, not run"
    return 0
  fi
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
  local py=$VENV/bin/python site
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # A venv made from a venv's python (the image's python3 is /opt/torch/.venv/bin/python3) sees
  # the base interpreter's site-packages, not that venv's, where torch is: add python3's own
  # after the new venv's (addsitedir also reads their .pth files).
  "$PYTHON" -c 'import site; print("import site; " + "; ".join(
    f"site.addsitedir({p!r})" for p in site.getsitepackages()))' >"$site/deitlt-image-site.pth"
  "$py" -c 'import torch; print(f"torch {torch.__version__} from {torch.__file__}")'
  # Offline: only build/wheels, plus what the image already has (torch, numpy, packaging, ...).
  "$py" -m pip install --quiet --no-index --find-links "$WHEELS" "setuptools>=70.1"
  "$py" -m pip install --quiet --no-index --find-links "$WHEELS" "deepspeed==0.19.8" \
    "webdataset==1.0.2"
  "$py" -m pip install --quiet --no-index --no-deps --no-build-isolation "$REPO"
  "$py" -m pip list 2>/dev/null | grep -Ei "^(torch|timm|deepspeed|pydantic|webdataset|deitlt)" || true
}

install_dali() { # the payload's parts -> the venv's site-packages, then a CPU and a GPU pipeline
  set -e
  local py=$VENV/bin/python site
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$py" "$REPO/scripts/payload.py" install "$PAYLOAD" "$site"
  "$py" "$REPO/scripts/payload.py" smoke
  "$py" "$REPO/scripts/payload.py" smoke --gpu
}

bench() {  # bench MODEL BATCH [extra args]: the step benchmark on synthetic data, 224 px
  local model=$1 batch=$2
  shift 2
  "$VENV/bin/deitlt" bench step --synthetic --device cuda --model "$model" --teacher resnet50 \
    --batch "$batch" "$@"
}

train_fixture() { # shards of generated JPEGs and a random ResNet-50 teacher for `deitlt train`
  set -e
  rm -rf "$WORK"
  "$VENV/bin/python" scripts/gpu_check.py make-dataset "$WORK/data" --images 1024 --classes 100
}

train() { # DeiT-S/16 in the production configuration, 12 optimizer steps of 4 x 128 images
  set -e
  "$VENV/bin/deitlt" train recipes/imagenetlt_deitlt_b.yaml \
    model.arch=deit_small_distilled_patch16_224 "data.shards=$WORK/data" data.device=gpu \
    data.num_threads=8 "teacher.path=$WORK/data/teacher" teacher.map_targets=false \
    train.global_batch=null train.micro_batch=128 train.grad_accum=4 train.max_steps=12 \
    train.log_every=4 checkpoint.every_epochs=1000 checkpoint.every_steps=0 \
    checkpoint.resume=false eval.every_epochs=1000 tracking.enabled=false \
    "runtime.run_dir=$WORK/run"
}

export -f install_project install_dali bench train_fixture train
export PYTHON WHEELS VENV REPO PAYLOAD WORK

main() {
  echo "deitlt-scale GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs"
  echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PYTHON" --version
  if ! ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
    echo "error: no DeepSpeed wheel in $WHEELS; run scripts/prepare_gpu_payload.sh first" >&2
    return 1
  fi

  run_step "install (venv, carried wheels, project --no-deps)" 90 install_project || return 1
  local py=$VENV/bin/python dali=0
  run_step "install DALI (payload parts -> venv) and run a CPU and an nvJPEG pipeline" 90 \
    install_dali && dali=1
  run_step "environment" 60 "$py" scripts/gpu_check.py env || return 1

  run_step "smoke: 2 compiled DeepSpeed bf16 steps with a ResNet-50 teacher" 120 \
    bench deit_tiny_distilled_patch16_224 32 --model-args depth=2 --warmup 1 --steps 1 --rounds 1
  # 5 warm-up steps (compilation), then 3 alternating rounds of 10 steps per recipe
  run_step "bench step DeiT-B/16 + ResNet-50, batch 128, 224 px" 180 \
    bench deit_base_distilled_patch16_224 128 --warmup 5 --steps 10 --rounds 3
  if [ "$dali" = 1 ]; then
    # generated 256x320 JPEGs; DALI with 16 CPU threads, the reference with 16 workers
    run_step "bench data --device gpu, 224 px, batch 128, $(nproc) threads/workers" 120 \
      "$VENV/bin/deitlt" bench data --device gpu --image-size 224 --batch-size 128 \
      --batches 20 --warmup 3 --threads "$(nproc)"
    run_step "train fixture (generated shards, random ResNet-50 teacher)" 60 train_fixture &&
      run_step "train DeiT-S/16, data.device=gpu, compile, DeepSpeed ZeRO 1 bf16" 150 train
  else
    echo
    echo "== bench data --device gpu and train DeiT-S: not run, DALI did not install"
    FAILED+=("bench data --device gpu (no DALI)" "train DeiT-S (no DALI)")
  fi
  run_step "bench step DeiT-S/16 + ResNet-50, batch 128, 224 px" 150 \
    bench deit_small_distilled_patch16_224 128 --warmup 5 --steps 10 --rounds 3

  local tests
  if [ "$DRY_RUN" = 1 ]; then
    tests="(the test modules with gpu tests that import here)"
  else
    tests=$("$py" scripts/gpu_check.py select-tests)
  fi
  if [ -n "$tests" ]; then
    # shellcheck disable=SC2086  # one argument per selected file
    run_step "pytest -m gpu" 150 "$py" -m pytest -m gpu -q -rs -p no:cacheprovider $tests
  else
    echo "== pytest -m gpu: no test module imports here"
    FAILED+=("pytest -m gpu (nothing selected)")
  fi
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
  if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: no figures"
    return 0
  fi
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
