"""Host-independent application of a refiner or a fusion to token embeddings, with the checks and
error messages both hosts (ComfyUI, A1111 / Forge) show. Both adapters call these functions, so
the same tensors give the same numbers in either host."""
from __future__ import annotations

from dataclasses import replace

import torch

from .families import describe_dim
from .fusion import fuse
from .refiner import refine
from .refiner_file import LoadedRefiner


class ConditioningError(ValueError):
    """Conditioning that cannot be refined; the message names what is wrong and what would be right."""


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ConditioningError(
            f"the {what} conditioning contains NaN or inf values. Check the text encoder "
            "(try fp32 text encoding) or a node upstream that produced them.")


def check_refiner_fits(loaded: LoadedRefiner, token_dim: int, what: str = "positive") -> None:
    if loaded.info.token_dim != token_dim:
        raise ConditioningError(
            f"refiner {loaded.name or ''} expects {describe_dim(loaded.info.token_dim)} tokens "
            f"(trained for family {loaded.info.base_family}), but the {what} conditioning has "
            f"{describe_dim(token_dim)} tokens. Load a refiner trained for this base model.".replace("  ", " "))


def refine_tokens(loaded: LoadedRefiner, c: torch.Tensor, uc: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """c + strength * S(c, uc) for [B, T, D] prompt tokens and [1 or B, T', D] negative tokens."""
    if loaded.info.ranges:
        raise ConditioningError(
            f"refiner {loaded.name or ''} holds {len(loaded.info.ranges)} refiners for different noise levels "
            "(a K-range file): it needs per-step conditioning (refine_ranges; ComfyUI's Apply DICE Refiner "
            "does this). Use a single-range refiner here.".replace("  ", " "))
    check_refiner_fits(loaded, c.shape[-1], "positive")
    check_refiner_fits(loaded, uc.shape[-1], "negative")
    check_finite(c, "positive")
    check_finite(uc, "negative")
    module = loaded.module
    if next(module.parameters()).device != c.device:
        module.to(c.device)
    with torch.no_grad():
        return refine(module, c, uc, strength, keep_first_token=loaded.info.keep_first_token)


def fuse_tokens(c: torch.Tensor, neg: torch.Tensor, w: float, what: str = "token") -> torch.Tensor:
    """TeEFusion e_c + w (e_c - e_neg) with checks; for tokens [B, T, D] or pooled vectors [B, D]."""
    if c.shape[-1] != neg.shape[-1]:
        raise ConditioningError(
            f"the positive {what} embedding is {describe_dim(c.shape[-1])} but the negative is "
            f"{describe_dim(neg.shape[-1])}: encode both with the same CLIP / text encoder.")
    check_finite(c, "positive")
    check_finite(neg, "negative")
    return fuse(c, neg, w)


def refine_ranges(loaded: LoadedRefiner, c: torch.Tensor, uc: torch.Tensor,
                  strength: float = 1.0) -> list[tuple[float, float, torch.Tensor]]:
    """(start_percent, end_percent, refined tokens) per noise-level range of the refiner; one
    (0, 1, tokens) for an ordinary refiner. The host evaluates exactly one per sampling step."""
    if not loaded.info.ranges:
        return [(0.0, 1.0, refine_tokens(loaded, c, uc, strength))]
    single = replace(loaded.info, ranges=None)
    return [(a, b, refine_tokens(LoadedRefiner(m, single, loaded.name), c, uc, strength))
            for a, b, m in loaded.stages]
