"""Gradient checkpointing of a frozen model, scoped to one call.

Training a refiner back-propagates through the whole frozen diffusion model into the conditioning,
so every block's activations are kept for the backward pass: at 1024 px that is most of the memory.
Checkpointing keeps only each block's input and recomputes its inside during backward (about one
extra forward of compute). It is applied per block, never to the model as one segment: one segment
recomputes everything at once and saves nothing.

The host's model is not modified for longer than the call: `checkpointed_blocks` sets a per-instance
`forward` on each block and deletes it again on exit, even when the call raises.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

# Class names of the repeated blocks in the diffusion models people train refiners for: the
# SD1.5 / SDXL UNet (ResBlock, SpatialTransformer), MMDiT (JointBlock), Flux (DoubleStreamBlock,
# SingleStreamBlock), PixArt / DiT (...Block). Anything called "*Block" counts; nesting is skipped.
_SEGMENT_NAMES = ("SpatialTransformer",)


def _is_segment(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("Block") or name in _SEGMENT_NAMES


def checkpoint_segments(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost block modules of `model`, in registration order. If no module looks like a
    block, the elements of its ModuleLists are used (the blocks of any transformer stack)."""
    found: list[torch.nn.Module] = []

    def walk(m: torch.nn.Module) -> None:
        for child in m.children():
            if _is_segment(child):
                found.append(child)
            else:
                walk(child)

    walk(model)
    if not found:
        for m in model.modules():
            if isinstance(m, torch.nn.ModuleList):
                found.extend(m)
    return found


@contextlib.contextmanager
def checkpointed_blocks(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, every segment of `model` runs under torch.utils.checkpoint when grad is on.
    Yields the number of segments. RNG state is preserved, so results equal the plain forward."""
    if not enabled:
        yield 0
        return
    segments = checkpoint_segments(model)
    patched = []
    try:
        for seg in segments:
            if "forward" in seg.__dict__:
                raise RuntimeError(f"{type(seg).__name__} already has a per-instance forward: another "
                                   "checkpointing or patch is active on this model")
            plain = seg.forward  # the bound class method

            def run(*args, _plain=plain, **kwargs):
                if not torch.is_grad_enabled():
                    return _plain(*args, **kwargs)
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

            seg.forward = run
            patched.append(seg)
        yield len(segments)
    finally:
        for seg in patched:
            seg.__dict__.pop("forward", None)
