"""Locate the project's ComfyUI (installed by tools/setup_env.sh) and import it in library mode."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY_DIR = os.environ.get("CFG_DISTILL_COMFYUI", os.path.join(ROOT, ".comfyui", "ComfyUI"))


def use_comfy_library() -> str:
    """Put ComfyUI on sys.path and force CPU, before comfy.model_management is imported."""
    if not os.path.isfile(os.path.join(COMFY_DIR, "main.py")):
        raise RuntimeError(f"ComfyUI not found at {COMFY_DIR}: run `bash tools/setup_env.sh` first")
    if COMFY_DIR not in sys.path:
        sys.path.insert(0, COMFY_DIR)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    return COMFY_DIR
