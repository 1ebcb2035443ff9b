"""Tiny random-weight instances of the DiT image and video families ComfyUI samples with CFG, built
with ComfyUI's own model classes in library mode (comfy.supported_models.<Family>(config).get_model),
and synthetic conditioning shaped like each family's real text encoder output.

The architectures are the real ones (same classes, same conditioning path through extra_conds);
only widths, depths and head counts are shrunk. The text-encoder side keeps the real token width,
sequence-length rule, start-token rule and extra keys, read from comfy/text_encoders/*:

  sd3          CLIP-L+G (77 tokens, start token, zero-padded to 4096) then T5 (77 tokens); pooled 2048
  pixart       T5-XXL 4096, unpadded, no start token; no pooled vector (PixArt-alpha / -sigma)
  chroma       the PixArt T5 encoder (4096, unpadded, no start token)
  qwen_image   Qwen2.5-VL 3584, chat template stripped (no start token); attention_mask only if padded
  hidream      T5 4096 (128 tokens, padded) as the main tensor, plus conditioning_llama3 [1, 32, T, 4096]
               (every Llama-3.1 layer) and pooled 2048 (CLIP-L + CLIP-G)
  lumina2      Gemma-2 2B 2304, BOS start token, unpadded, attention_mask (all ones) returned
  wan          UMT5-XXL 4096, padded with zeros to 512, no start token, no pooled vector
  hunyuan_video  Llama-3 4096 (template stripped: no start token), pooled 768 from CLIP-L
  flux         T5 4096 (256 tokens), pooled 768, guidance key: a guidance-distilled model (negative case)

Random but well-scaled weights (randn / sqrt(fan_in), norms at 1). Never committed: built per test.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .comfy_env import use_comfy_library
from .tiny_models import _init_


@dataclass(frozen=True)
class TinyFamily:
    key: str  # cfg_distill.families key
    model_class: str  # comfy.supported_models class name
    unet_config: dict
    token_dim: int
    start_token: bool
    fixed_length: int | None  # padded encoders: every prompt has this many tokens
    pad_zeros: bool = False  # Wan's UMT5 zeroes masked (padding) positions
    prefix_tokens: int = 0  # SD3: a 77-token CLIP block (768+1280 padded to 4096) before the T5 tokens
    pooled_dim: int | None = None
    extras: dict = field(default_factory=dict)  # constant extra keys (guidance, ...)
    llama_layers: int = 0  # HiDream: conditioning_llama3 [1, layers, T, 4096]
    attention_mask: bool = False  # Lumina 2: an all-ones mask is returned with the tokens
    latent_channels: int = 16
    frames: int | None = None  # latent frames: video families, and Qwen-Image (5-D latents, 1 frame)
    latent_hw: tuple[int, int] = (8, 8)  # PixArt's position embedding needs >= 48 (384 px)


FAMILY_SPECS = {
    "sd3": TinyFamily(
        "sd3", "SD3",
        dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=2048,
             context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
             num_patches=64 * 64, pos_embed_max_size=64, pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
             qk_norm="rms"),
        4096, True, 77 + 77, prefix_tokens=77, pooled_dim=2048),
    "pixart_alpha": TinyFamily(
        "pixart", "PixArtAlpha",
        # hidden 96: the size / aspect-ratio micro-conditions take a third of it each
        dict(image_model="pixart_alpha", num_heads=2, patch_size=2, hidden_size=96, in_channels=4, depth=2,
             model_max_length=120, input_size=32, pe_interpolation=0.5, micro_condition=True),
        4096, False, None, latent_channels=4, latent_hw=(48, 48)),
    "pixart_sigma": TinyFamily(
        "pixart", "PixArtSigma",
        dict(image_model="pixart_sigma", num_heads=2, patch_size=2, hidden_size=64, in_channels=4, depth=2,
             model_max_length=300, input_size=32, pe_interpolation=0.5, micro_condition=False),
        4096, False, None, latent_channels=4, latent_hw=(48, 48)),
    "chroma": TinyFamily(
        "chroma", "Chroma",
        dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=64,
             mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
             patch_size=2, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=64, n_layers=1),
        4096, False, None),
    "qwen_image": TinyFamily(
        "qwen_image", "QwenImage",
        dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=1, attention_head_dim=32,
             num_attention_heads=2, joint_attention_dim=3584, axes_dims_rope=(8, 12, 12)),
        3584, False, None, frames=1),
    "hidream": TinyFamily(
        "hidream", "HiDream",
        dict(image_model="hidream", in_channels=16, patch_size=2, attention_head_dim=32, num_attention_heads=2,
             axes_dims_rope=[16, 8, 8], caption_channels=[4096, 4096], max_resolution=[32, 32],
             llama_layers=[0, 1, 1], num_routed_experts=2, num_activated_experts=1, num_layers=1,
             num_single_layers=1, text_emb_dim=2048),
        4096, False, 128, pooled_dim=2048, llama_layers=32),
    "lumina2": TinyFamily(
        "lumina2", "Lumina2",
        dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=2304, n_layers=1,
             n_refiner_layers=1, n_heads=2, n_kv_heads=1, qk_norm=True, axes_dims=[8, 12, 12],
             axes_lens=[300, 512, 512], rope_theta=10000.0, ffn_dim_multiplier=4.0, multiple_of=16),
        2304, True, None, attention_mask=True),
    "wan21_t2v": TinyFamily(
        "wan", "WAN21_T2V",
        dict(image_model="wan2.1", model_type="t2v", dim=64, out_dim=16, in_dim=16, num_heads=2, ffn_dim=128,
             num_layers=1, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True,
             cross_attn_norm=True, eps=1e-6, text_len=512),
        4096, False, 512, pad_zeros=True, frames=3),
    "wan22_t2v": TinyFamily(  # Wan 2.2 5B layout: 48-channel latents (Wan 2.2 VAE)
        "wan", "WAN22_T2V",
        dict(image_model="wan2.1", model_type="t2v", dim=64, out_dim=48, in_dim=48, num_heads=2, ffn_dim=128,
             num_layers=1, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True,
             cross_attn_norm=True, eps=1e-6, text_len=512),
        4096, False, 512, pad_zeros=True, latent_channels=48, frames=3),
    "hunyuan_video": TinyFamily(
        "hunyuan_video", "HunyuanVideo",
        dict(image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2], vec_in_dim=768,
             axes_dim=[8, 12, 12], meanflow=False, context_in_dim=4096, hidden_size=64, mlp_ratio=4.0,
             num_heads=2, depth=1, depth_single_blocks=1, theta=256, qkv_bias=True, byt5=False,
             guidance_embed=False, use_cond_type_embedding=False, vision_in_dim=None),
        4096, False, None, pooled_dim=768, frames=3),
    # Negative case: a guidance-distilled family (guidance embedding, no CFG pass to distil).
    "flux": TinyFamily(
        "flux", "Flux",
        dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
             hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
             theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
        4096, False, 256, pooled_dim=768, extras={"guidance": 3.5}),
}
# HunyuanVideo with its guidance embedding (the released T2V model): guidance-distilled, negative case.
FAMILY_SPECS["hunyuan_video_distilled"] = TinyFamily(
    "hunyuan_video", "HunyuanVideo",
    {**FAMILY_SPECS["hunyuan_video"].unet_config, "guidance_embed": True},
    4096, False, None, pooled_dim=768, frames=3, extras={"guidance": 6.0})


# Benchmark sizes: the released models' widths, with fewer blocks so that a shared CPU finishes a
# run in minutes. The DICE / CFG step ratio depends on per-block cost at the real width (a batch-2
# pass against a batch-1 pass); the block count scales both alike.
# - sd3: SD3.5 Medium's MMDiT-X width (1536, 24 heads, x-block self-attention), 4 of its 24 blocks;
#   position table 96 x 96 patches (enough up to 1536 px; the release has 384)
# - wan21_t2v: Wan 2.1 T2V 1.3B's width (dim 1536, 12 heads, ffn 8960), 6 of its 30 blocks
BENCH_CONFIGS = {
    "sd3": dict(depth=24, num_blocks=4, adm_in_channels=2048, num_patches=96 * 96, pos_embed_max_size=96,
                qk_norm="rms", x_block_self_attn_layers=list(range(4)),
                context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}}),
    "wan21_t2v": dict(dim=1536, num_heads=12, ffn_dim=8960, num_layers=6),
}


def comfy_has(spec: TinyFamily) -> bool:
    use_comfy_library()
    import comfy.supported_models

    return hasattr(comfy.supported_models, spec.model_class)


# Config fields that later ComfyUI versions added to the Flux-style parameter dataclasses (0.8.0:
# txt_ids_dims, Chroma's vec_in_dim, HunyuanVideo's meanflow_sum), with the values its detection
# gives these models. Only passed where the installed version's dataclass has the field.
NEWER_FIELDS = {"txt_ids_dims": [], "vec_in_dim": None, "meanflow_sum": False}
PARAMS_CLASSES = {"Chroma": ("comfy.ldm.chroma.model", "ChromaParams"), "Flux": ("comfy.ldm.flux.model", "FluxParams"),
                  "HunyuanVideo": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams")}


def _newer_fields(spec: TinyFamily) -> dict:
    import dataclasses
    import importlib

    where = PARAMS_CLASSES.get(spec.model_class)
    if where is None:
        return {}
    params = getattr(importlib.import_module(where[0]), where[1])
    names = {f.name for f in dataclasses.fields(params)}
    return {k: v for k, v in NEWER_FIELDS.items() if k in names and k not in spec.unet_config}


def build_family_model(name: str, seed: int = 0, bench: bool = False):
    """A ModelPatcher around comfy.supported_models.<class>(tiny config).get_model({}), fp32 on CPU.
    bench: the released model's layout from BENCH_CONFIGS instead of the tiny one."""
    use_comfy_library()
    import comfy.model_patcher
    import comfy.supported_models

    spec = FAMILY_SPECS[name]
    config_cls = getattr(comfy.supported_models, spec.model_class)
    config = config_cls({**spec.unet_config, **_newer_fields(spec), **(BENCH_CONFIGS[name] if bench else {})})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    _init_(model.diffusion_model, seed)
    _init_checkpoint_buffers_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _init_checkpoint_buffers_(module: torch.nn.Module, seed: int) -> None:
    """Floating-point buffers that a checkpoint provides (SD3's pos_embed, PixArt's null caption
    embedding) are allocated with torch.empty by ComfyUI; left so, the model depends on whatever
    memory they got, and tests on it on what ran before them. Fill them from the seed."""
    g = torch.Generator().manual_seed(seed + 1)
    saved = set(module.state_dict().keys())
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in saved and buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)


