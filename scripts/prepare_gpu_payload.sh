#!/usr/bin/env bash
# Build, here (with access to PyPI), everything scripts/gpu_check.sh installs on the GPU machine,
# which has no network and receives at most 64 MiB per transfer:
#
#     PYTHON=/path/to/venv/bin/python bash scripts/prepare_gpu_payload.sh
#
# 1. build/wheels: scripts/prepare_gpu_wheels.sh (DeepSpeed and the small wheels).
# 2. build/payload: NVIDIA DALI 2.4.0 (nvidia-dali-cuda130) and what it loads beyond the image's
#    torch 2.11 cu130, downloaded as CPython 3.12 manylinux x86_64 wheels: nvImageCodec, nvJPEG
#    (13.0.1.86, the version CUDA 13.0.2's toolkit pins: the image's toolkit and driver are 13.0),
#    nvJPEG2000, nvTIFF, nvCOMP, and DALI's Python dependencies astunparse, gast, libcst,
#    makefun, optree, nvtx. The image brings numpy, packaging, pyyaml, typing-extensions, six,
#    and the CUDA runtime, cuBLAS, cuFFT, ... (torch's cuda-toolkit), but no nvJPEG.
#    The wheels are unpacked into one site-packages tree, pruned (other CPython versions'
#    extension modules, headers, static libraries, tests, nvCOMP's tools), the shared libraries
#    stripped (--strip-unneeded), packed as tar + xz (preset XZ_PRESET, 9 by default) and cut
#    into parts of at most PART_MIB MiB (60): build/payload/part-NN/, each with the manifest
#    (sha256 of every part and of the whole; scripts/payload.py).
# 3. A rehearsal from the parts alone: they are copied to a clean directory, rebuilt into a
#    CPython 3.12 venv that holds only what the image gives DALI (numpy, packaging, pyyaml,
#    typing-extensions, six), and a DALI CPU pipeline runs there. The interpreter is
#    REHEARSAL_PYTHON, else the first python3.12 that runs (pyenv's included); without one the
#    rehearsal stops with an error (REHEARSAL=0 skips it, and says so).
# 4. The transfer list: for each part, the `carry` path and the command that checks it on arrival
#    (it stays under the ignored build/ while the machine stays warm); the last transfer carries
#    build/wheels too and runs scripts/gpu_check.sh, which installs the payload before its steps.
#
# SKIP_BUILD=1 keeps an existing build/wheels and build/payload and only rehearses and prints the
# transfers. Downloads go to build/payload-downloads and the unpacked tree to build/payload-stage; both
# are removed at the end unless KEEP_DOWNLOADS=1. Everything is under build/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}  # runs pip and scripts/payload.py (any CPython >= 3.10)
TARGET_PYTHON=3.12                   # the GPU image's python3
PAYLOAD=${PAYLOAD:-build/payload}
WHEELS=${WHEELS:-build/wheels}
DOWNLOADS=${DOWNLOADS:-build/payload-downloads}
STAGE=${STAGE:-build/payload-stage}
PART_MIB=${PART_MIB:-60}
XZ_PRESET=${XZ_PRESET:-9}
REHEARSAL=${REHEARSAL:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_DOWNLOADS=${KEEP_DOWNLOADS:-0}
LIMIT_MIB=64 # what one transfer may carry, the working tree included

DALI_WHEELS=(
  "nvidia-dali-cuda130==2.4.0" "nvidia-nvimgcodec-cu13==0.9.0.20" "nvidia-nvjpeg==13.0.1.86"
  "nvidia-nvjpeg2k-cu13==0.11.0.51" "nvidia-nvtiff-cu13==0.8.0.82"
  "nvidia-libnvcomp-cu13==5.3.0.16" "astunparse==1.6.3" "gast==0.7.0" "libcst==1.9.0"
  "makefun==1.16.0" "optree==0.20.0" "nvtx==0.2.17"
)
# What the image has and DALI imports: only for the rehearsal's venv, never carried.
IMAGE_WHEELS=("numpy==2.4.6" "packaging==26.3" "pyyaml==6.0.4" "typing-extensions==4.16.0"
  "six==1.17.0")

download() { # download DIR SPEC...: CPython 3.12 manylinux x86_64 wheels, no dependencies
  local dir=$1
  shift
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$TARGET_PYTHON" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$dir" "$@"
}

find_python312() {
  local candidate
  for candidate in "${REHEARSAL_PYTHON:-}" python3.12 \
    "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' \
      2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [ "$SKIP_BUILD" = 1 ]; then
  if [ ! -f "$PAYLOAD/manifest.json" ] || ! ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
    echo "error: SKIP_BUILD=1 needs $PAYLOAD and $WHEELS from an earlier run" >&2
    exit 1
  fi
  echo "SKIP_BUILD=1: keeping $WHEELS and $PAYLOAD"
else
  # 1. the small wheels
  WHEELS=$WHEELS PYTHON=$PYTHON bash scripts/prepare_gpu_wheels.sh

  # 2. the payload
  rm -rf "$DOWNLOADS" "$STAGE"
  mkdir -p "$DOWNLOADS/dali"
  download "$DOWNLOADS/dali" "${DALI_WHEELS[@]}"
  ls -l "$DOWNLOADS/dali"
  "$PYTHON" scripts/payload.py stage-wheels "$DOWNLOADS"/dali/*.whl --dest "$STAGE"
  "$PYTHON" scripts/payload.py prune "$STAGE" --python "$TARGET_PYTHON" --strip
  # Every compiled module left must be for CPython 3.12 (or version-independent).
  if find "$STAGE" -name "*.cpython-*.so" | grep -v "cpython-312-" | grep -q .; then
    echo "error: extension modules for another CPython are left in $STAGE" >&2
    exit 1
  fi
  du -sh "$STAGE"
  "$PYTHON" scripts/payload.py pack "$STAGE" "$PAYLOAD" --name dali-cp312 \
    --part-mib "$PART_MIB" --preset "$XZ_PRESET"
fi

# 3. the rehearsal, from the parts alone
if [ "$REHEARSAL" = 1 ]; then
  py312=$(find_python312) || {
    echo "error: no CPython 3.12 here for the rehearsal; set REHEARSAL_PYTHON or REHEARSAL=0" >&2
    exit 1
  }
  mkdir -p "$DOWNLOADS/image"
  download "$DOWNLOADS/image" "${IMAGE_WHEELS[@]}"
  rehearsal=$(mktemp -d -t deitlt-payload-rehearsal-XXXXXX)
  trap 'rm -rf "$rehearsal"' EXIT
  for part in "$PAYLOAD"/part-*; do cp -r "$part" "$rehearsal/"; done
  "$py312" -m venv "$rehearsal/venv"
  "$rehearsal/venv/bin/python" -m pip install --quiet --no-index --find-links "$DOWNLOADS/image" \
    "${IMAGE_WHEELS[@]}"
  site=$("$rehearsal/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$rehearsal/venv/bin/python" scripts/payload.py install "$rehearsal" "$site"
  (cd "$rehearsal" && "$rehearsal/venv/bin/python" "$OLDPWD/scripts/payload.py" smoke)
  echo "rehearsal passed: $("$rehearsal/venv/bin/python" --version), from the parts alone"
else
  echo "rehearsal skipped (REHEARSAL=0): the payload has not been imported by CPython 3.12"
fi

if [ "$KEEP_DOWNLOADS" != 1 ]; then
  rm -rf "$DOWNLOADS" "$STAGE"
fi

# 4. the transfers
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null |
  tail -1 | cut -f1)
wheels_bytes=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
"$PYTHON" - "$PAYLOAD" "$WHEELS" "$tree_bytes" "$wheels_bytes" "$LIMIT_MIB" <<'EOF'
import json, sys
from pathlib import Path

payload, wheels, tree, wheel_bytes, limit_mib = sys.argv[1:]
tree, wheel_bytes, limit = int(tree), int(wheel_bytes), int(limit_mib) * 1024 * 1024
manifest = json.loads((Path(payload) / "manifest.json").read_text())
parts = manifest["parts"]
mib = lambda n: f"{n / 1024 / 1024:.1f} MiB"
transfers = []
for i, part in enumerate(parts):
    directory = f"{payload}/{part['file'].split('/')[0]}"
    check = f"python3 scripts/payload.py check {directory} --sha256 {part['sha256']}"
    transfers.append({"carry": [directory], "bytes": tree + part["bytes"] + 4096, "command": check})
last = transfers[-1]
if last["bytes"] + wheel_bytes <= limit:
    last["carry"].append(wheels)
    last["bytes"] += wheel_bytes
else:
    transfers.insert(0, {"carry": [wheels], "bytes": tree + wheel_bytes, "command": "ls build/wheels"})
last["command"] += " && bash scripts/gpu_check.sh"
print(
    f"\npayload: {manifest['files']} files, {mib(manifest['tar_bytes'])} as tar, "
    f"{mib(manifest['bytes'])} in {len(parts)} parts (sha256 {manifest['sha256']}); "
    f"working tree {mib(tree)}, build/wheels {mib(wheel_bytes)}"
)
print(
    f"\n{len(transfers)} transfers to the GPU machine, one `run` each, back to back (it keeps "
    "build/ only while it stays warm, about 30 s after a call):"
)
for n, t in enumerate(transfers, 1):
    if t["bytes"] > limit:
        sys.exit(f"error: transfer {n} would carry {mib(t['bytes'])}, over {limit_mib} MiB")
    print(f"\n{n}/{len(transfers)}  carry: {json.dumps(t['carry'])}  ({mib(t['bytes'])} with the tree)")
    print(f"     command: {t['command']}")
EOF
