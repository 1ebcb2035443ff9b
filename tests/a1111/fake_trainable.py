"""Tiny TRAINABLE checkpoints for the training-tab tests: a real (small) torch denoiser behind the
two model interfaces a1111.md "Training from a tab" describes. Neither is the webuis' code.

- A1111Model: shared.sd_model of A1111 (ldm LatentDiffusion / sgm DiffusionEngine):
  apply_model(x_t, t, cond) with DDPM-scaled x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise and an
  integer t in [0, 1000), returning eps or, with parameterization "v", v = sqrt(acp) eps -
  sqrt(1 - acp) x0; alphas_cumprod; the UNet at model.diffusion_model; cond a tensor [B, T, D] (SD1)
  or a dict {"crossattn": [B, T, 2048], "vector": [B, 2816]} (SDXL). A1111 does not freeze it: every
  parameter has requires_grad=True. get_learned_conditioning(texts) as the webui calls it
  (an SdConditioning carries width / height / is_negative_prompt; an all-empty NEGATIVE batch is
  zeroed on SDXL, force_zero_negative_prompt). sd_checkpoint_info has name and shorthash.
- ForgeModel: shared.sd_model of Forge: forge_objects.unet is a UNet patcher whose
  model.apply_model(x, sigma, c_crossattn=..., y=...) is k-diffusion style (x = x0 + sigma noise in,
  denoised x0 out); get_learned_conditioning runs under torch.inference_mode(), so its tensors are
  inference tensors (autograd refuses them unless cloned). The noise schedule is read from
  model.predictor.sigmas (Forge's backend/modules/k_model.py and k_prediction.py; not in a1111.md),
  and the predictor turns sigma back into the nearest integer timestep.

Both wrap the same seeded TinyDenoiser (a conv net with cross-attention to the tokens and, for
SDXL, the pooled vector added to its features), so the eps either path yields can be compared with
the network's own output. The text encoder is deterministic and structured like CLIP's: shared
positional embeddings, per-word vectors, and padding tokens that carry the prompt's context.
Every model call runs `on_apply` (tests use it to interrupt, or to look at locks and flags).
"""
import types
import zlib

import torch
from torch import nn

TOKENS = 77


def sd_alphas_cumprod(steps=1000):
    """SD1 / SD2 / SDXL noise schedule: 'scaled linear' betas 0.00085 .. 0.012."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _seeded(key: str, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(*shape, generator=g)


class TextEncoder:
    def __init__(self, dim: int, pooled_dim: int | None = None):
        self.dim, self.pooled_dim = dim, pooled_dim
        self.pos = _seeded(f"pos{dim}", TOKENS, dim) * 0.5
        self.proj = _seeded(f"proj{dim}", dim, pooled_dim) / dim ** 0.5 if pooled_dim else None

    def _words(self, text):
        return text.lower().replace(",", " ").split()[: TOKENS - 2]

    def context(self, text) -> torch.Tensor:
        words = self._words(text)
        if not words:
            return torch.zeros(self.dim)
        return torch.stack([_seeded(f"w|{w}", self.dim) for w in words]).mean(0)

    def tokens(self, text) -> torch.Tensor:
        words = self._words(text)
        out = self.pos.clone()
        for i, w in enumerate(words):
            out[1 + i] += _seeded(f"w|{w}", self.dim)
        out[1 + len(words):] += 0.5 * self.context(text)  # padding carries the prompt, as in CLIP
        return out

    def pooled(self, text) -> torch.Tensor:
        return self.context(text) @ self.proj


class TinyDenoiser(nn.Module):
    """eps(x_t, t, tokens[, vector]) for 4-channel latents."""

    def __init__(self, token_dim: int, vector_dim: int | None = None, hidden: int = 32, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv_in = nn.Conv2d(4, hidden, 3, padding=1)
            self.time = nn.Linear(32, hidden)
            self.vec = nn.Linear(vector_dim, hidden) if vector_dim else None
            self.q = nn.Linear(hidden, hidden, bias=False)
            self.k = nn.Linear(token_dim, hidden, bias=False)
            self.v = nn.Linear(token_dim, hidden, bias=False)
            self.conv_out = nn.Conv2d(hidden, 4, 3, padding=1)

    def forward(self, x, t, tokens, vector=None):
        b, _, h, w = x.shape
        freqs = torch.exp(-torch.arange(16, device=x.device) * (9.2 / 16))
        angles = t.float()[:, None] * freqs[None]
        feat = self.conv_in(x) + self.time(torch.cat([angles.sin(), angles.cos()], 1))[:, :, None, None]
        if self.vec is not None:
            feat = feat + 0.1 * self.vec(vector.float())[:, :, None, None]  # weak: tokens carry the prompt
        q = self.q(feat.flatten(2).transpose(1, 2))  # [B, HW, hidden]
        k, v = self.k(tokens.float()), self.v(tokens.float())
        attn = (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1) @ v
        feat = feat + attn.transpose(1, 2).reshape(b, -1, h, w)
        return self.conv_out(torch.nn.functional.silu(feat))


def checkpoint_info(name, shorthash):
    """modules.sd_models.CheckpointInfo: name (file name in models/Stable-diffusion), shorthash."""
    return types.SimpleNamespace(name=name, title=f"{name} [{shorthash}]", shorthash=shorthash)


class _Conditioner:
    """get_learned_conditioning as both webuis implement it for SD1 (tensor) and SDXL (dict)."""

    def _encode(self, texts):
        enc = self.text_encoder
        tokens = torch.stack([enc.tokens(t) for t in texts])
        if not self.is_sdxl:
            return tokens
        width = getattr(texts, "width", None) or 1024
        height = getattr(texts, "height", None) or 1024
        pooled = torch.stack([enc.pooled(t) for t in texts])
        if getattr(texts, "is_negative_prompt", False) and all(t == "" for t in texts):
            tokens, pooled = torch.zeros_like(tokens), torch.zeros_like(pooled)  # force_zero_negative_prompt
        size = _seeded(f"size{width}x{height}", 1536).expand(len(texts), -1)
        return {"crossattn": tokens, "vector": torch.cat([pooled, size], 1)}


class A1111Model(nn.Module, _Conditioner):
    def __init__(self, sdxl=False, parameterization="eps", name="tiny.safetensors", shorthash="abc1234567"):
        super().__init__()
        self.is_sdxl, self.is_sd1, self.is_sd2 = sdxl, not sdxl, False
        self.parameterization = parameterization
        dim = 2048 if sdxl else 768
        self.text_encoder = TextEncoder(dim, 1280 if sdxl else None)
        self.model = nn.Module()
        self.model.diffusion_model = TinyDenoiser(dim, 2816 if sdxl else None)
        self.cond_stage_model = nn.Linear(4, 4)  # stands for the text encoder's weights
        self.first_stage_model = nn.Conv2d(4, 4, 1)  # the VAE's
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod().float())
        self.sd_checkpoint_info = checkpoint_info(name, shorthash)
        self.on_apply = None
        self.calls = 0

    def get_learned_conditioning(self, texts):
        return self._encode(texts)

    def apply_model(self, x_t, t, cond):
        assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 1000, t
        self.calls += 1
        if self.on_apply is not None:
            self.on_apply(self)
        if isinstance(cond, dict):
            tokens, vector = cond["crossattn"], cond["vector"]
        else:
            assert isinstance(cond, torch.Tensor), "SD1 cond is a tensor"
            tokens, vector = cond, None
        eps = self.model.diffusion_model(x_t, t, tokens, vector)
        if self.parameterization == "eps":
            return eps
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0


class Predictor(nn.Module):
    """Forge's k-diffusion prediction object (backend/modules/k_prediction.py, eps / v)."""

    def __init__(self, prediction_type="epsilon"):
        super().__init__()
        self.prediction_type = prediction_type
        acp = sd_alphas_cumprod()
        sigmas = ((1 - acp) / acp).sqrt()
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def timestep(self, sigma):
        return (sigma.log()[None] - self.log_sigmas[:, None]).abs().argmin(0).view(sigma.shape)

    def calculate_input(self, sigma, x):
        return x / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5

    def calculate_denoised(self, sigma, out, x):
        s = sigma.view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return x / (s ** 2 + 1) - out * s / (s ** 2 + 1) ** 0.5
        return x - out * s


