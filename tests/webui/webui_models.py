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
- TeEFusion student LoRAs (models/Lora/): one trained for the tiny checkpoint by this pack's headless
  trainer (train_teefusion_lora.py), the same checkpoint with that LoRA merged into its weights (the
  reference: what `<lora:name:1>` must give), and SDXL / SD3 students written by the pack's saver whose
  keys name modules an SD1.5 UNet does not have.
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


STUDENT = "tiny-teefusion"  # models/Lora/<STUDENT>.safetensors, trained for tiny.safetensors
MERGED = "tiny-teefusion-merged"  # tiny.safetensors + the student's weight change at multiplier 1
STUDENT_PROMPTS = ["a red circle on a blue background", "a green square on a white background",
                   "a yellow triangle on a black background", "a blue circle on a red background"]


def train_student(ckpt: str, lora_folder: str, name: str = STUDENT) -> str:
    """The student LoRA, made as a user makes one: the headless trainer on the checkpoint file.
    lr 1e-3 for 20 steps gives a weight change large enough to see in a 64x64 image (the quality of a
    student is measured on the testbed, not here)."""
    import subprocess
    import sys

    from tools.comfy_env import COMFY_DIR

    os.makedirs(lora_folder, exist_ok=True)
    prompts = os.path.join(lora_folder, f"{name}.prompts.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        f.write("\n".join(STUDENT_PROMPTS))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, os.path.join(root, "train_teefusion_lora.py"), "--comfyui", COMFY_DIR, "--ckpt", ckpt,
           "--out-dir", lora_folder, "--name", name, "--prompts", prompts, "--w-min", "2", "--w-max", "8",
           "--steps", "20", "--batch-size", "2", "--width", "64", "--height", "64", "--rank", "4", "--lr", "1e-3",
           "--x0-steps", "3", "--save-every", "0", "--no-progress", "--cpu", "--overwrite"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise RuntimeError(f"train_teefusion_lora.py failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    for leftover in (prompts, os.path.join(lora_folder, f"{name}.teefusion-train-state")):
        if os.path.exists(leftover):
            os.remove(leftover)
    return os.path.join(lora_folder, f"{name}.safetensors")


def merge_lora(ckpt: str, lora: str, out: str, multiplier: float = 1.0) -> int:
    """A copy of the checkpoint with W + multiplier * (alpha / rank) * up @ down for every LoRA module,
    written from the LoRA format's definition (not from any host's loader); returns how many weights
    changed. Every LoRA module must name a weight of the checkpoint. fp32, so the sum is not rounded."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    sd = load_file(ckpt)
    by_lora_name = {"lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_"): k
                    for k in sd if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    with safe_open(lora, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    modules = sorted({k.split(".", 1)[0] for k in tensors})
    missing = [m for m in modules if m not in by_lora_name]
    assert not missing, f"LoRA modules without a checkpoint weight: {missing[:5]}"
    for m in modules:
        key = by_lora_name[m]
        up, down = tensors[f"{m}.lora_up.weight"].float(), tensors[f"{m}.lora_down.weight"].float()
        scale = float(tensors[f"{m}.alpha"]) / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(sd[key].shape)
        sd[key] = (sd[key].float() + multiplier * scale * delta).contiguous()
    for k, v in list(sd.items()):
        if k.startswith("model.diffusion_model.") and v.dtype != torch.float32:
            sd[k] = v.float()
    save_file(sd, out)
    shutil.copyfile(os.path.splitext(ckpt)[0] + ".yaml", os.path.splitext(out)[0] + ".yaml")
    return len(modules)


# Students for other families, with module names an SD1.5 UNet does not have: SDXL's label embedder
# and second transformer blocks (fused tokens), SD3's joint blocks (the modulation mechanism).
MISMATCHED_MODULES = {
    "sdxl": ("tokens", {"label_emb.0.0": (320, 2816), "input_blocks.7.1.transformer_blocks.1.attn2.to_k": (1280, 2048),
                        "input_blocks.7.1.transformer_blocks.1.attn2.to_v": (1280, 2048)}),
    "sd3": ("mmdit-modulation", {f"joint_blocks.{i}.{part}": shape for i in range(2) for part, shape in (
        ("context_block.attn.qkv", (192, 64)), ("x_block.attn.qkv", (192, 64)), ("x_block.mlp.fc1", (256, 64)),
        ("x_block.mlp.fc2", (64, 256)))}),
}


def write_mismatched_student(folder: str, family: str) -> str:
    """A TeEFusion student of another family, written with the pack's own saver (random weights)."""
    from cfg_distill.teefusion_training import LoraInfo, lora_state_dict, save_lora

    fusion, modules = MISMATCHED_MODULES[family]
    g = torch.Generator().manual_seed(11)
    layers = {f"diffusion_model.{m}": (torch.randn(o, 4, generator=g), torch.randn(4, i, generator=g), 4.0, (o, i))
              for m, (o, i) in modules.items()}
    path = os.path.join(folder, f"{family}-teefusion.safetensors")
    save_lora(path, lora_state_dict(layers), LoraInfo(w_min=2.0, w_max=8.0, fusion=fusion, rank=4, alpha=4.0,
                                                      base_family=family, train_steps=10))
    return path


def write_students(ckpt_folder: str, lora_folder: str) -> None:
    """The student (trained), its merged reference checkpoint, and the mismatched student."""
    ckpt = os.path.join(ckpt_folder, "tiny.safetensors")
    student = train_student(ckpt, lora_folder)
    merge_lora(ckpt, student, os.path.join(ckpt_folder, f"{MERGED}.safetensors"))
    for family in MISMATCHED_MODULES:
        write_mismatched_student(lora_folder, family)


if __name__ == "__main__":  # python -m tests.webui.webui_models OUT WEBUI_CONFIGS
    import sys

    out, configs = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    taesd = write_checkpoint(os.path.join(out, "tiny.safetensors"), configs)
    write_checkpoint(os.path.join(out, "tiny-inpainting.safetensors"), configs, seed=3, inpainting=True)
    write_taesd(taesd, os.path.join(out, "VAE-taesd"))
    write_refiners(os.path.join(out, "dice_refiners"))
    print("ok", out)
