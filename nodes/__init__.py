"""ComfyUI adapter of cfg-distill (V3 node API)."""
from comfy_api.latest import ComfyExtension, io

from . import folders
from . import routes  # noqa: F401  (GET /cfg_distill/refiner_info for the UI; read-only)
from .fusion_nodes import TeEFusionConditioning, TeEFusionModelPatch
from .evaluate_node import EvaluateDiceRefiner
from .refiner_nodes import ApplyDiceRefiner, LoadDiceRefiner
from .training_node import TrainDiceRefiner, TrainTeEFusion

folders.register()


class CfgDistillExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadDiceRefiner, ApplyDiceRefiner, TeEFusionConditioning, TrainDiceRefiner, EvaluateDiceRefiner,
                TeEFusionModelPatch, TrainTeEFusion]


async def comfy_entrypoint() -> CfgDistillExtension:
    return CfgDistillExtension()
