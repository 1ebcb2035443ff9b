"""TeEFusion nodes: training-free fusion of the conditioning, e_c + w (e_c - e_neg), and the released
SD3 model's patch (guidance through the block-modulation vector)."""
import torch
from comfy_api.latest import io

from ..cfg_distill import ConditioningError
from ..cfg_distill import fuse_tokens as fuse_embeddings
from .conditioning import first_tokens, map_entries
from .refiner_nodes import CFG1_RULE
from .teefusion_patch import apply_teefusion_patch


class TeEFusionConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TeEFusionConditioning",
            display_name="TeEFusion Conditioning",
            category="conditioning/cfg-distill",
            description="Fuses prompt and negative embeddings linearly, e_c + w (e_c - e_neg), so the guidance "
                        "strength w travels inside the conditioning. Training-free on stock models (weak); "
                        "made for TeEFusion-distilled models. " + CFG1_RULE,
            inputs=[
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative", tooltip="Usually the empty prompt \"\"."),
                io.Float.Input("w", default=1.0, min=-10.0, max=30.0, step=0.05,
                               tooltip="Guidance magnitude carried in the embedding (0 = unchanged)."),
                io.Boolean.Input("fuse_tokens", default=True, tooltip="Fuse the token sequence."),
                io.Boolean.Input("fuse_pooled", default=True,
                                 tooltip="Fuse pooled_output (SDXL / SD3 pooled CLIP vector) too."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive")],
        )

    @classmethod
    def execute(cls, positive, negative, w, fuse_tokens, fuse_pooled) -> io.NodeOutput:
        neg_tokens, neg_extras = first_tokens(negative, "negative")
        first_tokens(positive, "positive")
        neg_pooled = neg_extras.get("pooled_output")

        def fuse_entry(tokens, extras):
            changed = {}
            if fuse_pooled and extras.get("pooled_output") is not None and neg_pooled is not None:
                changed["pooled_output"] = fuse_embeddings(extras["pooled_output"], neg_pooled, w, "pooled")
            return (fuse_embeddings(tokens, neg_tokens, w) if fuse_tokens else tokens), changed

        try:
            return io.NodeOutput(map_entries(positive, fuse_entry))
        except ConditioningError as e:
            raise ValueError(f"TeEFusion Conditioning: {e}") from None


class TeEFusionModelPatch(io.ComfyNode):
    """The released TeEFusion SD3 model's own mechanism: guidance through the block-modulation vector."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TeEFusionModelPatch",
            display_name="TeEFusion Model Patch",
            category="conditioning/cfg-distill",
            description="For MMDiT models (SD3 / SD3.5), e.g. the released TeEFusion SD3 model (AIDC-AI, "
                        "CC-BY-NC-4.0): adds t_emb(1000 w) * y_emb(p_c - p_null) / 256 to the vector that "
                        "modulates every block, as the authors' code does. Prompt tokens and pooled vector go "
                        "in unfused: connect the plain CLIP Text Encode output as positive. " + CFG1_RULE,
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("w", default=5.0, min=0.0, max=30.0, step=0.05,
                               tooltip="Guidance strength carried by the model (the release's example: 5)."),
                io.Conditioning.Input("null_conditioning",
                                      tooltip="CLIP Text Encode of the empty prompt \"\"; its pooled vector is p_null."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, w, null_conditioning) -> io.NodeOutput:
        _tokens, extras = first_tokens(null_conditioning, "null")
        p_null = extras.get("pooled_output")
        if not isinstance(p_null, torch.Tensor):
            raise ValueError("TeEFusion Model Patch: the null conditioning has no pooled_output; connect CLIP Text "
                             "Encode of \"\" made with the model's own text encoders (SD3: CLIP-L + CLIP-G)")
        return io.NodeOutput(apply_teefusion_patch(model, p_null, w))
