"""TeEFusion: fold the guidance direction into the conditioning, e_c + w (e_c - e_neg)."""
from __future__ import annotations

import math

import torch


def repeat_to_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Tile a [B, T, D] token sequence along T to `length` (a multiple of T).

    Repeating a whole sequence leaves cross-attention unchanged (every key appears equally often),
    which is how ComfyUI itself batches conds of different lengths (77 vs 154 tokens)."""
    t = x.shape[1]
    if length % t:
        raise ValueError(f"cannot tile {t} tokens to {length}")
    return x.repeat(1, length // t, 1)


def match_lengths(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two token sequences to a common length: the least common multiple of both."""
    n = math.lcm(a.shape[1], b.shape[1])
    return repeat_to_length(a, n), repeat_to_length(b, n)


def fuse(e_c: torch.Tensor, e_neg: torch.Tensor, w: float) -> torch.Tensor:
    """e_c + w (e_c - e_neg), computed in fp32 and returned in e_c's dtype.

    Token sequences of different lengths are first tiled to a common length; a negative batch of 1
    broadcasts over the prompt batch. Works for token tensors [B, T, D] and pooled vectors [B, D]."""
    if e_c.shape[-1] != e_neg.shape[-1]:
        raise ValueError(f"prompt dim {e_c.shape[-1]} does not match negative dim {e_neg.shape[-1]}")
    if e_neg.shape[0] not in (1, e_c.shape[0]):
        raise ValueError(f"negative batch {e_neg.shape[0]} does not match prompt batch {e_c.shape[0]} (nor is 1)")
    if e_c.ndim == 3 and e_c.shape[1] != e_neg.shape[1]:
        e_c, e_neg = match_lengths(e_c, e_neg)
    c32 = e_c.float()
    fused = c32 + w * (c32 - e_neg.to(e_c.device, torch.float32))
    return fused.to(e_c.dtype)
