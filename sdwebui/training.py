"""Host-independent half of the A1111 / Forge "DICE Training" tab (scripts/cfg_distill_train_tab.py).

The tab script only reads the webui's objects (shared.sd_model, shared.state, devices, the Forge
UNet patcher) and hands them to this module, which builds the three callables of the core loop
(cfg_distill.training.train_refiner) for either model path:

- A1111: `m.apply_model(x_t, t, cond)` with DDPM-scaled x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) n
  and an integer t in [0, 1000), returning eps or (m.parameterization == "v") v;
- Forge: `unet.model.apply_model(x, sigma, c_crossattn=..., y=...)`, k-diffusion style: x = x0 +
  sigma n in, denoised x0 out.

Both are wrapped as an eps function of the k-diffusion-scaled latent x = x0 + sigma_t n and the
integer timestep t (sigma_t = sqrt((1 - acp[t]) / acp[t])), so data, teacher, student and the
small Euler sampler that makes the training latents are written once and the loss is the paper's
eps-space loss on both paths.

SD1 / SD2 conditioning is a tensor [B, T, D]; SDXL a dict {"crossattn": [B, T, 2048], "vector":
[B, 2816]}: only the tokens are refined, the vector passes unchanged (the teacher's uncond uses the
vector of the real "" encoding, DICE's convention).

Imports only torch, numpy and the cfg_distill core (never the webui's `modules`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cfg_distill.families import FAMILIES
from cfg_distill.fusion import repeat_to_length
from cfg_distill.plot import loss_curve_image
from cfg_distill.prompts import default_prompts
from cfg_distill.refiner_file import RefinerFileError, RefinerInfo, read_refiner_info, save_refiner
from cfg_distill.training import (Batch, GapReport, TrainConfig, TrainingDiverged, TrainingStateError, TrainResult,
                       cfg_target, evaluate_gap, train_refiner)

DEFAULT_GUIDANCE = 5.0
DEFAULT_STEPS = 2000
DEFAULT_BATCH = 4
DEFAULT_LR = 2e-4
DEFAULT_LOSS = "l2"
DEFAULT_RESOLUTION = 512
DEFAULT_SAVE_EVERY = 200
DEFAULT_NAME = "my_dice_refiner"
DEFAULT_NEGATIVE_SHARE = 0.5  # of samples trained with a negative, when negatives are given (testbed: 0.5)
X0_STEPS = 8  # Euler CFG steps per training latent when no images are given
STATE_SUFFIX = ".dice-train-state"  # not .safetensors: never offered as a refiner in the dropdown
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,120}$")


class TrainTabError(ValueError):
    """A setting or a model the tab cannot train with; the message says what to do instead."""


# ---------------------------------------------------------------------------------------------
# Settings from the tab


def _number(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TrainTabError(f"{what} must be a number (got {value!r})") from None
    if not math.isfinite(v):
        raise TrainTabError(f"{what} must be a finite number (got {value!r})")
    return v


def _integer(value, what: str, minimum: int) -> int:
    v = _number(value, what)
    if v != int(v) or v < minimum:
        raise TrainTabError(f"{what} must be a whole number >= {minimum} (got {value!r})")
    return int(v)


def refiner_file_name(raw) -> str:
    """The refiner's name as typed: a plain file name in the refiner folder, without extension."""
    name = str(raw or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")].rstrip()
    if not _NAME.match(name):
        raise TrainTabError(f"refiner name {raw!r} is not a plain file name: use letters, digits, '.', '_', '-' "
                            "or spaces, starting with a letter or digit (no folders); it is saved as "
                            "<name>.safetensors in the refiner folder")
    return name


def parse_prompts(text) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are ignored. Empty: the bundled list."""
    lines = [line.strip() for line in str(text or "").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    return prompts or default_prompts()


@dataclass
class TrainRequest:
    """What the user asked for in the tab, validated."""
    prompts: list[str]
    guidance_scale: float = DEFAULT_GUIDANCE
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH
    lr: float = DEFAULT_LR
    loss: str = DEFAULT_LOSS
    resolution: int = DEFAULT_RESOLUTION
    seed: int = 0
    name: str = DEFAULT_NAME
    save_every: int = DEFAULT_SAVE_EVERY
    resume: bool = False
    x0_steps: int = X0_STEPS
    used_default_prompts: bool = False
    lr_schedule: str = "cosine"  # as the node's and the headless trainer's default (README: training defaults)
    # Negatives to train with (the teacher: CFG with that negative), so the refiner works with a
    # negative prompt; empty: "" only, as before.
    negative_prompts: list[str] = field(default_factory=list)
    negative_share: float = DEFAULT_NEGATIVE_SHARE

    @classmethod
    def from_ui(cls, prompts, guidance_scale, steps, batch_size, lr, loss, resolution, seed, name, save_every,
                resume, negative_prompts="", negative_share=DEFAULT_NEGATIVE_SHARE) -> "TrainRequest":
        w = _number(guidance_scale, "guidance scale")
        if not 1.0 <= w <= 30.0:
            raise TrainTabError(f"guidance scale must be between 1 and 30 (the paper uses 5), got {w:g}")
        lr_value = _number(lr, "learning rate")
        if lr_value <= 0:
            raise TrainTabError(f"learning rate must be > 0, e.g. 2e-4 (got {lr!r})")
        loss = str(loss or DEFAULT_LOSS).strip().lower()
        if loss not in ("l1", "l2"):
            raise TrainTabError(f"loss must be l1 or l2 (got {loss!r})")
        res = _integer(resolution, "resolution", 64)
        if res % 8 or res > 4096:
            raise TrainTabError(f"resolution must be a multiple of 8 between 64 and 4096 (got {res})")
        texts = parse_prompts(prompts)
        share = _number(negative_share, "negative share")
        if not 0.0 <= share <= 1.0:
            raise TrainTabError(f"negative share must be between 0 and 1, e.g. 0.5 (got {share:g})")
        negatives = [line.strip() for line in str(negative_prompts or "").splitlines()]
        negatives = [line for line in negatives if line and not line.startswith("#")]
        return cls(prompts=texts, guidance_scale=w, steps=_integer(steps, "steps", 1),
                   batch_size=_integer(batch_size, "batch size", 1), lr=lr_value, loss=loss, resolution=res,
                   seed=_integer(seed, "seed", 0), name=refiner_file_name(name),
                   save_every=_integer(save_every, "save every", 0), resume=bool(resume),
                   used_default_prompts=not str(prompts or "").strip(), negative_prompts=negatives,
                   negative_share=share if negatives else 0.0)

    def config(self, autocast: str | None, family: str) -> TrainConfig:
        return TrainConfig(guidance_scale=self.guidance_scale, steps=self.steps, batch_size=self.batch_size,
                           lr=self.lr, loss=self.loss, seed=self.seed, save_every=self.save_every,
                           lr_schedule=self.lr_schedule, autocast=autocast,
                           keep_first_token=FAMILIES[family].keep_first_token).validate()


def training_autocast(device, weight_dtype) -> str | None:
    """The core loop's autocast setting for a model whose UNet computes in weight_dtype: fp16 on
    CUDA gets autocast + GradScaler (gradients through an fp16 UNet underflow otherwise)."""
    if torch.device(device).type != "cuda":
        return None
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(weight_dtype)


def state_path_for(folder: str, name: str) -> str:
    return os.path.join(folder, name + STATE_SUFFIX)


# ---------------------------------------------------------------------------------------------
# Conditioning


@dataclass
class Encoded:
    """One prompt's conditioning, detached and cloned (Forge makes it under inference_mode)."""
    tokens: torch.Tensor  # [1, T, D], fp32
    vector: torch.Tensor | None  # [1, V], fp32 (SDXL) or None


def _plain(t: torch.Tensor, device) -> torch.Tensor:
    # clone() outside inference mode turns an inference tensor into a normal one autograd accepts
    return t.detach().to(device=device, dtype=torch.float32).clone()


def split_cond(cond, device) -> list[Encoded]:
    """The host's cond for a batch of prompts -> one Encoded per row."""
    if isinstance(cond, dict):
        if "crossattn" not in cond:
            raise TrainTabError(f"this model's conditioning has no token sequence ('crossattn'); keys: "
                                f"{', '.join(map(str, cond))}")
        tokens, vector = cond["crossattn"], cond.get("vector")
    else:
        tokens, vector = cond, None
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        raise TrainTabError(f"expected prompt tokens [batch, tokens, dim], got {getattr(tokens, 'shape', tokens)!r}")
    with torch.inference_mode(False):
        return [Encoded(_plain(tokens[i:i + 1], device), None if vector is None else _plain(vector[i:i + 1], device))
                for i in range(tokens.shape[0])]


def family_of_cond(cond) -> str:
    """sdxl (dict cond, 2048-d tokens), sd2 (1024-d tensor), sd15 (768-d tensor); else refused."""
    if isinstance(cond, dict):
        dim = cond["crossattn"].shape[-1] if "crossattn" in cond else None
        if dim == FAMILIES["sdxl"].token_dim:
            return "sdxl"
        raise TrainTabError(
            f"this checkpoint's conditioning is a dict with {dim}-d tokens: DICE training here supports "
            "SD1.x (768-d), SD2.x (1024-d) and SDXL base (2048-d). The SDXL refiner checkpoint (1280-d) and "
            "other architectures are not supported.")
    dim = cond.shape[-1]
    for key in ("sd15", "sd2"):
        if FAMILIES[key].token_dim == dim:
            return key
    raise TrainTabError(f"this checkpoint's prompt tokens are {dim}-d: DICE training here supports SD1.x "
                        "(768-d), SD2.x (1024-d) and SDXL base (2048-d)")


def stack_tokens(items: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens [B, T, D] (77 vs 154 tokens tiled to a common length, attention-neutral) and vectors."""
    n = 1
    for e in items:
        n = math.lcm(n, e.tokens.shape[1])
    tokens = torch.cat([repeat_to_length(e.tokens, n) for e in items], 0)
    vectors = [e.vector for e in items]
    vector = torch.cat(vectors, 0) if all(v is not None for v in vectors) else None
    return tokens, vector


# ---------------------------------------------------------------------------------------------
# The two model paths, as eps(x, t) of the k-diffusion-scaled latent x = x0 + sigma_t * noise


class A1111Denoiser:
    """shared.sd_model of A1111: apply_model(x_t, t, cond) with DDPM-scaled x_t and integer t."""

    def __init__(self, model, device):
        parameterization = getattr(model, "parameterization", "eps")
        if parameterization not in ("eps", "v"):
            raise TrainTabError(f"this checkpoint predicts {parameterization!r}; DICE training here supports eps "
                                "and v prediction models")
        acp = getattr(model, "alphas_cumprod", None)
        if acp is None:
            raise TrainTabError("the loaded model has no alphas_cumprod (not a DDPM-style SD checkpoint)")
        acp = torch.as_tensor(acp).detach().double().cpu()
        self.model, self.device, self.v = model, torch.device(device), parameterization == "v"
        self.sigmas = ((1 - acp) / acp).sqrt().float()
        self._acp = acp.float().to(self.device)

    def eps(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        a = self._acp[t].view(-1, *([1] * (x.ndim - 1)))
        x_t = x * a.sqrt()  # = sqrt(acp) x0 + sqrt(1 - acp) noise
        cond = tokens if vector is None else {"crossattn": tokens, "vector": vector}
        out = self.model.apply_model(x_t, t, cond).float()
        if self.v:  # v = sqrt(acp) eps - sqrt(1 - acp) x0  ->  eps = sqrt(acp) v + sqrt(1 - acp) x_t
            out = a.sqrt() * out + (1 - a).sqrt() * x_t
        return out


class ForgeDenoiser:
    """Forge's UNet (forge_objects.unet.model): apply_model(x, sigma, c_crossattn=..., y=...) -> x0."""

    def __init__(self, kmodel, device):
        schedule = getattr(kmodel, "predictor", None) or getattr(kmodel, "model_sampling", None)
        sigmas = getattr(schedule, "sigmas", None)
        if sigmas is None:
            raise TrainTabError("cannot read the noise schedule of this Forge model (no predictor.sigmas)")
        if getattr(schedule, "prediction_type", "eps") == "const":
            raise TrainTabError("this is a flow-matching model (Flux, SD3): DICE training here supports SD1.x, "
                                "SD2.x and SDXL")
        self.model, self.device = kmodel, torch.device(device)
        self.sigmas = torch.as_tensor(sigmas).detach().float().cpu()
        self._sigmas = self.sigmas.to(self.device)

    def eps(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        sigma = self._sigmas[t]
        kwargs = {"c_crossattn": tokens}
        if vector is not None:
            kwargs["y"] = vector
        x0 = self.model.apply_model(x, sigma, **kwargs).float()
        return (x - x0) / sigma.view(-1, *([1] * (x.ndim - 1)))


@dataclass
class WebuiModel:
    """What the tab script hands over about the loaded checkpoint."""
    denoiser: Any  # A1111Denoiser | ForgeDenoiser (anything with .eps, .sigmas, .device)
    encode: Callable[[list[str]], Any]  # prompts -> the host's cond batch (tensor or dict), no grad
    freeze: Sequence[torch.nn.Module]  # modules frozen for the run (flags restored afterwards)
    latent_channels: int = 4
    load: Callable[[], None] | None = None  # Forge: load_model_gpu(unet), after text encoding
    autocast: str | None = None  # the core loop's setting (training_autocast)
    host_autocast: Callable[[], Any] = contextlib.nullcontext  # devices.autocast
    key: Any = None  # identifies the checkpoint, for the training-latent cache


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module):
    """requires_grad_(False) on every parameter for the run; each flag restored afterwards.
    Inference tensors (Forge) are left alone: their flag cannot be set and is always False, and a
    failing restore must never hide the error that ended the run."""
    saved, seen = [], set()
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen and not p.is_inference():
                seen.add(id(p))
                saved.append((p, p.requires_grad))
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            try:
                p.requires_grad_(flag)
            except RuntimeError:  # pragma: no cover - nothing else may go wrong here
                pass


class _CloneInput(torch.nn.Module):
    """A LayerNorm that normalises a copy of its input: the transformer block that calls it adds
    its residual into that input in place (x += n), which would change what the norm saved for
    backward. Used in training copies only."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x.clone())


def trainable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of a loaded model that autograd can differentiate through; the original (the
    one generation uses) is not changed.

    Forge loads every model under torch.inference_mode(): its parameters are inference tensors,
    which no backward may save. The copy gets ordinary clones of them (one extra copy of the UNet in
    memory for the run), its LayerNorms see copies of their inputs (Forge's transformer blocks add
    residuals in place), and instance-level forward wrappers (which call the original) are dropped."""
    with torch.inference_mode(False):
        memo = {}
        for p in model.parameters():
            memo[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
        for b in model.buffers():
            memo[id(b)] = b.detach().clone()
        clone = copy.deepcopy(model, memo)
    for module in list(clone.modules()):  # listed first: the loop replaces children
        module.__dict__.pop("forward", None)
        for name, child in list(module._modules.items()):
            if isinstance(child, torch.nn.LayerNorm) and not isinstance(module, _CloneInput):
                module._modules[name] = _CloneInput(child)
    clone.requires_grad_(False)
    left = [n for n, t in [*clone.named_parameters(), *clone.named_buffers()] if t.is_inference()]
    if left:
        raise TrainTabError(f"could not make a trainable copy of the model: {left[0]} is still an inference tensor")
    return clone


# ---------------------------------------------------------------------------------------------
# Training latents, teacher, student


def cfg_eps(denoiser, x, t, tokens, vector, null: Encoded, w: float, host_autocast=contextlib.nullcontext):
    """eps_u + w (eps_c - eps_u); one batched pass when the token counts agree."""
    b = x.shape[0]
    null_tokens = null.tokens.expand(b, -1, -1)
    null_vector = None if null.vector is None else null.vector.expand(b, -1)
    with host_autocast():
        if null_tokens.shape[1] == tokens.shape[1]:
            vec = None if vector is None else torch.cat([vector, null_vector], 0)
            both = denoiser.eps(torch.cat([x, x], 0), torch.cat([t, t], 0), torch.cat([tokens, null_tokens], 0), vec)
            e_c, e_u = both[:b], both[b:]
        else:
            e_c = denoiser.eps(x, t, tokens, vector)
            e_u = denoiser.eps(x, t, null_tokens, null_vector)
    return cfg_target(e_c.float(), e_u.float(), w)


@torch.no_grad()
def euler_cfg_sample(denoiser, tokens, vector, null: Encoded, w: float, noise: torch.Tensor, steps: int,
                     host_autocast=contextlib.nullcontext) -> torch.Tensor:
    """x0 from pure noise with a few Euler steps of CFG at w, over the model's own timesteps
    (evenly spaced from the noisiest to t = 0, then to sigma 0)."""
    sigmas = denoiser.sigmas
    ts = torch.linspace(len(sigmas) - 1, 0, steps).round().long()
    levels = torch.cat([sigmas[ts], sigmas.new_zeros(1)]).tolist()
    device = denoiser.device
    x = noise.to(device) * levels[0]
    for i, t in enumerate(ts.tolist()):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        eps = cfg_eps(denoiser, x, t_batch, tokens, vector, null, w, host_autocast)
        x = x + eps * (levels[i + 1] - levels[i])
    return x


class WebuiDistillHost:
    """Training latents, encodings and the three callables of train_refiner for one webui model."""

    def __init__(self, model: WebuiModel, prompts: Sequence[Encoded], null: Encoded, guidance_scale: float,
                 batch_size: int, negatives: Sequence[Encoded] = (), negative_share: float = 0.0):
        if not prompts:
            raise TrainTabError("no prompts to train on")
        if negative_share and not negatives:
            raise TrainTabError("a negative share > 0 needs negative prompts to draw from")
        self.model, self.denoiser = model, model.denoiser
        self.prompts, self.null, self.w, self.batch_size = list(prompts), null, guidance_scale, batch_size
        # With probability negative_share a sample's second input is a negative prompt (drawn
        # uniformly) instead of "", and the teacher is CFG with that negative.
        self.negatives, self.negative_share = list(negatives), float(negative_share)
        self.device = self.denoiser.device
        self.x0: list[torch.Tensor] = []  # [1, C, h, w] each, on the CPU; x0[i] belongs to prompt i

    def make_latents(self, count: int, latent_hw: tuple[int, int], seed: int, steps: int = X0_STEPS,
                     should_stop: Callable[[], bool] | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> bool:
        """Training latents for the first `count` prompts, batch_size at a time; each one's noise comes
        from seed + its index, so the latents do not depend on the batching. False when stopped."""
        h, w = latent_hw
        for start in range(len(self.x0), count, self.batch_size):
            if should_stop is not None and should_stop():
                return False
            if on_progress is not None:
                on_progress(start, count)
            idx = list(range(start, min(count, start + self.batch_size)))
            noise = torch.cat([torch.randn(1, self.model.latent_channels, h, w,
                                           generator=torch.Generator().manual_seed(seed + i)) for i in idx], 0)
            tokens, vector = stack_tokens([self.prompts[i] for i in idx])
            x0 = euler_cfg_sample(self.denoiser, tokens, vector, self.null, self.w, noise, steps,
                                  self.model.host_autocast)
            if not torch.isfinite(x0).all():
                raise TrainTabError("the model produced NaN / inf while making training latents: check the "
                                    "checkpoint (try --no-half or an fp32 / bf16 UNet)")
            self.x0.extend(x0[j:j + 1].float().cpu() for j in range(len(idx)))
        if on_progress is not None:
            on_progress(count, count)
        return True

    def sample_batch(self, step: int, g: torch.Generator) -> Batch:
        idx = torch.randint(len(self.x0), (self.batch_size,), generator=g).tolist()
        x0 = torch.cat([self.x0[i] for i in idx], 0)
        t = torch.randint(0, len(self.denoiser.sigmas), (self.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        sigma = self.denoiser.sigmas[t].view(-1, 1, 1, 1)
        x_t = x0 + sigma * noise
        tokens, vector = stack_tokens([self.prompts[i] for i in idx])
        extra = {"vector": vector}
        uc = self.null.tokens
        if self.negative_share > 0:  # drawn after the noise: runs without negatives keep their random stream
            pick = torch.rand(self.batch_size, generator=g) < self.negative_share
            which = torch.randint(len(self.negatives), (self.batch_size,), generator=g).tolist()
            uc, uc_vector = stack_tokens([self.negatives[j] if p else self.null
                                          for p, j in zip(pick.tolist(), which)])
            extra["uc"] = Encoded(uc.to(self.device), None if uc_vector is None else uc_vector.to(self.device))
        return Batch(x_t=x_t.to(self.device), sigma=t.to(self.device), c=tokens.to(self.device),
                     uc=uc.to(self.device), extra=extra)

    def teacher(self, batch: Batch) -> torch.Tensor:
        return cfg_eps(self.denoiser, batch.x_t, batch.sigma, batch.c, batch.extra["vector"],
                       batch.extra.get("uc", self.null), self.w, self.model.host_autocast)

    def student(self, batch: Batch, refined_c: torch.Tensor) -> torch.Tensor:
        with self.model.host_autocast():
            return self.denoiser.eps(batch.x_t, batch.sigma, refined_c, batch.extra["vector"]).float()


# Training latents of the last run, reused by the next run with the same model, prompts and settings
# (resume, or a second run after a change of lr / steps): generating them costs 2 x X0_STEPS passes each.
_LATENT_CACHE: dict = {}


def encode_prompts(model: WebuiModel, texts: Sequence[str]) -> list[Encoded]:
    """Each prompt encoded on its own, as the webui encodes it for generation."""
    out = []
    for text in texts:
        with torch.no_grad():
            cond = model.encode([text])
        out.extend(split_cond(cond, model.denoiser.device))
    return out


# ---------------------------------------------------------------------------------------------
# One run of the tab


@dataclass
class TrainOutcome:
    """What the tab shows: a readable message and the loss curve."""
    ok: bool
    message: str
    losses: list[float] = field(default_factory=list)
    step: int = 0
    total: int = 0
    cancelled: bool = False
    path: str | None = None
    state_path: str | None = None
    family: str = ""
    gap: GapReport | None = None  # held-out gap (eval_prompts), refined vs plain cfg 1

    def image(self) -> np.ndarray:
        """Loss curve as uint8 [H, W, 3] (gradio shows numpy images in both 3.41 and 4.40)."""
        return (np.clip(loss_curve_image(self.losses), 0, 1) * 255).round().astype(np.uint8)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_text(step: int, total: int, loss: float, eta_s: float) -> str:
    return f"step {step}/{total} loss {loss:.4g} eta {_duration(eta_s)}"


def _check_resume(state_path: str, request: TrainRequest, family: str, base_hash: str) -> int | None:
    """The saved step of a run that may be resumed; refuses a run made for another w or checkpoint."""
    if not (request.resume and os.path.exists(state_path)):
        return None
    try:
        saved = read_refiner_info(state_path)
    except RefinerFileError as e:
        raise TrainTabError(f"cannot resume {request.name!r}: {e}") from None
    if saved.guidance_scale is not None and not math.isclose(saved.guidance_scale, request.guidance_scale):
        raise TrainTabError(f"cannot resume {request.name!r}: it was trained at guidance scale "
                            f"{saved.guidance_scale:g}, this run asks for {request.guidance_scale:g}. Set it back "
                            f"to {saved.guidance_scale:g}, or untick Resume / pick a new name to start over.")
    if saved.base_family not in ("unknown", family):
        raise TrainTabError(f"cannot resume {request.name!r}: it was trained for a {saved.base_family} checkpoint, "
                            f"the loaded one is {family}. Load that checkpoint, or pick a new name.")
    if saved.base_hash and base_hash and saved.base_hash != base_hash:
        raise TrainTabError(f"cannot resume {request.name!r}: it was trained on checkpoint "
                            f"{saved.base_checkpoint or '?'} [{saved.base_hash}], the loaded one is [{base_hash}]. "
                            "Load that checkpoint, or pick a new name.")
    return saved.train_steps or 0


def train_in_webui(request: TrainRequest, model: WebuiModel, *, folder: str,
                   should_stop: Callable[[], bool] | None = None,
                   on_step: Callable[[int, int, float, float, float], None] | None = None,
                   on_status: Callable[[str], None] | None = None,
                   base_checkpoint: str = "", base_hash: str = "",
                   eval_prompts: Sequence[str] | None = None, eval_batches: int = 4) -> TrainOutcome:
    """Encode, make the training latents, train (resumable, interruptible) and save the refiner.

    should_stop() is polled while latents are made and before every step: a stop during training
    saves what was learned (refiner and state); a stop before training saves nothing. Errors the
    user can fix come back as a not-ok outcome with the message; anything else propagates.
    eval_prompts: held-out prompts on which the trained refiner's gap to CFG is measured (outcome.gap)."""
    status = on_status or (lambda text: None)
    path = os.path.join(folder, request.name + ".safetensors")
    state_path = state_path_for(folder, request.name)
    had_state = os.path.exists(state_path)
    try:
        with torch.inference_mode(False):
            status("Encoding the prompts...")
            with torch.no_grad():
                empty = model.encode([""])
            family = family_of_cond(empty)
            null = split_cond(empty, model.denoiser.device)[0]  # the real "" encoding (DICE's null)
            resumed_at = _check_resume(state_path, request, family, base_hash)
            try:
                config = request.config(model.autocast, family)
            except ValueError as e:
                raise TrainTabError(str(e)) from None
            prompts = encode_prompts(model, request.prompts)
            negatives = encode_prompts(model, request.negative_prompts)
            trained_with_negatives = bool(negatives) and request.negative_share > 0
            token_dim = null.tokens.shape[-1]
            if model.load is not None:
                model.load()
            with frozen(*model.freeze), torch.enable_grad():
                host = WebuiDistillHost(model, prompts, null, request.guidance_scale, request.batch_size,
                                        negatives, request.negative_share if negatives else 0.0)
                if not _latents(host, model, request, should_stop, status):
                    return TrainOutcome(False, "Interrupted while making the training latents: nothing was "
                                               "trained or saved.", cancelled=True, total=request.steps,
                                        family=family)
                status(f"Training: step {resumed_at or 0}/{request.steps}")
                info = RefinerInfo(token_dim, config.inner_dim, config.heads, base_family=family,
                                   base_checkpoint=base_checkpoint, base_hash=base_hash,
                                   guidance_scale=request.guidance_scale, keep_first_token=config.keep_first_token,
                                   negatives=trained_with_negatives)
                started = time.monotonic()
                result = train_refiner(config, host.sample_batch, host.teacher, host.student, token_dim=token_dim,
                                       device=host.device, state_path=state_path, resume=request.resume,
                                       should_stop=should_stop, on_step=on_step, info=info)
                gap = None
                if eval_prompts:
                    status("Measuring the held-out gap...")
                    gap = held_out_gap(model, result.refiner, eval_prompts, null, request, config, eval_batches)
    except (TrainTabError, TrainingStateError) as e:
        return TrainOutcome(False, str(e), total=request.steps)
    except TrainingDiverged as e:
        return TrainOutcome(False, f"{e} The refiner file was not changed.", total=request.steps)
    refiner = result.refiner.cpu().eval().requires_grad_(False)
    save_refiner(path, refiner, result.info(base_family=family, base_checkpoint=base_checkpoint,
                                            base_hash=base_hash, negatives=trained_with_negatives))
    message = _summary(request, result, path, state_path, time.monotonic() - started, resumed_at, had_state)
    if gap is not None:
        message += (f"\nHeld-out gap to CFG w={request.guidance_scale:g} on {len(eval_prompts)} prompts: refined "
                    f"{gap.refined:.4g} vs plain cfg 1 {gap.baseline:.4g} (ratio {gap.ratio:.3f}).")
    return TrainOutcome(True, message,
                        losses=list(result.losses), step=result.step, total=request.steps,
                        cancelled=result.cancelled, path=path, state_path=state_path, family=family, gap=gap)


def held_out_gap(model: WebuiModel, refiner, prompts: Sequence[str], null: Encoded, request: TrainRequest,
                 config: TrainConfig, batches: int) -> GapReport:
    """The refined one-pass eps against the CFG target, and plain cfg 1 against it, on noised
    latents of prompts not trained on (their latents from the model itself, a fixed seed)."""
    with torch.no_grad():
        host = WebuiDistillHost(model, encode_prompts(model, list(prompts)), null, request.guidance_scale,
                                request.batch_size)
        hw = (request.resolution // 8, request.resolution // 8)
        host.make_latents(len(host.prompts), hw, request.seed + 10_000, request.x0_steps)
        g = torch.Generator().manual_seed(request.seed + 20_000)
        data = [host.sample_batch(k, g) for k in range(batches)]
    return evaluate_gap(refiner.to(host.device), data, host.teacher, host.student, loss=request.loss,
                        keep_first_token=config.keep_first_token)


def _latents(host: WebuiDistillHost, model: WebuiModel, request: TrainRequest, should_stop, status) -> bool:
    """One training latent per prompt that the run can reach (cached between runs)."""
    count = min(len(request.prompts), request.steps * request.batch_size)
    hw = (request.resolution // 8, request.resolution // 8)
    key = (model.key, tuple(request.prompts[:count]), hw, request.seed, request.guidance_scale, request.x0_steps,
           model.latent_channels)
    cached = _LATENT_CACHE.get("key") == key and model.key is not None
    if cached:
        host.x0 = list(_LATENT_CACHE["x0"])
        return True

    def progress(done, total):
        status(f"Making training latents {done}/{total} ({request.x0_steps} Euler steps of CFG at "
               f"w={request.guidance_scale:g} each)")

    if not host.make_latents(count, hw, request.seed, request.x0_steps, should_stop, progress):
        return False
    _LATENT_CACHE.clear()
    _LATENT_CACHE.update(key=key, x0=list(host.x0))
    return True


def _summary(request: TrainRequest, result: TrainResult, path: str, state_path: str, seconds: float,
             resumed_at: int | None, had_state: bool) -> str:
    name = os.path.basename(path)
    final = float(np.mean(result.losses[-10:])) if result.losses else float("nan")
    lines = []
    if result.cancelled:
        lines.append(f"Interrupted at step {result.step}/{request.steps}: saved what was learned to {name}.")
    elif resumed_at is not None and result.step <= resumed_at:
        lines.append(f"{request.name!r} was already trained for {resumed_at} steps (>= {request.steps}): nothing to "
                     f"do; raise Steps to train further. Saved {name}.")
    else:
        lines.append(f"Done: {result.step}/{request.steps} steps, saved {name}.")
    if resumed_at is not None:
        lines.append(f"Resumed from step {resumed_at}.")
    elif request.resume:
        lines.append(f"No saved run named {request.name!r} was found: started from scratch.")
    elif had_state:
        lines.append(f"Started a new run: the earlier training state of {request.name!r} was replaced "
                     "(tick Resume to continue a run instead).")
    lines.append(f"Final loss (mean of the last 10 steps) {final:.4g}; trained in {_duration(seconds)}.")
    lines.append(f"Folder: {os.path.dirname(path)}. Training state: {os.path.basename(state_path)} "
                 f"(tick Resume with the same name to continue).")
    if request.used_default_prompts:
        lines.append(f"Prompts: the bundled list of {len(request.prompts)}.")
    lines.append("Use it in txt2img / img2img: CFG distill -> DICE, pick the refiner (refresh the list), CFG scale 1.")
    return "\n".join(lines)
