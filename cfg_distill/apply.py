"""Host-independent application of a refiner or a fusion to token embeddings, with the checks and
error messages both hosts (ComfyUI, A1111 / Forge) show. Both adapters call these functions, so
the same tensors give the same numbers in either host."""
from __future__ import annotations

from dataclasses import replace

import torch

from .families import FAMILIES, conditioning_mismatch, describe_dim, families_from_conditioning
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


def check_family_fits(loaded: LoadedRefiner, token_dim: int, extras: dict, what: str = "positive") -> None:
    """Same token width is not enough: SD3, PixArt, HiDream, Wan, HunyuanVideo all use 4096-d tokens.
    The keys the text encoder adds (pooled width, extra token tensors) tell most of them apart."""
    why = conditioning_mismatch(loaded.info.base_family, token_dim, extras)
    if why:
        fam = FAMILIES[loaded.info.base_family]
        could = [FAMILIES[k].label.split(" (")[0] for k in families_from_conditioning(token_dim, extras)]
        hint = f" It looks like {' / '.join(could)} conditioning." if could else ""
        raise ConditioningError(
            f"refiner {loaded.name or ''} was trained for {fam.label}, but the {what} conditioning does not come "
            f"from that family's text encoder: {why}.{hint} Load a refiner trained for this base model."
            .replace("  ", " "))


def refine_tokens(loaded: LoadedRefiner, c: torch.Tensor, uc: torch.Tensor, strength: float = 1.0,
                  extras: dict | None = None, neg_extras: dict | None = None, w: float | None = None) -> torch.Tensor:
    """c + strength * S(c, uc) for [B, T, D] prompt tokens and [1 or B, T', D] negative tokens.
    extras / neg_extras: the conditioning's other keys, checked against the refiner's family.
    w: the guidance scale to reproduce, for refiners trained for a range of w (ignored by single-w
    refiners, which reproduce the w they were trained at).

    Long prompts (77-token chunks, from ComfyUI's CLIPTextEncode or a webui's encoder) keep every
    chunk's start token (see `refiner.refine`), the same rule in both hosts since both call this."""
    if loaded.info.ranges:
        raise ConditioningError(
            f"refiner {loaded.name or ''} holds {len(loaded.info.ranges)} refiners for different noise levels "
            "(a K-range file): it needs per-step conditioning (refine_ranges; ComfyUI's Apply DICE Refiner "
            "does this). Use a single-range refiner here.".replace("  ", " "))
    check_refiner_fits(loaded, c.shape[-1], "positive")
    check_refiner_fits(loaded, uc.shape[-1], "negative")
    if extras is not None:
        check_family_fits(loaded, c.shape[-1], extras, "positive")
    if neg_extras is not None:
        check_family_fits(loaded, uc.shape[-1], neg_extras, "negative")
    check_finite(c, "positive")
    check_finite(uc, "negative")
    amount = None
    if loaded.info.w_input:
        if w is None:
            raise ConditioningError(f"refiner {loaded.name or ''} serves a range of guidance scales: give w".replace("  ", " "))
        try:
            amount = loaded.info.w_amount(w)
        except ValueError as e:
            raise ConditioningError(f"refiner {loaded.name or ''}: {e}".replace("  ", " ")) from None
    module = loaded.module
    if next(module.parameters()).device != c.device:
        module.to(c.device)
    with torch.no_grad():
        return refine(module, c, uc, strength, keep_first_token=loaded.info.keep_first_token, w_amount=amount)


def fuse_tokens(c: torch.Tensor, neg: torch.Tensor, w: float, what: str = "token") -> torch.Tensor:
    """TeEFusion e_c + w (e_c - e_neg) with checks; for tokens [B, T, D] or pooled vectors [B, D]."""
    if c.shape[-1] != neg.shape[-1]:
        raise ConditioningError(
            f"the positive {what} embedding is {describe_dim(c.shape[-1])} but the negative is "
            f"{describe_dim(neg.shape[-1])}: encode both with the same CLIP / text encoder.")
    check_finite(c, "positive")
    check_finite(neg, "negative")
    return fuse(c, neg, w)


def refine_ranges(loaded: LoadedRefiner, c: torch.Tensor, uc: torch.Tensor, strength: float = 1.0,
                  extras: dict | None = None, neg_extras: dict | None = None,
                  w: float | None = None) -> list[tuple[float, float, torch.Tensor]]:
    """(start_percent, end_percent, refined tokens) per noise-level range of the refiner; one
    (0, 1, tokens) for an ordinary refiner. The host evaluates exactly one per sampling step."""
    if not loaded.info.ranges:
        return [(0.0, 1.0, refine_tokens(loaded, c, uc, strength, extras, neg_extras, w))]
    single = replace(loaded.info, ranges=None)
    return [(a, b, refine_tokens(LoadedRefiner(m, single, loaded.name), c, uc, strength, extras, neg_extras, w))
            for a, b, m in loaded.stages]
