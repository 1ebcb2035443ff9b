"""The webui as a training host for cfg_distill.run (the "DICE Training" tab and its route,
scripts/cfg_distill_train_tab.py).

The tab script only reads the webui's objects (shared.sd_model, shared.state, devices, the Forge
UNet patcher) and hands them to this module: the tab's values become the one TrainRequest
(TrainRequest.from_ui), and WebuiTrainingHost gives the run the three callables of the core loop for
either model path:

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
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cfg_distill.families import FAMILIES
from cfg_distill.fusion import repeat_to_length
from cfg_distill.plot import loss_curve_image
from cfg_distill.prompts import default_prompts  # noqa: F401  (the tab counts the bundled prompts)
from cfg_distill.request import RequestError, TrainRequest as CoreRequest
from cfg_distill.run import Reporter, check_text, duration as _duration, run
from cfg_distill.training import Batch, GapReport, TrainingDiverged, TrainingStateError, cfg_target, evaluate_gap

_D = CoreRequest.defaults("dice")  # the one set of defaults every front door shares
DEFAULT_GUIDANCE = _D["guidance_scale"]
DEFAULT_STEPS = _D["steps"]
DEFAULT_BATCH = _D["batch_size"]
DEFAULT_GRAD_ACCUM = _D["grad_accum"]
DEFAULT_LR = _D["lr"]
DEFAULT_LOSS = _D["loss"]
DEFAULT_RESOLUTION = 512  # the tab's slider: the user picks it (its label says SDXL: 1024)
DEFAULT_SAVE_EVERY = _D["save_every"]
DEFAULT_NAME = _D["name"]
DEFAULT_NEGATIVE_SHARE = _D["negative_share"]
X0_STEPS = _D["x0_steps"]  # Euler CFG steps per training latent when no images are given


class TrainTabError(RequestError):
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


class TrainRequest(CoreRequest):
    """The core's training request, as the tab fills it (one resolution for width and height)."""

    @classmethod
    def from_ui(cls, prompts, guidance_scale, steps, batch_size, lr, loss, resolution, seed, name, save_every,
                resume, negative_prompts="", negative_share=DEFAULT_NEGATIVE_SHARE, grad_accum=DEFAULT_GRAD_ACCUM,
                w_min=0.0, w_max=0.0) -> "TrainRequest":
        """The tab's (or the route's) values, checked; TrainTabError names what is wrong."""
        res = _integer(resolution, "resolution", 64)
        if res % 8 or res > 4096:
            raise TrainTabError(f"resolution must be a multiple of 8 between 64 and 4096 (got {res})")
        try:
            return cls(method="dice", prompts=str(prompts or ""), guidance_scale=_number(guidance_scale, "guidance scale"),
                       steps=_integer(steps, "steps", 1), batch_size=_integer(batch_size, "batch size", 1),
                       grad_accum=_integer(grad_accum, "grad accum", 1), lr=_number(lr, "learning rate"),
                       loss=str(loss or DEFAULT_LOSS).strip().lower(), width=res, height=res,
                       seed=_integer(seed, "seed", 0), name=name, save_every=_integer(save_every, "save every", 0),
                       resume=bool(resume), negative_prompts=str(negative_prompts or ""),
                       negative_share=_number(negative_share, "negative share"), w_min=_number(w_min, "w min"),
                       w_max=_number(w_max, "w max")).validate()
        except TrainTabError:
            raise
        except RequestError as e:
            raise TrainTabError(str(e)) from None

    @property
    def resolution(self) -> int:
        return self.width


