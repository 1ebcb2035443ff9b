"""Evaluate DICE Refiner: how much of the gap between cfg 1 and CFG a refiner closes, measured on
prompts and noised latents of your choice (ideally ones it was not trained on)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..cfg_distill.prompts import default_prompts
from ..cfg_distill.training import evaluate_gap
from .comfy_training import ComfyDistillHost, encode_prompts
from .refiner_nodes import DiceRefinerType


def measure_gap(model, clip, refiner, prompts: list[str], guidance_scale: float, batches: int, batch_size: int,
                width: int, height: int, seed: int, x0_steps: int = 8, loss: str = "l2"):
    with torch.inference_mode(False), torch.enable_grad():
        encoded = encode_prompts(clip, prompts)
        null = encode_prompts(clip, [""])[0]
        host = ComfyDistillHost(model, encoded, null, guidance_scale, batch_size)
        host.load()
        try:
            for i in range(len(prompts)):
                host.add_x0_from_teacher(i, (height // 8, width // 8), x0_steps, seed + 7919 * (i + 1))
            g = torch.Generator().manual_seed(seed)
            data = [host.sample_batch(k, g) for k in range(batches)]
            module = refiner.module.to(host.device)
            with torch.no_grad():
                return evaluate_gap(module, data, host.teacher, host.student, loss=loss,
                                    keep_first_token=refiner.info.keep_first_token)
        finally:
            host.cleanup()


class EvaluateDiceRefiner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EvaluateDiceRefiner",
            display_name="Evaluate DICE Refiner",
            category="conditioning/cfg-distill",
            description="Compares one pass with the refined prompt against the CFG result at w, and plain cfg 1 "
                        "against the same target, on noised latents of the given prompts. gap_ratio < 1 means "
                        "the refiner moves cfg 1 towards CFG (0 would be perfect).",
            inputs=[
                io.Model.Input("model"), io.Clip.Input("clip"), DiceRefinerType.Input("refiner"),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="Held-out prompts, one per line (empty: 8 of the bundled ones)."),
                io.Float.Input("guidance_scale", default=5.0, min=1.0, max=30.0, step=0.1),
                io.Int.Input("batches", default=8, min=1, max=1000),
                io.Int.Input("batch_size", default=2, min=1, max=64),
                io.Int.Input("width", default=512, min=64, max=4096, step=8),
                io.Int.Input("height", default=512, min=64, max=4096, step=8),
                io.Int.Input("seed", default=1234, min=0, max=2**31 - 1),
            ],
            outputs=[io.Float.Output(display_name="refined_loss"), io.Float.Output(display_name="cfg1_loss"),
                     io.Float.Output(display_name="gap_ratio")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, refiner, prompts, guidance_scale, batches, batch_size, width, height,
                seed) -> io.NodeOutput:
        texts = [p.strip() for p in prompts.splitlines() if p.strip()] or default_prompts()[-8:]
        rep = measure_gap(model, clip, refiner, texts, guidance_scale, batches, batch_size, width, height, seed)
        text = (f"refined vs CFG: {rep.refined:.5g} | cfg 1 vs CFG: {rep.baseline:.5g} | "
                f"ratio {rep.ratio:.3f} over {rep.samples} samples")
        return io.NodeOutput(rep.refined, rep.baseline, rep.ratio, ui={"text": [text],
                             "gap": [{"refined": rep.refined, "baseline": rep.baseline, "ratio": rep.ratio,
                                      "samples": rep.samples}]})
