#!/usr/bin/env bash
# Test-only environment for the A1111 / Forge script UI: a second venv (.venv-gradio) with the
# REAL gradio the webuis ship (3.41.2 on A1111, reForge and Forge-classic), CPU torch and pytest.
# It is separate from .venv because gradio 3.41 pins old versions of packages ComfyUI needs newer.
# tests/a1111/test_gradio_ui.py uses it and skips (saying why) when it is absent.
# Idempotent: a second run only checks. Nothing here is committed.
#   bash tools/setup_gradio_env.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-gradio"
PY="${PYTHON:-python3}"
STAMP="$VENV/.cfg_distill_gradio_v1"
# Keeps torch on the CPU wheel (an unpinned torch would pull gigabytes of CUDA packages).
CONSTRAINTS="$ROOT/tools/constraints.txt"

log() { echo "[setup-gradio] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv at $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if [ ! -f "$STAMP" ]; then
  log "installing torch (CPU), gradio==3.41.2 and pytest (takes a few minutes)"
  "$VPY" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" \
      torch==2.13.0 safetensors numpy gradio==3.41.2 pytest
  touch "$STAMP"
fi

"$VPY" -c "import gradio, torch; print('[setup-gradio] ok: gradio', gradio.__version__, 'torch', torch.__version__)"
