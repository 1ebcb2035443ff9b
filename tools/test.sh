#!/usr/bin/env bash
# Set up everything the tests need (first run: several minutes) and run the whole test suite:
# core unit tests, the real ComfyUI server, the real frontend in headless Chromium, the A1111 /
# Forge stand-ins and the UI built with the real gradio 3.41.2 (in its own venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WITH_BROWSER=1 bash "$ROOT/tools/setup_env.sh"
if [ -f "$ROOT/tools/setup_gradio_env.sh" ]; then
  bash "$ROOT/tools/setup_gradio_env.sh"
fi
# Real AUTOMATIC1111 1.10.1 and Forge servers for tests/webui (from ../shared/hosts or git clone).
bash "$ROOT/tools/setup_webuis.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest tests "$@"
