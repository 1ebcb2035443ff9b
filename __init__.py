"""ComfyUI entry point of the cfg-distill pack (one-pass guidance: DICE refiners and TeEFusion).
Thin on purpose: the nodes live in nodes/, the host-independent maths in cfg_distill/."""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