def training_autocast(device, weight_dtype) -> str | None:
    """The core loop's autocast setting for a model whose UNet computes in weight_dtype: fp16 on
    CUDA gets autocast + GradScaler (gradients through an fp16 UNet underflow otherwise)."""
    if torch.device(device).type != "cuda":
        return None
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(weight_dtype)


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
                 batch_size: int, negatives: Sequence[Encoded] = (), negative_share: float = 0.0,
                 w_input: dict | None = None):
        if not prompts:
            raise TrainTabError("no prompts to train on")
        if negative_share and not negatives:
            raise TrainTabError("a negative share > 0 needs negative prompts to draw from")
        self.model, self.denoiser = model, model.denoiser
        self.prompts, self.null, self.w, self.batch_size = list(prompts), null, guidance_scale, batch_size
        # With probability negative_share a sample's second input is a negative prompt (drawn
        # uniformly) instead of "", and the teacher is CFG with that negative.
        self.negatives, self.negative_share = list(negatives), float(negative_share)
        # One refiner for a range of w (RefinerInfo.w_input): w drawn per sample, the teacher is CFG at that
        # sample's w and the refiner reads it through its input.
        self.w_input = w_input
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
        if self.w_input:  # drawn last, so runs without it keep their exact random stream
            lo, hi = self.w_input["range"]
            w = torch.rand(self.batch_size, generator=g) * (hi - lo) + lo
            extra["w"] = w.view(-1, 1, 1, 1).to(self.device)
            extra["w_amount"] = (self.w_input["scale"] * (w - self.w_input["ref"])).to(self.device)
        return Batch(x_t=x_t.to(self.device), sigma=t.to(self.device), c=tokens.to(self.device),
                     uc=uc.to(self.device), extra=extra)

    def teacher(self, batch: Batch) -> torch.Tensor:
        return cfg_eps(self.denoiser, batch.x_t, batch.sigma, batch.c, batch.extra["vector"],
                       batch.extra.get("uc", self.null), batch.extra.get("w", self.w), self.model.host_autocast)

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


def progress_text(step: int, total: int, loss: float, eta_s: float) -> str:
    return f"step {step}/{total} loss {loss:.4g} eta {_duration(eta_s)}"


class WebuiTrainingHost:
    """The loaded webui checkpoint as cfg_distill.run's host (DICE refiners only)."""

    def __init__(self, model: WebuiModel, folder: str, checkpoint: tuple[str, str] = ("", "")):
        self.model, self._folder, self.ckpt = model, folder, checkpoint

    def folder(self, kind: str) -> str:
        return self._folder

    def checkpoint(self) -> tuple[str, str]:
        return self.ckpt

    def is_interrupt(self, error: BaseException) -> bool:
        return False  # the webui's Interrupt is a flag (should_stop), never an exception

    def prepare(self, r: CoreRequest, start, reporter: Reporter):
        if r.method != "dice":
            raise TrainTabError("the webui tab trains DICE refiners; train TeEFusion students in ComfyUI or with "
                                "python -m cfg_distill train teefusion")
        model = self.model
        reporter.status("Encoding the prompts...")
        with torch.no_grad():
            empty = model.encode([""])
        family = family_of_cond(empty)
        null = split_cond(empty, model.denoiser.device)[0]  # the real "" encoding (DICE's null)
        prompts = encode_prompts(model, r.training_prompts())
        negatives = encode_prompts(model, r.negative_prompts)
        if model.load is not None:
            model.load()
        freeze = frozen(*model.freeze)
        freeze.__enter__()
        try:
            session = WebuiDistillHost(model, prompts, null, r.guidance_scale, r.batch_size, negatives,
                                       r.negative_share_used, r.w_input())
            session.family, session.token_dim = family, null.tokens.shape[-1]
            session.cleanup = lambda: freeze.__exit__(None, None, None)
            session.make_data = lambda rep: _latents(session, model, r, rep.should_stop, rep.status)
        except BaseException:
            freeze.__exit__(None, None, None)
            raise
        return session


class _TabReporter(Reporter):
    def __init__(self, should_stop, on_step, on_status, on_check=None):
        self._stop, self._step, self._status, self._check = should_stop, on_step, on_status, on_check

    def should_stop(self) -> bool:
        return bool(self._stop()) if self._stop is not None else False

    def status(self, text: str) -> None:
        if self._status is not None:
            self._status(text)

    def step(self, step, total, loss, elapsed, eta) -> None:
        if self._step is not None:
            self._step(step, total, loss, elapsed, eta)

    def check(self, step, total, checks) -> None:
        text = check_text(checks, total)
        if self._check is not None:
            self._check(text)
        self.status(text)


