"""Tiny real-format files for the real-webui tests, generated at test time (never committed).

- An SD1.5-format checkpoint (tools.tiny_models' tiny UNet, random CLIP-L, TAESD-format VAE) plus
  an all-zero middle ResBlock: Forge always builds one (a checkpoint without it loads with
  uninitialised weights), and zero weights make it the identity, so A1111 and ComfyUI give the same
  network. A1111 builds SD1.5 from an ldm yaml: `<ckpt>.yaml` beside the checkpoint is made from the
  webui's own v1 config with the tiny layout.
- The same with a 9-channel input (an inpainting checkpoint, A1111's hybrid conditioning).
- TAESD decoder / encoder files (models/VAE-taesd/) of the checkpoint's VAE: the webuis decode and
  encode with them, so no full VAE is needed.
- DICE refiners: one for SD1.5 (768-d), one for SDXL (wrong family here), a corrupt file.
"""
from __future__ import annotations

import copy
import os
import re

import torch

from cfg_distill import DiceRefiner, RefinerInfo, save_refiner
from tools import tiny_models

TINY_LAYOUT = {"num_res_blocks": "1", "channel_mult": "[ 1 ]", "attention_resolutions": "[ 1 ]"}


def _middle_resblock(seed: int) -> dict[str, torch.Tensor]:
    """middle_block.0.* of the tiny layout, all zeros (the identity)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    layout = copy.deepcopy(tiny_models.SD15_UNETS["tiny"])
    layout["transformer_depth_middle"] = -1
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_heads=8,
                     use_spatial_transformer=True, context_dim=768, use_linear_in_transformer=False,
                     legacy=False, operations=comfy.ops.disable_weight_init, **layout)
    return {f"model.diffusion_model.{k}": torch.zeros_like(v, dtype=torch.float16)
            for k, v in unet.state_dict().items() if k.startswith("middle_block.")}


def _tiny_yaml(webui_config: str, in_channels: int | None = None) -> str:
    text = open(webui_config, encoding="utf-8").read()
    for key, value in TINY_LAYOUT.items():
        text, n = re.subn(rf"(\n\s+{key}:).*", rf"\1 {value}", text, count=1)
        assert n == 1, f"{key} not found in {webui_config}"
    if in_channels is not None:
        assert re.search(rf"\n\s+in_channels: {in_channels}\b", text), f"{webui_config}: not {in_channels} channels"
    return text


def write_checkpoint(path: str, webui_configs: str, seed: int = 0, inpainting: bool = False) -> dict:
    """The checkpoint, its yaml, and the TAESD state dicts of its VAE (returned)."""
    from safetensors.torch import save_file

    sd = tiny_models.tiny_sd15_state_dict(seed)
    sd.update(_middle_resblock(seed))
    config = "v1-inference.yaml"
    if inpainting:
        key = "model.diffusion_model.input_blocks.0.0.weight"
        w = sd[key]
        g = torch.Generator().manual_seed(seed + 7)
        extra = (torch.randn((w.shape[0], 5, *w.shape[2:]), generator=g) / (9 * 9) ** 0.5).to(w.dtype)
        sd[key] = torch.cat([w, extra], dim=1).contiguous()
        config = "v1-inpainting-inference.yaml"
    save_file(sd, path)
    yaml = os.path.splitext(path)[0] + ".yaml"
    with open(yaml, "w", encoding="utf-8") as f:
        f.write(_tiny_yaml(os.path.join(webui_configs, config), 9 if inpainting else None))
    prefix = "first_stage_model."
    taesd = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    return taesd


def write_taesd(taesd: dict, folder: str) -> None:
    """models/VAE-taesd/taesd_{decoder,encoder}.pth as the webuis read them (torch.save of the
    Sequential's state dict; these are our own freshly generated tensors)."""
    os.makedirs(folder, exist_ok=True)
    for part in ("decoder", "encoder"):
        sub = {k[len(f"taesd_{part}."):]: v for k, v in taesd.items() if k.startswith(f"taesd_{part}.")}
        assert sub, f"no taesd_{part} weights"
        torch.save(sub, os.path.join(folder, f"taesd_{part}.pth"))


def write_refiners(folder: str) -> dict[str, str]:
    os.makedirs(folder, exist_ok=True)
    out = {}
    for name, dim, family, seed in (("tiny_sd15", 768, "sd15", 0), ("tiny_sdxl", 2048, "sdxl", 1)):
        torch.manual_seed(seed)
        r = DiceRefiner(dim, inner_dim=64, heads=8)
        with torch.no_grad():  # a visible change of the conditioning
            for p in r.parameters():
                p.mul_(4.0)
        path = os.path.join(folder, f"{name}.safetensors")
        save_refiner(path, r, RefinerInfo(dim, 64, heads=8, base_family=family, guidance_scale=5.0, train_steps=10))
        out[name] = path
    corrupt = os.path.join(folder, "corrupt.safetensors")
    with open(corrupt, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    out["corrupt"] = corrupt
    return out


if __name__ == "__main__":  # python -m tests.webui.webui_models OUT WEBUI_CONFIGS
    import sys

    out, configs = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    taesd = write_checkpoint(os.path.join(out, "tiny.safetensors"), configs)
    write_checkpoint(os.path.join(out, "tiny-inpainting.safetensors"), configs, seed=3, inpainting=True)
    write_taesd(taesd, os.path.join(out, "VAE-taesd"))
    write_refiners(os.path.join(out, "dice_refiners"))
    print("ok", out)
