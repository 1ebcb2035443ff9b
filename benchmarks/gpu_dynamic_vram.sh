#!/usr/bin/env bash
# The dynamic-VRAM check (benchmarks/gpu_dynamic_vram_check.py) on a lent NVIDIA GPU machine, in two
# steps: `prepare` here (network), `run` there (no network). Not part of CI: CI has no GPU, and
# ComfyUI 0.33 uses dynamic VRAM only on NVIDIA / AMD GPUs (see the check's docstring).
#
#   bash benchmarks/gpu_dynamic_vram.sh prepare
#       # here: .gpu-carry/ (git-ignored) gets the unmodified ComfyUI 0.33.0 archive from
#       # ../shared/hosts and the Python 3.12 wheels that the GPU image lacks (comfy-kitchen and
#       # comfy-aimdo at 0.33's pins, torchsde, trampoline): about 8 MB, which with the checkout
#       # (about 39 MB, mostly weights/) stays under the 64 MiB that travels.
#   device run, carry [".gpu-carry"], timeout_s 420:  bash benchmarks/gpu_dynamic_vram.sh run
#       # there: installs the wheels into /tmp/site, unpacks ComfyUI into /tmp/comfyui-0.33.0 and runs
#       # the check with the image's CUDA torch; the log comes back as $OUT/gpu_dynamic_vram.log.
# Record the result (the PASS / FAIL lines, torch and GPU) in the README's dynamic-VRAM paragraph.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$ROOT/.gpu-carry"
cd "$ROOT"
case "${1:-}" in
  prepare)
    archive=""
    for cand in ${CFG_DISTILL_SHARED:+"$CFG_DISTILL_SHARED"} "$ROOT/../shared" "$ROOT/../../shared"; do
      if [ -f "$cand/hosts/comfyui-0.33.0.tar.gz" ]; then archive="$cand/hosts/comfyui-0.33.0.tar.gz"; break; fi
    done
    [ -n "$archive" ] || { echo "no comfyui-0.33.0.tar.gz in ../shared/hosts (CFG_DISTILL_SHARED names another place)" >&2; exit 1; }
    rm -rf "$CARRY" && mkdir -p "$CARRY"
    cp "$archive" "$CARRY/"
    pin() { grep -v '^\s*#' tools/comfyui-0.33.0-constraints.txt | grep -m1 "^$1=="; }
    # comfy-aimdo: its native library (abi3, 0.3 MB) is what dynamic VRAM runs on.
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$CARRY" "$(pin comfy-aimdo)"
    # comfy-kitchen: its pure-Python build (eager torch kernels, 0.2 MB), not the 58 MB CUDA build,
    # which does not fit what travels; the kernels are not what this check is about.
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
      --platform any -d "$CARRY" "$(pin comfy-kitchen)" torchsde==0.2.6 trampoline==0.1.2
    du -sh "$CARRY"; ls "$CARRY"
    ;;
  run)
    [ -d "$CARRY" ] || { echo "no .gpu-carry/: run 'bash benchmarks/gpu_dynamic_vram.sh prepare' here and carry it" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    rm -rf /tmp/comfyui-0.33.0 && mkdir -p /tmp/comfyui-0.33.0
    tar -xzf "$CARRY/comfyui-0.33.0.tar.gz" -C /tmp/comfyui-0.33.0 --strip-components=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    log="${OUT:-/tmp}/gpu_dynamic_vram.log"
    set -o pipefail
    python3 benchmarks/gpu_dynamic_vram_check.py --comfyui /tmp/comfyui-0.33.0 2>&1 | tee "$log"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_dynamic_vram.sh prepare|run" >&2; exit 2 ;;
esac
