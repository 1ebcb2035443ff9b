#!/usr/bin/env bash
# Main job: set up (first run: a few minutes) and run the DICE example workflow on the real ComfyUI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/tools/demo.py" "$@"
