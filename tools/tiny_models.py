"""Tiny real-architecture models, generated on the fly (never committed).

- write_tiny_sd15(path): an SD1.5-format checkpoint that the stock CheckpointLoaderSimple detects
  as SD1.5 (model_channels 320, context 768, conv proj_in, no middle block, one level), with a
  full-size random CLIP-L text encoder and a TAESD-format VAE. Random but well-scaled weights
  (randn / sqrt(fan_in)), so outputs are finite and depend on the prompt.
- build_tiny_sdxl(): an SDXL-architecture ModelPatcher in library mode (SDXL cannot be shrunk
  through checkpoint detection), for conditioning tests with 2048-d tokens and pooled vectors.
"""
from __future__ import annotations

import copy

import torch

from .comfy_env import use_comfy_library


def _init_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("bias"):
                p.zero_()
            else:  # norm scales: zeros would give a dead network
                p.fill_(1.0)


# UNet layouts in SD1.5 checkpoint form. "tiny": the smallest that SD1.5 detection accepts (18.7M);
# "full": the real SD1.5 UNet (859M), for benchmarks.
SD15_UNETS = {
    "tiny": dict(num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                 transformer_depth_middle=-2),
    "full": dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1),
}


def _sd15_unet(size: str = "tiny"):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    return UNetModel(
        image_size=32, in_channels=4, model_channels=320, out_channels=4, num_heads=8,
        use_spatial_transformer=True, context_dim=768, use_linear_in_transformer=False, legacy=False,
        operations=comfy.ops.disable_weight_init,
        **copy.deepcopy(SD15_UNETS[size]))  # UNetModel pops from the depth lists


def tiny_sd15_state_dict(seed: int = 0, dtype=torch.float16, unet_size: str = "tiny") -> dict[str, torch.Tensor]:
    use_comfy_library()
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd

    sd = {}
    unet = _sd15_unet(unet_size)
    _init_(unet, seed)
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    _init_(clip, seed + 1)
    sd.update({f"cond_stage_model.{k}": v for k, v in clip.state_dict().items()
               if k.startswith("transformer.text_model.")})
    vae = comfy.taesd.taesd.TAESD()
    _init_(vae, seed + 2)
    for k, v in vae.state_dict().items():
        if k == "vae_scale":
            v = torch.ones_like(v)
        elif k == "vae_shift":
            v = torch.zeros_like(v)
        sd[f"first_stage_model.{k}"] = v
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def write_tiny_sd15(path: str, seed: int = 0, unet_size: str = "tiny", metadata: dict | None = None) -> str:
    """unet_size "full" writes the real 859M-parameter SD1.5 UNet (random weights, ~2 GB in fp16).
    metadata: the file's header metadata (e.g. modelspec.resolution)."""
    from safetensors.torch import save_file

    save_file(tiny_sd15_state_dict(seed, unet_size=unet_size), path, metadata=metadata)
    return path


SDXL_UNETS = {
    "tiny": dict(model_channels=64, transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
                 transformer_depth_middle=-2, num_res_blocks=[1, 1], channel_mult=[1, 2]),
    # The real SDXL base UNet layout (2.6B parameters), for benchmarks.
    "full": dict(model_channels=320, transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                 num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4]),
}


def build_tiny_sdxl(seed: int = 0, size: str = "tiny"):
    """An SDXL-architecture diffusion model (2048-d context, 2816-d y) wrapped as a ModelPatcher."""
    use_comfy_library()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = {
        "use_linear_in_transformer": True, "context_dim": 2048, "adm_in_channels": 2816,
        "num_classes": "sequential", "use_temporal_attention": False, "in_channels": 4, "out_channels": 4,
        "num_head_channels": 64, "num_heads": -1, "image_size": 32, "use_spatial_transformer": True,
        "legacy": False, **copy.deepcopy(SDXL_UNETS[size]),
    }
    config = comfy.supported_models.SDXL(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    _init_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def build_tiny_sd3(seed: int = 0, depth: int = 2):
    """An SD3-architecture MMDiT (ComfyUI's own class: 16-channel latents, 4096-d context, 2048-d pooled
    y, hidden 64 * depth) wrapped as a ModelPatcher, in fp32 on CPU."""
    use_comfy_library()
    import comfy.model_patcher
    import comfy.supported_models

    hidden = 64 * depth
    unet_config = {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
        "adm_in_channels": 2048, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": hidden}},
        "num_patches": 64, "pos_embed_max_size": 8,
    }
    config = comfy.supported_models.SD3(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    _init_(model.diffusion_model, seed)
    with torch.no_grad():  # pos_embed is an uninitialised buffer (torch.empty), not a parameter
        model.diffusion_model.pos_embed.copy_(
            torch.randn(model.diffusion_model.pos_embed.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))
