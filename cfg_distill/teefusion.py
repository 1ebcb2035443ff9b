"""TeEFusion's guidance term for MMDiT models (SD3 / SD3.5), as released by its authors.

The released TeEFusion model passes prompt tokens and the pooled vector UNFUSED; guidance enters
only through the vector c that modulates every transformer block:

    c = t_emb(t) + y_emb(p_c) + t_emb(1000 w) * y_emb(p_c - p_null) / 256

t_emb is the model's timestep embedder (sinusoid, then MLP) and y_emb its pooled-text embedder;
p_c and p_null are the pooled vectors of the prompt and of "". The extra term does not depend on
t, so it can be added where y_emb(p_c) is computed: the pooled embedder returns
y_emb(p_c) + teefusion_term(...) and the model adds t_emb(t) as usual.

The sinusoid: cos first, then sin; frequencies exp(-ln(10000) k / half), k = 0..half-1 (the
diffusers convention flip_sin_to_cos=True, downscale_freq_shift=0 that SD3's reference code uses).
The timestep input is in the model's own units, 0..1000 for SD3 (sigma * 1000), so w enters as
1000 w. ComfyUI's timestep_embedding is the same function (tests/test_teefusion_patch.py checks it
bit for bit).

Pure tensor maths; the ComfyUI patch lives in nodes/teefusion_patch.py.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

GUIDANCE_DIVISOR = 256.0  # the release's fixed scale of the guidance term
TIMESTEP_SCALE = 1000.0  # w enters the timestep embedder as 1000 w
FREQUENCY_DIM = 256  # SD3's timestep-embedder input width


def sinusoidal_embedding(t: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """[N] -> [N, dim] in fp32: cat(cos(t f), sin(t f)), f_k = max_period^(-k / half)."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def guidance_timestep(w: "float | torch.Tensor", batch: int, device=None) -> torch.Tensor:
    """The timestep-embedder input that carries w: 1000 w per row (w a number, or one per row)."""
    if isinstance(w, torch.Tensor):
        w = w.reshape(-1).to(device, torch.float32)
        if w.shape[0] != batch:
            raise ValueError(f"{w.shape[0]} guidance scales for a batch of {batch}")
        return TIMESTEP_SCALE * w
    return torch.full((batch,), TIMESTEP_SCALE * float(w), dtype=torch.float32, device=device)


def teefusion_term(t_emb_w: torch.Tensor, y_emb_diff: torch.Tensor) -> torch.Tensor:
    """t_emb(1000 w) * y_emb(p_c - p_null) / 256 (element-wise)."""
    return t_emb_w * y_emb_diff / GUIDANCE_DIVISOR


def fused_pooled_embedding(y_embed: Callable[[torch.Tensor], torch.Tensor],
                           t_embed: Callable[[torch.Tensor], torch.Tensor],
                           p_c: torch.Tensor, p_null: torch.Tensor, w: "float | torch.Tensor") -> torch.Tensor:
    """y_emb(p_c) + t_emb(1000 w) * y_emb(p_c - p_null) / 256: what the patched pooled embedder returns.

    y_embed maps pooled vectors [N, P] to [N, D]; t_embed maps timesteps [N] to [N, D]. p_null is
    [1, P] or [N, P]; it is cast to p_c's device and dtype."""
    if p_null.shape[-1] != p_c.shape[-1]:
        raise ValueError(f"the null pooled vector is {p_null.shape[-1]}-d but the prompt's is {p_c.shape[-1]}-d: "
                         "both must come from the same text encoder")
    if p_null.shape[0] not in (1, p_c.shape[0]):
        raise ValueError(f"null pooled batch {p_null.shape[0]} matches neither 1 nor the prompt batch {p_c.shape[0]}")
    p_null = p_null.to(p_c.device, p_c.dtype)
    t_w = t_embed(guidance_timestep(w, p_c.shape[0], p_c.device))
    return y_embed(p_c) + teefusion_term(t_w, y_embed(p_c - p_null))


def teefusion_vector(t_embed: Callable[[torch.Tensor], torch.Tensor],
                     y_embed: Callable[[torch.Tensor], torch.Tensor],
                     t: torch.Tensor, p_c: torch.Tensor, p_null: torch.Tensor, w: float) -> torch.Tensor:
    """The whole modulation vector c = t_emb(t) + y_emb(p_c) + t_emb(1000 w) y_emb(p_c - p_null) / 256."""
    return t_embed(t) + fused_pooled_embedding(y_embed, t_embed, p_c, p_null, w)
