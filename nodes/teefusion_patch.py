"""The released TeEFusion mechanism on a ComfyUI MMDiT model (SD3 / SD3.5), as an object patch.

ComfyUI's MMDiT computes c = t_embedder(t) + y_embedder(y) and feeds c to every block and the final
layer; a model_function_wrapper cannot reach it. So a CLONE gets an object patch
(ModelPatcher.add_object_patch, undone by ComfyUI when the model is unpatched) that replaces
`diffusion_model.y_embedder` with a module whose forward adds TeEFusion's term (cfg_distill.teefusion).

The replacement keeps the module tree: its `mlp` IS the original embedder's mlp (the same module
object, the same parameters), so state-dict keys and LoRA keys (diffusion_model.y_embedder.mlp.0.weight
...) resolve to the very same weights. The timestep embedder is referenced, not registered, so the
replacement adds no keys.
"""
from __future__ import annotations

import torch

from ..cfg_distill.teefusion import fused_pooled_embedding

Y_EMBEDDER = "diffusion_model.y_embedder"


class TeEFusionYEmbedder(torch.nn.Module):
    """y -> y_emb(y) + t_emb(1000 w) * y_emb(y - p_null) / 256, with the model's own embedders."""

    def __init__(self, original: torch.nn.Module, t_embedder: torch.nn.Module, p_null: torch.Tensor, w):
        super().__init__()
        self.mlp = original.mlp  # shared: keeps diffusion_model.y_embedder.mlp.* keys and LoRA patches
        object.__setattr__(self, "original", original)  # not a child: no duplicate keys
        object.__setattr__(self, "t_embedder", t_embedder)
        self.p_null = p_null.detach().clone().float().cpu()
        self.w = w if w is None or isinstance(w, torch.Tensor) else float(w)  # training: None (off) or per row

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.w is None:
            return self.mlp(y)
        t_embed = lambda t: self.t_embedder(t, dtype=y.dtype)  # noqa: E731  (ComfyUI's signature)
        return fused_pooled_embedding(self.mlp, t_embed, y, self.p_null, self.w)

    def extra_repr(self) -> str:
        return f"TeEFusion w={self.w}, p_null {tuple(self.p_null.shape)}"


def _describe(model) -> str:
    return f"{type(model.model).__name__} ({type(model.model.diffusion_model).__name__})"


def apply_teefusion_patch(model, p_null: torch.Tensor, w, clone: bool = True):
    """A clone of `model` (a ModelPatcher) whose pooled embedder adds TeEFusion's term at scale w.

    clone=False patches `model` itself (the trainer's own clone). Raises ValueError, naming the model,
    when it has no MMDiT-style timestep + pooled-text embedder."""
    diffusion = getattr(model.model, "diffusion_model", None)
    try:
        current = model.get_model_object(Y_EMBEDDER)
        t_embedder = model.get_model_object("diffusion_model.t_embedder")
    except AttributeError:
        current = t_embedder = None
    if current is None or t_embedder is None or not hasattr(current, "mlp") or diffusion is None:
        raise ValueError(
            f"TeEFusion Model Patch needs an MMDiT model (SD3 / SD3.5) with a pooled-text embedder "
            f"(y_embedder) and a timestep embedder; this model is {_describe(model)}, which has none. "
            "For UNet models (SD1.5, SDXL) use TeEFusion Conditioning, or a student LoRA trained with "
            "Train TeEFusion.")
    original = current.original if isinstance(current, TeEFusionYEmbedder) else current  # re-patch: replace w
    if p_null.ndim == 1:
        p_null = p_null[None]
    in_features = original.mlp[0].in_features
    if p_null.ndim != 2 or p_null.shape[-1] != in_features:
        raise ValueError(f"the null conditioning's pooled_output is {tuple(p_null.shape)} but this model's pooled "
                         f"embedder takes {in_features}-d vectors: encode \"\" with this model's text encoder")
    if p_null.shape[0] != 1:
        raise ValueError(f"the null conditioning holds {p_null.shape[0]} pooled vectors; give one (the encoding of \"\")")
    patched = model.clone() if clone else model
    patched.add_object_patch(Y_EMBEDDER, TeEFusionYEmbedder(original, t_embedder, p_null, w))
    return patched
