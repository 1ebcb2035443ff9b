#!/usr/bin/env bash
# Set up the real AUTOMATIC1111 1.10.1 and Forge webuis the tests in tests/webui/ run (CPU, offline,
# API mode). Idempotent: a second run only checks. Everything goes into .webuis/ (git-ignored):
#   .webuis/a1111/stable-diffusion-webui   (+ repositories/ the launcher would clone)
#   .webuis/a1111/venv
#   .webuis/forge/stable-diffusion-webui-forge
#   .webuis/forge/venv
#   .webuis/reforge/stable-diffusion-webui-reForge (+ repositories/), .webuis/reforge/venv
#   .webuis/hf-cache                        (openai/clip-vit-large-patch14 tokenizer + config only)
# Sources: the unmodified archives in <repo>/../shared/hosts/ (CFG_DISTILL_HOSTS overrides); where
# they are absent, `git clone` of the public repositories at the same commits.
#   bash tools/setup_webuis.sh            # all three
#   bash tools/setup_webuis.sh a1111      # one of them
# Needs tools/setup_env.sh to have run (ComfyUI's sd1_tokenizer files build the tokenizer cache).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W="$ROOT/.webuis"
PY="${PYTHON:-python3}"
STAMP_NAME=".cfg_distill_webui_v1"
log() { echo "[setup-webuis] $*"; }

find_hosts() {
  for d in "${CFG_DISTILL_HOSTS:-}" "$ROOT/../shared/hosts" "$ROOT/../../shared/hosts"; do
    if [ -n "$d" ] && [ -f "$d/README.md" ]; then (cd "$d" && pwd); return; fi
  done
}
HOSTS="$(find_hosts || true)"

# name|repository|commit (as ../shared/hosts/README.md)
A1111_SRC="stable-diffusion-webui-1.10.1|https://github.com/AUTOMATIC1111/stable-diffusion-webui|82a973c04367123ae98bd9abdf80d9eda9b910e2"
FORGE_SRC="stable-diffusion-webui-forge|https://github.com/lllyasviel/stable-diffusion-webui-forge|dfdcbab685e57677014f05a3309b48cc87383167"
REFORGE_SRC="stable-diffusion-webui-reForge|https://github.com/Panchovix/stable-diffusion-webui-reForge|3b56b268ad9158ee8b30900973b6ccda4ec22241"
# What A1111's launcher clones into repositories/ (folder|repo|commit).
A1111_REPOS=(
  "stable-diffusion-webui-assets|https://github.com/AUTOMATIC1111/stable-diffusion-webui-assets|6f7db241d2f8ba7457bac5ca9753331f0c266917"
  "stable-diffusion-stability-ai|https://github.com/Stability-AI/stablediffusion|cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf"
  "generative-models|https://github.com/Stability-AI/generative-models|45c443b316737a4ab6e40413d7794a7f5657c19f"
  "k-diffusion|https://github.com/crowsonkb/k-diffusion|ab527a9a6d347f364e3d185ba6d714e22d80cb3c"
  "BLIP|https://github.com/salesforce/BLIP|48211a1594f1321b00f14c9f7a5b4813144b2fb9"
)

# unpack_or_clone SPEC DEST: the tree of SPEC at DEST (archive if present, else git clone).
unpack_or_clone() {
  local name repo commit dest="$2"
  IFS='|' read -r name repo commit <<<"$1"
  [ -e "$dest" ] && return 0
  local tmp="$dest.partial"
  rm -rf "$tmp"; mkdir -p "$tmp"
  if [ -n "$HOSTS" ] && [ -f "$HOSTS/$name.tar.gz" ]; then
    log "unpacking $name.tar.gz"
    tar -xzf "$HOSTS/$name.tar.gz" -C "$tmp"
    mv "$tmp/$name" "$dest"
  else
    log "cloning $repo at $commit (no archive $name.tar.gz)"
    git clone --quiet "$repo" "$tmp/$name"
    git -C "$tmp/$name" checkout --quiet "$commit"
    mv "$tmp/$name" "$dest"
  fi
  rm -rf "$tmp"
}

# The only upstream pins that do not install with torch 2.13 on Python 3.11 (see
# ../shared/reference/webui_hosts.md): setuptools must be >= 77.0.3 for torch and < 81 for
# pkg_resources users. torch itself is held to the local CPU wheel.
write_constraints() {
  cat > "$1" <<'EOF'
torch==2.13.0+cpu
setuptools>=77.0.3,<81
EOF
}

make_venv() {  # make_venv VENV REQUIREMENTS EXTRA...
  local venv="$1" req="$2"; shift 2
  [ -f "$venv/$STAMP_NAME" ] && return 0
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  local pip=("$venv/bin/python" -m pip --disable-pip-version-check)
  write_constraints "$venv/constraints.txt"
  grep -v -i -E '^(setuptools|torch)([=<> ]|$)' "$req" > "$venv/requirements.txt"
  log "pip install into $venv (a few minutes)"
  nice -n 10 "${pip[@]}" install --quiet -c "$venv/constraints.txt" torch==2.13.0+cpu "setuptools>=77.0.3,<81"
  nice -n 10 "${pip[@]}" install --quiet -c "$venv/constraints.txt" -r "$venv/requirements.txt" "$@"
  # PyPI's torchvision is a CUDA build: the same op-schema import hook as the ComfyUI test venv.
  local site
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp "$ROOT/tools/torchvision_cpu_shim.py" "$site/_cfg_distill_tv_shim.py"
  echo "import _cfg_distill_tv_shim" > "$site/_cfg_distill_tv_shim.pth"
  "$venv/bin/python" -c "import torch, torchvision, transformers; print('[setup-webuis] ok:', torch.__version__)"
  touch "$venv/$STAMP_NAME"
}

