"""Pure helpers to rewrite CONDITIONING lists without touching their inputs.

CONDITIONING is a list of [tokens, dict] entries whose values are cached and shared between
nodes: every entry gets a new list and a shallow-copied dict, tensors are never written in place."""
from __future__ import annotations

from typing import Callable

import torch


def first_tokens(conditioning, what: str) -> tuple[torch.Tensor, dict]:
    if not conditioning:
        raise ValueError(f"the {what} conditioning is empty; connect a CLIP Text Encode output")
    tokens, extras = conditioning[0][0], conditioning[0][1]
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        raise ValueError(f"the {what} conditioning does not hold [batch, tokens, dim] text embeddings")
    return tokens, extras


def map_entries(conditioning, fn: Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]):
    """Apply fn(tokens, extras) -> (new_tokens, changed_keys) to every entry; keep all other keys."""
    out = []
    for tokens, extras in conditioning:
        new_tokens, changed = fn(tokens, extras)
        new_extras = dict(extras)
        new_extras.update(changed)
        out.append([new_tokens, new_extras])
    return out
