"""TeEFusion: fold the guidance direction into the positive conditioning, e_c + w (e_c - e_neg)."""
from comfy_api.latest import io

from ..cfg_distill import ConditioningError
from ..cfg_distill import fuse_tokens as fuse_embeddings
from .conditioning import first_tokens, map_entries
from .refiner_nodes import CFG1_RULE


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
