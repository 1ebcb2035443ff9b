"""TeEFusion distillation, host-independent: a LoRA student learns to reproduce CFG at w from ONE pass
with TeEFusion-fused conditioning, w drawn per sample from a range so one LoRA serves every w.

    teacher(x_t, sigma, c)      = uncond + w (cond - uncond)             (two passes, base model)
    student(x_t, sigma, c, w)   = model_with_lora(x_t, sigma, fuse(c, w)) (one pass)

Fusion per family (the host picks it):
- UNet families (SD1.5, SD2, SDXL): tokens e_c + w (e_c - e_null), and the pooled vector the same
  way where the family has one (SDXL);
- MMDiT (SD3): tokens and pooled vector unfused; w enters through the block modulation, the
  released TeEFusion mechanism (cfg_distill.teefusion).

The trainable tensors (the LoRA's) come from the host (ComfyUI's weight adapters); this module
holds the maths, the Student for the shared loop (cfg_distill.training) and the LoRA file format.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .refiner_file import atomic_save_safetensors
from .training import Batch

STUDENT_KIND = "teefusion-lora"
METHOD = "teefusion"
FUSION_TOKENS = "tokens"  # UNet families: fused tokens (+ pooled where present)
FUSION_MODULATION = "mmdit-modulation"  # SD3: the released guidance term in the block modulation
_METADATA_KEY = "cfg_distill_teefusion"


def draw_w(generator: torch.Generator, n: int, w_min: float, w_max: float) -> torch.Tensor:
    """n guidance scales, uniform in [w_min, w_max] (fp32, CPU)."""
    return w_min + (w_max - w_min) * torch.rand(n, generator=generator)


def _per_sample(w: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    if not isinstance(w, torch.Tensor):
        return float(w)
    return w.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def cfg_per_sample(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """uncond + w (cond - uncond), with one w per sample (computed in fp32, returned in cond's dtype)."""
    c, u = cond.float(), uncond.float()
    return (u + _per_sample(w, c) * (c - u)).to(cond.dtype)


def fuse_per_sample(e_c: torch.Tensor, e_null: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """e_c + w (e_c - e_null) with one w per sample; tokens [B, T, D] (e_null [1 or B, T', D], tiled to a
    common length like cfg_distill.fusion.fuse) or pooled vectors [B, P]."""
    from .fusion import match_lengths

    if e_c.shape[-1] != e_null.shape[-1]:
        raise ValueError(f"prompt width {e_c.shape[-1]} does not match the null encoding's {e_null.shape[-1]}")
    if e_c.ndim == 3 and e_c.shape[1] != e_null.shape[1]:
        e_c, e_null = match_lengths(e_c, e_null.expand(1, -1, -1) if e_null.shape[0] == 1 else e_null)
    c = e_c.float()
    fused = c + _per_sample(w, c) * (c - e_null.to(e_c.device, torch.float32))
    return fused.to(e_c.dtype)


class LoraStudent:
    """A Student (cfg_distill.training) over named trainable tensors and a host's one-pass prediction."""
    kind = STUDENT_KIND

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], predict: Callable[[Batch], torch.Tensor],
                 rank: int):
        if not named:
            raise ValueError("the LoRA has no trainable tensors: the model has no layers to adapt")
        self.named, self._predict, self.rank = named, predict, rank

    def named_trainable(self):
        return self.named

    def signature(self) -> list:
        return [self.rank, len(self.named), sum(p.numel() for _, p in self.named)]

    def predict(self, batch: Batch) -> torch.Tensor:
        return self._predict(batch)


@dataclass
class LoraInfo:
    """Metadata of a TeEFusion student LoRA (written into the .safetensors header)."""
    w_min: float
    w_max: float
    fusion: str  # FUSION_TOKENS or FUSION_MODULATION
    rank: int
    alpha: float
    base_family: str = ""
    base_checkpoint: str = ""
    base_hash: str = ""
    train_steps: int = 0
    fuse_pooled: bool = True
    continued_from: str = ""  # the LoRA this one was trained on from (its file name and steps), if any
    teacher_samples: int = 0  # CFG teacher targets this run trained on (steps x batch x grad_accum x processes)
    command: str = ""  # the command line that made it, when one did
    checks: list = field(default_factory=list)  # [step, loss] of the run's held-out progress checks

    def to_metadata(self) -> dict[str, str]:
        d = asdict(self)
        return {"cfg_distill.method": METHOD, "cfg_distill.w_range": f"{self.w_min:g}-{self.w_max:g}",
                "cfg_distill.fusion": self.fusion, "cfg_distill.base_family": self.base_family,
                "cfg_distill.base_checkpoint": self.base_checkpoint, "ss_network_dim": str(self.rank),
                "ss_network_alpha": f"{self.alpha:g}", _METADATA_KEY: json.dumps(d, sort_keys=True),
                "cfg_distill.usage": ("ComfyUI: load with LoraLoaderModelOnly (strength 1), fuse the conditioning at w "
                                      "(TeEFusion Conditioning, or TeEFusion Model Patch for SD3), sample at cfg 1. "
                                      "A1111 / Forge (UNet families): <lora:NAME:1> in the prompt, CFG distill mode "
                                      "TeEFusion at w, CFG scale 1")}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "LoraInfo | None":
        raw = (meta or {}).get(_METADATA_KEY)
        return cls(**json.loads(raw)) if raw else None

    def summary(self) -> str:
        return (f"TeEFusion student LoRA (rank {self.rank}), w {self.w_min:g}-{self.w_max:g}, fusion {self.fusion}, "
                f"{self.base_family or 'unknown base'}, {self.train_steps} steps")