# HF cache entry for openai/clip-vit-large-patch14 (tokenizer + config, no weights: they come from
# the checkpoint), built from ComfyUI's copies of the same files.
make_hf_cache() {
  local hf="$W/hf-cache" comfy="$ROOT/.comfyui/ComfyUI/comfy"
  local snap="$hf/hub/models--openai--clip-vit-large-patch14/snapshots/0000000000000000000000000000000000000000"
  [ -f "$snap/config.json" ] && return 0
  if [ ! -d "$comfy/sd1_tokenizer" ]; then
    echo "[setup-webuis] $comfy/sd1_tokenizer missing: run tools/setup_env.sh first" >&2; exit 1
  fi
  mkdir -p "$snap" "$hf/hub/models--openai--clip-vit-large-patch14/refs"
  cp "$comfy"/sd1_tokenizer/{merges.txt,special_tokens_map.json,tokenizer_config.json,vocab.json} "$snap/"
  "$PY" - "$comfy/sd1_clip_config.json" "$snap" <<'PYEOF'
import json, sys, os
text = json.load(open(sys.argv[1]))
snap = sys.argv[2]
vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
          "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "projection_dim": 768}
cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
       "text_config": text, "vision_config": vision, "logit_scale_init_value": 2.6592}
json.dump(cfg, open(os.path.join(snap, "config.json"), "w"), indent=1)
tok = json.load(open(os.path.join(snap, "tokenizer_config.json")))
tok["model_max_length"] = 77
json.dump(tok, open(os.path.join(snap, "tokenizer_config.json"), "w"), indent=1)
PYEOF
  echo -n "0000000000000000000000000000000000000000" > "$hf/hub/models--openai--clip-vit-large-patch14/refs/main"
}

setup_a1111() {
  local base="$W/a1111" app="$W/a1111/stable-diffusion-webui"
  mkdir -p "$base"
  unpack_or_clone "$A1111_SRC" "$app"
  mkdir -p "$app/repositories"
  for spec in "${A1111_REPOS[@]}"; do
    unpack_or_clone "$spec" "$app/repositories/${spec%%|*}"
  done
  # k-diffusion imports openai's clip (the launcher installs it from a GitHub zip: same module).
  make_venv "$base/venv" "$app/requirements_versions.txt" openai-clip==1.0.1
}

setup_forge() {
  local base="$W/forge" app="$W/forge/stable-diffusion-webui-forge"
  mkdir -p "$base"
  unpack_or_clone "$FORGE_SRC" "$app"
  # The full UI (the tests that start it without --api) mounts the assets its launcher clones; the
  # same commit as A1111's (Forge's launch_utils.py ASSETS_COMMIT_HASH).
  mkdir -p "$app/repositories"
  unpack_or_clone "${A1111_REPOS[0]}" "$app/repositories/stable-diffusion-webui-assets"
  # huggingface_guess (cloned by Forge's launcher) is on PyPI; joblib is missing from its pins.
  make_venv "$base/venv" "$app/requirements_versions.txt" huggingface-guess==0.1.0 joblib
}

setup_reforge() {
  local base="$W/reforge" app="$W/reforge/stable-diffusion-webui-reForge"
  mkdir -p "$base"
  unpack_or_clone "$REFORGE_SRC" "$app"
  # Its launcher clones the same assets, k-diffusion, BLIP and generative-models commits as A1111's,
  # and Stable Diffusion (ldm) from a mirror (joypaul162/Stability-AI-stablediffusion f16630a) of
  # the repository A1111 pins at cf1d67a: the archive of that commit stands in for it.
  mkdir -p "$app/repositories"
  for spec in "${A1111_REPOS[@]}"; do
    unpack_or_clone "$spec" "$app/repositories/${spec%%|*}"
  done
  # Its pins install a pydantic 1.10.15 wheel from a GitHub release: PyPI's pydantic 1.10.15.
  local req="$base/requirements_versions.txt"
  sed -e 's|^https://github.com/Panchovix/pydantic-fixreforge/.*|pydantic==1.10.15|' \
    "$app/requirements_versions.txt" > "$req"
  make_venv "$base/venv" "$req" openai-clip==1.0.1 joblib
}

mkdir -p "$W"
[ -n "$HOSTS" ] && log "host archives: $HOSTS" || log "no host archives found: cloning from GitHub"
make_hf_cache
targets=("$@"); [ ${#targets[@]} -eq 0 ] && targets=(a1111 forge reforge)
for t in "${targets[@]}"; do
  case "$t" in
    a1111) setup_a1111 ;;
    forge) setup_forge ;;
    reforge) setup_reforge ;;
    *) echo "unknown webui '$t' (a1111 | forge | reforge)" >&2; exit 2 ;;
  esac
done
log "done: $W"