def train_in_webui(request: TrainRequest, model: WebuiModel, *, folder: str,
                   should_stop: Callable[[], bool] | None = None,
                   on_step: Callable[[int, int, float, float, float], None] | None = None,
                   on_status: Callable[[str], None] | None = None,
                   on_check: Callable[[str], None] | None = None,
                   base_checkpoint: str = "", base_hash: str = "",
                   eval_prompts: Sequence[str] | None = None, eval_batches: int = 4) -> TrainOutcome:
    """Encode, make the training latents, train (resumable, interruptible) and save the refiner:
    cfg_distill.run with the webui as the host.

    should_stop() is polled while latents are made and before every step: a stop during training
    saves what was learned (refiner and state); a stop before training saves nothing. Errors the
    user can fix come back as a not-ok outcome with the message; anything else propagates.
    eval_prompts: held-out prompts on which the trained refiner's gap to CFG is measured (outcome.gap).
    on_check(text): each held-out progress check while training (cfg_distill.run.check_text)."""
    request = replace(request, autocast=model.autocast or "none")
    host = WebuiTrainingHost(model, folder, (base_checkpoint, base_hash))
    try:
        out = run(request, host, _TabReporter(should_stop, on_step, on_status, on_check))
        if out.path is None:
            return TrainOutcome(False, "Interrupted while making the training latents: nothing was trained or saved.",
                                cancelled=True, total=request.steps)
        gap = None
        if eval_prompts:
            if on_status is not None:
                on_status("Measuring the held-out gap...")
            with torch.inference_mode(False), frozen(*model.freeze):
                with torch.no_grad():
                    empty = model.encode([""])
                null = split_cond(empty, model.denoiser.device)[0]
                gap = held_out_gap(model, out.refiner.module, eval_prompts, null, out.request, eval_batches)
    except (RequestError, TrainingStateError) as e:
        return TrainOutcome(False, str(e), total=request.steps)
    except TrainingDiverged as e:
        return TrainOutcome(False, f"{e} The refiner file was not changed.", total=request.steps)
    message = out.message + ("\nUse it in txt2img / img2img: CFG distill -> DICE, pick the refiner (refresh the "
                             "list), CFG scale 1.")
    if gap is not None:
        message += (f"\nHeld-out gap to CFG w={request.guidance_scale:g} on {len(eval_prompts)} prompts: refined "
                    f"{gap.refined:.4g} vs plain cfg 1 {gap.baseline:.4g} (ratio {gap.ratio:.3f}).")
    return TrainOutcome(True, message, losses=list(out.losses), step=out.step, total=request.steps,
                        cancelled=out.cancelled, path=out.path, state_path=out.state_path, family=out.family,
                        gap=gap)


def held_out_gap(model: WebuiModel, refiner, prompts: Sequence[str], null: Encoded, request: CoreRequest,
                 batches: int) -> GapReport:
    """The refined one-pass eps against the CFG target, and plain cfg 1 against it, on noised
    latents of prompts not trained on (their latents from the model itself, a fixed seed)."""
    with torch.no_grad():
        host = WebuiDistillHost(model, encode_prompts(model, list(prompts)), null, request.guidance_scale,
                                request.batch_size)
        hw = (request.resolution // 8, request.resolution // 8)
        host.make_latents(len(host.prompts), hw, request.seed + 10_000, request.x0_steps)
        g = torch.Generator().manual_seed(request.seed + 20_000)
        data = [host.sample_batch(k, g) for k in range(batches)]
    family = "sdxl" if null.vector is not None else "sd15"
    return evaluate_gap(refiner.to(host.device), data, host.teacher, host.student, loss=request.loss,
                        keep_first_token=FAMILIES[family].keep_first_token)


def _latents(host: WebuiDistillHost, model: WebuiModel, request: CoreRequest, should_stop, status) -> bool:
    """One training latent per prompt that the run can reach (cached between runs)."""
    prompts = request.training_prompts()
    count = min(len(prompts), request.steps * request.batch_size * request.grad_accum)
    hw = (request.resolution // 8, request.resolution // 8)
    key = (model.key, tuple(prompts[:count]), hw, request.seed, request.guidance_scale, request.x0_steps,
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