def lora_key(module_name: str) -> str:
    """ComfyUI module name (diffusion_model.input_blocks.1.1.proj_in) -> LoRA prefix
    lora_unet_input_blocks_1_1_proj_in (a key form ComfyUI's LoRA loader maps for every model)."""
    name = module_name[len("diffusion_model."):] if module_name.startswith("diffusion_model.") else module_name
    return "lora_unet_" + name.replace(".", "_")


def lora_state_dict(layers: dict[str, tuple[torch.Tensor, torch.Tensor, float, tuple]],
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """{module name: (up [out, r], down [r, in...], alpha, weight shape)} -> standard LoRA tensors.

    Convolution weights are stored in the usual conv form: down [r, in, kh, kw], up [out, r, 1, 1]."""
    out = {}
    for module, (up, down, alpha, shape) in layers.items():
        key = lora_key(module)
        up, down = up.detach().float().cpu(), down.detach().float().cpu()
        if len(shape) == 4:
            down = down.reshape(down.shape[0], *shape[1:])
            up = up.reshape(up.shape[0], up.shape[1], 1, 1)
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise ValueError(f"LoRA tensors of {module} are not finite; not saving")
        out[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def lora_layers_from_state_dict(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple],
                                rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of lora_state_dict for a model's adaptable modules {module name: weight shape}:
    {module: (up [out, r], down [r, in * kh * kw])} in float32. A file made for another model or rank
    is refused, naming the first mismatch."""
    expected = {lora_key(m): m for m in shapes}
    own = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    unknown = sorted(own - set(expected))
    if unknown:
        raise ValueError(f"the LoRA has layers this model does not have (e.g. {unknown[0]!r}): it was made for "
                         "another base model")
    missing = sorted(set(expected) - own)
    if missing:
        raise ValueError(f"the LoRA lacks {len(missing)} of this model's layers (e.g. {missing[0]!r}): it was made "
                         "for another base model or by another trainer")
    out = {}
    for key, module in expected.items():
        up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
        shape = shapes[module]
        in_dim = math.prod(shape[1:])
        if up.shape[0] != shape[0] or up.numel() != shape[0] * rank or down.numel() != rank * in_dim:
            raise ValueError(f"LoRA layer {key!r} has up {tuple(up.shape)} / down {tuple(down.shape)}; this model's "
                             f"weight {tuple(shape)} at rank {rank} needs up ({shape[0]}, {rank}) and down "
                             f"({rank}, {in_dim})")
        out[module] = (up.float().reshape(shape[0], rank), down.float().reshape(rank, in_dim))
    return out


def read_student_lora(path: str) -> tuple[dict[str, torch.Tensor], LoraInfo]:
    """(tensors, LoraInfo) of a student LoRA made by this pack; a clear error for anything else."""
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ValueError(f"LoRA {path!r} does not exist: give the path of a .safetensors student LoRA")
    try:
        with safe_open(path, framework="pt") as f:
            info = LoraInfo.from_metadata(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"LoRA {name!r} is not a readable .safetensors file ({e})") from None
    if info is None:
        raise ValueError(f"LoRA {name!r} has no TeEFusion student metadata: only LoRAs saved by Train TeEFusion "
                         "can be continued")
    return tensors, info


def save_lora(path: str, tensors: dict[str, torch.Tensor], info: LoraInfo) -> None:
    atomic_save_safetensors(tensors, path, info.to_metadata())


def validate_w_range(w_min: float, w_max: float) -> None:
    for v in (w_min, w_max):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"w range must be finite numbers (got {w_min!r}..{w_max!r})")
    if w_min < 0 or w_max < w_min:
        raise ValueError(f"w range must satisfy 0 <= w_min <= w_max, e.g. 2 to 8 (got {w_min:g} to {w_max:g})")
