#!/usr/bin/env bash
# Fill build/wheels with what scripts/gpu_check.sh installs on the GPU machine, which has no network
# (python3 3.12, torch, timm, torchvision, triton, numpy, pytest, safetensors preinstalled; no
# deepspeed). Run it here, with network access to PyPI, before a GPU check:
#
#     bash scripts/prepare_gpu_wheels.sh            # then run scripts/gpu_check.sh over there
#
# * DeepSpeed has no wheel on PyPI: `pip wheel --no-deps deepspeed==0.19.8` builds a pure-Python one
#   (no ops are compiled at install; the JIT ops are not used by this project).
# * DeepSpeed 0.19.8 imports at run time: hjson (config), pydantic 2 (+ pydantic-core,
#   annotated-types, typing-inspection, typing-extensions), psutil, py-cpuinfo, msgpack, einops,
#   packaging, tqdm, numpy, and lists ninja as a requirement. They are downloaded as CPython 3.12
#   manylinux x86_64 wheels, pinned to the versions this project is tested with; pip on the GPU
#   machine installs only those it does not already have.
# * setuptools and PyYAML are carried in case the image lacks them (the project is installed with
#   --no-build-isolation, and its config loader needs yaml).
# * webdataset (+ braceexpand) for the reference loader of `deitlt bench data` and the DALI tests.
#   DALI itself and its own dependencies are far larger: scripts/prepare_gpu_payload.sh.
#
# The wheels are build outputs: build/ is ignored by git, never commit them. The total must stay
# under 64 MiB (what the GPU machine receives); the script fails when it does not.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
WHEELS=${WHEELS:-build/wheels}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}  # the GPU image's Python (binary wheels are per version)
LIMIT_MIB=64

rm -rf "$WHEELS"
mkdir -p "$WHEELS"

"$PYTHON" -m pip wheel --quiet --no-deps "deepspeed==0.19.8" -w "$WHEELS"

"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$TARGET_PYTHON" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  -d "$WHEELS" \
  "hjson==3.1.0" "py-cpuinfo==9.0.0" "msgpack==1.2.4" "psutil==7.2.2" "ninja==1.13.2" \
  "einops==0.8.2" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" \
  "typing-inspection==0.4.5" "typing-extensions==4.16.0" "packaging==26.3" "tqdm==4.70.1" \
  "setuptools==84.2.1" "pyyaml==6.0.4" "webdataset==1.0.2" "braceexpand==0.1.7"

ls -l "$WHEELS"
total=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
echo "total: $((total / 1024)) KiB in $(find "$WHEELS" -name "*.whl" | wc -l) wheels (limit ${LIMIT_MIB} MiB)"
if [ "$total" -ge $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "error: $WHEELS exceeds ${LIMIT_MIB} MiB; the GPU machine cannot receive it" >&2
  exit 1
fi
