"""ComfyUI adapter of cfg-distill (V3 node API)."""
from comfy_api.latest import ComfyExtension, io

from . import folders
from .fusion_nodes import TeEFusionConditioning
from .refiner_nodes import ApplyDiceRefiner, LoadDiceRefiner

folders.register()


class CfgDistillExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadDiceRefiner, ApplyDiceRefiner, TeEFusionConditioning]


async def comfy_entrypoint() -> CfgDistillExtension:
    return CfgDistillExtension()
