"""Locate the project's ComfyUI (installed by tools/setup_env.sh) and import it in library mode.

The tested ComfyUIs live side by side, each with its own venv (tools/setup_env.sh):
    0.3.75 (default)  .comfyui/ComfyUI         .venv
    0.8.0             .comfyui-0.8.0/ComfyUI   .venv-comfy080
    0.33.0            .comfyui-0.33.0/ComfyUI  .venv-comfy033
CFG_DISTILL_COMFYUI selects one, by version ("0.33.0") or by the path of a ComfyUI folder; run the
tests with that tree's venv python (tools/test.sh does). CFG_DISTILL_FRONTEND_ROOT serves another
frontend build (a comfyui-frontend-package's static/ folder) through ComfyUI's --front-end-root."""
from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = {"0.3.75": os.path.join(ROOT, ".comfyui", "ComfyUI"),
         "0.8.0": os.path.join(ROOT, ".comfyui-0.8.0", "ComfyUI"),
         "0.33.0": os.path.join(ROOT, ".comfyui-0.33.0", "ComfyUI")}
_selected = os.environ.get("CFG_DISTILL_COMFYUI", "0.3.75")
COMFY_DIR = os.path.abspath(TREES.get(_selected, _selected))
FRONTEND_ROOT = os.environ.get("CFG_DISTILL_FRONTEND_ROOT") or None
# The testbed and the demo find ComfyUI through comfy_headless.find_comfyui, which reads COMFYUI_DIR.
os.environ.setdefault("COMFYUI_DIR", COMFY_DIR)
SETUP_HINT = "bash tools/setup_env.sh" if _selected in ("0.3.75", TREES["0.3.75"]) else \
    f"COMFYUI={_selected if _selected in TREES else '<version>'} bash tools/setup_env.sh"


def comfyui_version(comfy_dir: str = COMFY_DIR) -> str:
    """The version the tree says it is (comfyui_version.py), without importing it."""
    try:
        with open(os.path.join(comfy_dir, "comfyui_version.py")) as f:
            return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)
    except (OSError, AttributeError):
        return "unknown"


def pinned_frontend(comfy_dir: str = COMFY_DIR) -> str | None:
    """The comfyui-frontend-package version the tree's requirements.txt pins."""
    try:
        with open(os.path.join(comfy_dir, "requirements.txt")) as f:
            m = re.search(r"^comfyui-frontend-package==(\S+)", f.read(), re.M)
        return m.group(1) if m else None
    except OSError:
        return None


def frontend_version() -> str:
    """The frontend build the server will serve: the package that holds FRONTEND_ROOT, else the
    comfyui-frontend-package installed in this venv (what ComfyUI serves by default)."""
    from importlib import metadata

    if FRONTEND_ROOT:
        # <target>/comfyui_frontend_package/static -> the dist-info in <target>
        target = os.path.dirname(os.path.dirname(os.path.abspath(FRONTEND_ROOT)))
        for dist in metadata.distributions(path=[target]):
            if dist.metadata["Name"].lower().replace("_", "-") == "comfyui-frontend-package":
                return dist.version
        return "unknown"
    try:
        return metadata.version("comfyui-frontend-package")
    except metadata.PackageNotFoundError:
        return "unknown"


def use_comfy_library() -> str:
    """Put the selected ComfyUI on sys.path and force CPU, before comfy.model_management is imported
    (comfy_headless.import_comfy, the pack's own library-mode loader)."""
    if not os.path.isfile(os.path.join(COMFY_DIR, "main.py")):
        raise RuntimeError(f"ComfyUI not found at {COMFY_DIR}: run `{SETUP_HINT}` first")
    if "comfy.cli_args" in sys.modules and COMFY_DIR in sys.path:
        return COMFY_DIR
    from comfy_headless import import_comfy

    return import_comfy(COMFY_DIR, cpu=True)


def load_pack():
    """The pack as a package in library mode, on the selected ComfyUI (comfy_headless.load_pack)."""
    use_comfy_library()
    import nodes  # noqa: F401  ComfyUI's nodes.py before the pack's `nodes` package
    from comfy_headless import load_pack as load

    return load()