def latent_shape(name: str, frames: int | None = None) -> tuple[int, ...]:
    spec = FAMILY_SPECS[name]
    h, w = spec.latent_hw
    if spec.frames is None:
        return (1, spec.latent_channels, h, w)
    return (1, spec.latent_channels, frames or spec.frames, h, w)


class FamilyEncoder:
    """Token sequences shaped like the family's text encoder output, from word ids.

    A start token where the encoder has one, word vectors from a fixed vocabulary, padding where the
    encoder pads (zeros for Wan's UMT5), and a causal running mean so later tokens carry the prompt,
    as a causal LM's or CLIP's hidden states do."""

    def __init__(self, name: str, seed: int = 7, vocab: int = 48):
        self.spec = spec = FAMILY_SPECS[name]
        d = spec.token_dim
        g = torch.Generator().manual_seed(seed)
        self.words = torch.randn(vocab, d, generator=g)
        self.bos, self.pad = torch.randn(d, generator=g), torch.randn(d, generator=g)
        self.pool = torch.randn(d, spec.pooled_dim, generator=g) / d ** 0.5 if spec.pooled_dim else None
        self.llama_mix = torch.randn(spec.llama_layers, 1, 1, generator=g) if spec.llama_layers else None
        self.vocab = vocab

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + 0.5 * torch.cumsum(x, 0) / torch.arange(1, x.shape[0] + 1)[:, None]

    def encode(self, ids: list[int]) -> tuple[torch.Tensor, dict]:
        s = self.spec
        rows = ([self.bos] if s.start_token else []) + [self.words[i] for i in ids]
        if not rows:  # the empty prompt still encodes to one token (min_length=1 encoders)
            rows = [self.pad]
        body = self._mix(torch.stack(rows))
        n_content = body.shape[0]
        length = (s.fixed_length - s.prefix_tokens) if s.fixed_length else n_content
        if length > n_content:
            fill = torch.zeros(length - n_content, s.token_dim) if s.pad_zeros else \
                self._mix(torch.cat([torch.stack(rows), self.pad.expand(length - n_content, -1)]))[n_content:]
            body = torch.cat([body, fill])
        body = body[:length]
        if s.prefix_tokens:  # SD3: CLIP-L+G tokens (2048 wide, zero-padded to 4096) then T5
            clip = self._mix(torch.cat([self.bos[None], body[:1].expand(s.prefix_tokens - 1, -1)]))
            clip[:, 2048:] = 0
            body = torch.cat([clip, body])
        tokens = body[None].contiguous()
        extras: dict = dict(s.extras)
        extras["pooled_output"] = (tokens[0, min(len(ids), tokens.shape[1] - 1)] @ self.pool)[None].contiguous() \
            if self.pool is not None else None
        if s.llama_layers:
            llama = body[: s.fixed_length - 1] * self.llama_mix  # [layers, T, D]: one scaled copy per layer
            extras["conditioning_llama3"] = llama[None].contiguous()
        if s.attention_mask:
            extras["attention_mask"] = torch.ones(1, tokens.shape[1], dtype=torch.long)
        return tokens, extras

    def random_ids(self, g: torch.Generator) -> list[int]:
        n = int(torch.randint(3, 9, (1,), generator=g))
        return torch.randint(0, self.vocab, (n,), generator=g).tolist()
