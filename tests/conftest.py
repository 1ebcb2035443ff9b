import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for p in (ROOT, TESTS):
    if p not in sys.path:
        sys.path.insert(0, p)

pytest_plugins = ["comfy_fixtures"]


def pytest_report_header(config):
    """Which ComfyUI / frontend this run tests (tools/test.sh runs a matrix of them)."""
    from tools.comfy_env import COMFY_DIR, FRONTEND_ROOT, comfyui_version, frontend_version

    frontend = frontend_version() + (f" (--front-end-root {FRONTEND_ROOT})" if FRONTEND_ROOT else "")
    return [f"ComfyUI {comfyui_version()} at {COMFY_DIR}; frontend {frontend}; python {sys.executable}"]