class KModel(nn.Module):
    """forge_objects.unet.model: apply_model(x, sigma, c_crossattn=, y=) -> x0."""

    def __init__(self, denoiser, prediction_type="epsilon"):
        super().__init__()
        self.diffusion_model = denoiser
        self.predictor = Predictor(prediction_type)
        self.computation_dtype = torch.float32
        self.owner = None

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        owner = self.owner
        assert owner.forge_objects.unet.loaded, "the UNet is used before load_model_gpu"
        owner.calls += 1
        if owner.on_apply is not None:
            owner.on_apply(owner)
        sigma = t
        x_in = self.predictor.calculate_input(sigma, x)
        timestep = self.predictor.timestep(sigma)
        eps = self.diffusion_model(x_in, timestep, c_crossattn, kwargs.get("y"))
        if self.predictor.prediction_type == "v_prediction":
            a = 1 / (sigma.view(-1, 1, 1, 1) ** 2 + 1)
            x0 = (x_in - (1 - a).sqrt() * eps) / a.sqrt()
            out = a.sqrt() * eps - (1 - a).sqrt() * x0
        else:
            out = eps
        return self.predictor.calculate_denoised(sigma, out, x)


class UnetPatcher:
    """Forge's UnetPatcher (a ModelPatcher): .model, .load_device; loaded by load_model_gpu."""

    def __init__(self, model):
        self.model = model
        self.load_device = torch.device("cpu")
        self.loaded = False


class ForgeModel(_Conditioner):
    def __init__(self, sdxl=False, prediction_type="epsilon", name="tiny-forge.safetensors", shorthash="f0f0f0f0f0"):
        self.is_sdxl, self.is_sd1, self.is_sd2 = sdxl, not sdxl, False
        self.latent_channels = 4
        dim = 2048 if sdxl else 768
        self.text_encoder = TextEncoder(dim, 1280 if sdxl else None)
        kmodel = KModel(TinyDenoiser(dim, 2816 if sdxl else None), prediction_type)
        kmodel.owner = self
        self.forge_objects = types.SimpleNamespace(unet=UnetPatcher(kmodel), clip=None, vae=None, clipvision=None)
        self.sd_checkpoint_info = checkpoint_info(name, shorthash)
        self.on_apply = None
        self.calls = 0

    @torch.inference_mode()
    def get_learned_conditioning(self, texts):
        from backend import memory_management

        memory_management.unload_all_models()  # the text encoder takes the GPU
        return self._encode(texts)
