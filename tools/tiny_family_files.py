"""Tiny random-weight model FILES of the DiT families that ComfyUI's stock loaders detect and load,
for running the example workflows on the real server (generated per test session, never committed).

Which dimensions a stock loader reads from a state dict (and so may be shrunk) and which it fixes,
from comfy/model_detection.py and comfy/sd.py (0.3.75 and 0.8.0 alike):

- SD3 / SD3.5 checkpoint (CheckpointLoaderSimple): the MMDiT's hidden size is 64 x depth (read from
  x_embedder), context / pooled widths, position-table size, qk_norm and the MMDiT-X self-attention
  layers are read: all shrinkable. Text encoders come from text_encoders.clip_l / clip_g / t5xxl,
  each optional (SD3.clip_target); we embed CLIP-L only, at its full (fixed) size, as the SD1.5
  fixture does. The VAE may be TAESD-format: latent channels are read from taesd_decoder.1.weight.
- Wan 2.1 T2V diffusion model (UNETLoader): dim, ffn_dim, layer count, in/out channels are read;
  heads = dim // 128 (so dim is a multiple of 128); the text width 4096 is the class default.
- Wan 2.1 VAE (VAELoader; also Qwen-Image's VAE format): the base width is read from
  decoder.head.0.gamma, the rest (channel multipliers, blocks, 16 latent channels) is fixed.
- Qwen-Image diffusion model (UNETLoader): only in_channels and the number of blocks are read; the
  width (24 heads x 128 = 3072) and the 3584-d text input are fixed, so the smallest detectable
  model is ONE full-width block: 380M parameters (760 MB in fp16). That is the real block.
"""
from __future__ import annotations

import torch

from .comfy_env import use_comfy_library
from .tiny_models import _init_

# SD3.5 Medium's layout (MMDiT-X: qk RMS-norm, extra x-block self-attention), shrunk: depth 2
# (hidden 128, 2 heads), a 32 x 32 patch position table (up to 512 px).
SD35_UNET = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=2048,
                 context_embedder_config={"target": "torch.nn.Linear",
                                          "params": {"in_features": 4096, "out_features": 128}},
                 num_patches=32 * 32, pos_embed_max_size=32, pos_embed_scaling_factor=None,
                 x_block_self_attn_layers=[0], qk_norm="rms")
WAN21_T2V_UNET = dict(image_model="wan2.1", model_type="t2v", dim=128, out_dim=16, in_dim=16, num_heads=1,
                      ffn_dim=256, num_layers=2, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1),
                      qk_norm=True, cross_attn_norm=True, eps=1e-6)
QWEN_IMAGE_UNET = dict(image_model="qwen_image", in_channels=64, num_layers=1)
WAN21_VAE_DIM = 8  # the released Wan 2.1 VAE: 96


def _fp16(sd: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def _fill_buffers_(module: torch.nn.Module, seed: int) -> None:
    """Buffers a checkpoint provides (SD3's pos_embed) are torch.empty in ComfyUI's classes."""
    g = torch.Generator().manual_seed(seed + 1)
    saved = set(module.state_dict().keys())
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in saved and buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)


def _diffusion_model(model_class: str, unet_config: dict, seed: int) -> torch.nn.Module:
    use_comfy_library()
    import comfy.supported_models

    config = getattr(comfy.supported_models, model_class)(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}).diffusion_model
    _init_(model, seed)
    _fill_buffers_(model, seed)
    return model


def tiny_sd35_mmdit_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The MMDiT alone (diffusion-model file keys, as UNETLoader reads them)."""
    return _fp16(_diffusion_model("SD3", SD35_UNET, seed).state_dict())


def tiny_sd35_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """An SD3.5-format checkpoint: model.diffusion_model.* (tiny MMDiT-X), text_encoders.clip_l.*
    (full-size random CLIP-L), first_stage_model.* (TAESD3 format: 16 latent channels)."""
    use_comfy_library()
    import comfy.sd1_clip
    import comfy.taesd.taesd

    sd = tiny_sd35_mmdit_state_dict(seed)
    sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    _init_(clip, seed + 1)
    sd.update(_fp16({k: v for k, v in clip.state_dict().items() if k.startswith("transformer.text_model.")},
                    "text_encoders.clip_l."))
    vae = comfy.taesd.taesd.TAESD(latent_channels=16)
    _init_(vae, seed + 2)
    vae_sd = vae.state_dict()
    vae_sd["vae_scale"] = torch.ones_like(vae_sd["vae_scale"])  # TAESD's latent scaling: identity
    vae_sd["vae_shift"] = torch.zeros_like(vae_sd["vae_shift"])
    sd.update(_fp16(vae_sd, "first_stage_model."))
    return sd


def tiny_wan21_t2v_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return _fp16(_diffusion_model("WAN21_T2V", WAN21_T2V_UNET, seed).state_dict())


def tiny_qwen_image_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return _fp16(_diffusion_model("QwenImage", QWEN_IMAGE_UNET, seed).state_dict())


def tiny_wan21_vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Wan 2.1 VAE format (what VAELoader detects for Wan 2.1 and Qwen-Image), base width 8."""
    use_comfy_library()
    from comfy.ldm.wan.vae import WanVAE

    vae = WanVAE(dim=WAN21_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    _init_(vae, seed)
    return _fp16(vae.state_dict())


WRITERS = {
    "sd35": tiny_sd35_state_dict,
    "sd35_mmdit": tiny_sd35_mmdit_state_dict,
    "wan21_t2v": tiny_wan21_t2v_state_dict,
    "qwen_image": tiny_qwen_image_state_dict,
    "wan21_vae": tiny_wan21_vae_state_dict,
}


def write(kind: str, path: str, seed: int = 0) -> str:
    from safetensors.torch import save_file

    save_file(WRITERS[kind](seed), path)
    return path
