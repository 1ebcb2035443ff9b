"""The frozen text encoder: a full-size CLIP-L (SD1.5 layout, 123M parameters) with random weights,
regenerated bit-exactly from a seed, never trained and never committed.

Platform independence: the numbers come from numpy's PCG64 bit generator (`random_raw`, the raw
64-bit stream, which numpy guarantees per algorithm and seed), turned into uniform values with exact
IEEE operations only (integer shift, multiply by powers of two, one subtraction, one multiplication
by a constant) and rounded float64 -> float32 -> float16, each step a correctly rounded IEEE
conversion. torch.randn is not used: its CPU and GPU streams differ. `clip_state_dict()` checks the
result against CLIP_SHA256.

Design (why not simply every weight random): a random 12-layer pre-LN transformer maps all prompts
to nearly the same output (cosine 0.996 between different prompts, measured), a poor text encoder.
Here the first ACTIVE_LAYERS layers are random and the residual branches of the others are exactly
zero (zero weights and biases, layer-norm scales 1), so those layers are exact identities: ComfyUI
still runs all 12 (same cost as a real CLIP-L), and the training script may skip them without
changing a single bit of the result in float32.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

SEED = 20250506
ACTIVE_LAYERS = 2
NUM_LAYERS, WIDTH, MLP, VOCAB, POSITIONS = 12, 768, 3072, 49408, 77
PREFIX = "cond_stage_model.transformer.text_model."
# sha256 over (name, dtype, shape, bytes) of every tensor in sorted name order; see tensors_sha256.
CLIP_SHA256 = "0926d87f6cb3fe9b4645414e9465eb2cbee10382b397fa5575f7faf2d8a7355f"


def _uniform(seed: int, stream: int, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Uniform(-a, a) with a = sqrt(3) * std (variance std^2), as float16, from PCG64(seed, stream)."""
    n = int(np.prod(shape))
    bits = np.random.PCG64([seed, stream]).random_raw(n)  # uint64, the raw PCG64 stream
    u = (bits >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)  # exact: 53-bit integer * 2^-53
    a = float(np.sqrt(3.0)) * std
    x = (u * 2.0 - 1.0) * a  # *2 and -1 exact in float64; one correctly rounded multiplication
    return x.astype(np.float32).astype(np.float16).reshape(shape)


def clip_spec() -> list[tuple[str, tuple[int, ...], str, float]]:
    """(name without PREFIX, shape, kind, std); kind: 'uniform', 'zeros' or 'ones'."""
    spec = [("embeddings.token_embedding.weight", (VOCAB, WIDTH), "uniform", 1.0),
            ("embeddings.position_embedding.weight", (POSITIONS, WIDTH), "uniform", 1.0)]
    for i in range(NUM_LAYERS):
        p = f"encoder.layers.{i}."
        active = i < ACTIVE_LAYERS
        for ln in ("layer_norm1", "layer_norm2"):
            spec += [(p + ln + ".weight", (WIDTH,), "ones", 0.0), (p + ln + ".bias", (WIDTH,), "zeros", 0.0)]
        for name, (fan_out, fan_in) in (("self_attn.q_proj", (WIDTH, WIDTH)), ("self_attn.k_proj", (WIDTH, WIDTH)),
                                        ("self_attn.v_proj", (WIDTH, WIDTH)), ("self_attn.out_proj", (WIDTH, WIDTH)),
                                        ("mlp.fc1", (MLP, WIDTH)), ("mlp.fc2", (WIDTH, MLP))):
            spec.append((p + name + ".weight", (fan_out, fan_in), "uniform" if active else "zeros",
                         fan_in ** -0.5))
            spec.append((p + name + ".bias", (fan_out,), "zeros", 0.0))
    spec += [("final_layer_norm.weight", (WIDTH,), "ones", 0.0), ("final_layer_norm.bias", (WIDTH,), "zeros", 0.0)]
    return spec


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def clip_state_dict(seed: int = SEED, check: bool = True) -> dict[str, torch.Tensor]:
    """The text encoder's tensors under their SD1.5 checkpoint names (float16)."""
    out = {}
    for stream, (name, shape, kind, std) in enumerate(clip_spec()):
        if kind == "uniform":
            arr = _uniform(seed, stream, shape, std)
            t = torch.from_numpy(arr)
        elif kind == "ones":
            t = torch.ones(shape, dtype=torch.float16)
        else:
            t = torch.zeros(shape, dtype=torch.float16)
        out[PREFIX + name] = t
    if check and seed == SEED and CLIP_SHA256 is not None:
        got = tensors_sha256(out)
        if got != CLIP_SHA256:
            raise RuntimeError(f"regenerated text encoder has sha256 {got}, expected {CLIP_SHA256}: the platform's "
                               "numpy does not reproduce the PCG64 stream; the testbed model would not match")
    return out
