"""ComfyUI side of DICE distillation: teacher / student / data callables for the core loop, built
only from ComfyUI's own sampling calls, so EPS, v-prediction and flow models all work and SDXL's
pooled vector and size conditioning pass through untouched.

Why the model is wrapped: weights of a MODEL loaded by ComfyUI are inference tensors, and
back-propagating through them into the conditioning fails. An identity weight wrapper on every
weight and bias of a CLONE makes comfy.ops cast a fresh copy per forward (as ComfyUI's own LoRA
trainer does). The shared MODEL itself is never modified.

Both teacher and student return eps-equivalent predictions, (x_t - denoised) / sigma, so the loss
is the paper's eps-space loss for EPS models and a consistent one for the other parameterisations.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers

from ..cfg_distill.autograd_safe import out_of_place_updates
from ..cfg_distill.checkpointing import checkpointed_blocks
from ..cfg_distill.fusion import repeat_to_length
from ..cfg_distill.training import Batch


@contextlib.contextmanager
def host_training_mode():
    """ComfyUI's own flag for passes that carry gradients, where the host has it (0.33:
    `comfy.model_management.in_training`, which its LoRA trainer sets around its loop): models then
    use differentiable torch code instead of fused kernels without a backward (Lumina 2's rms_rope,
    Flux-style RoPE, LTX...). Set for our passes only, and restored to what it was afterwards."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):  # older hosts: no such flag (autograd_safe covers their RoPE)
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


def _identity(weight):
    return weight


def trainable_clone(model):
    """A clone whose forward passes can carry gradients into the conditioning."""
    mp = model.clone()
    for name, module in mp.model.named_modules():
        if hasattr(module, "weight_function"):
            for attr in ("weight", "bias"):
                if getattr(module, attr, None) is not None:
                    mp.add_weight_wrapper(f"{name}.{attr}", _identity)
    return mp


@dataclass
class TrajectoryPoints:
    """Training points where the sampler evaluates the model, besides forward-noised data: the states
    x_t of sampling runs (the CFG teacher's, and the student's own with a refiner at cfg 1), at the
    sigmas of the sampler's schedule. Forward noising puts x_t off the paths a guided sampler takes;
    these put a share of the batch on them."""
    share: float  # share of a batch's samples drawn from the trajectories
    count: int = 64  # trajectories (prompts of the training data, drawn at random)
    steps: int = 20
    sampler: str = "dpmpp_2m"
    scheduler: str = "karras"
    student: object = None  # a LoadedRefiner: half the trajectories are its own at cfg 1 (else all CFG)


@dataclass
class EncodedPrompt:
    tokens: torch.Tensor  # [1, T, D], a normal (not inference) tensor
    extras: dict  # pooled_output and anything else the text encoder returned


def encode_prompts(clip, prompts: list[str]) -> list[EncodedPrompt]:
    out = []
    for p in prompts:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(p))
        tokens, extras = cond[0][0], cond[0][1]
        extras = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in extras.items()}
        out.append(EncodedPrompt(tokens.clone(), extras))
    return out


def _stack_conditioning(tokens: torch.Tensor, prompts: list[EncodedPrompt]) -> list:
    """One ComfyUI conditioning entry for a batch: tokens [B, T, D]; per-prompt tensors (pooled vector,
    attention mask, HiDream's conditioning_llama3...) stacked along the batch; other keys (SDXL width /
    height / crops, guidance...) from the first prompt (the text encoder makes them alike)."""
    extras = {k: v for k, v in prompts[0].extras.items() if not isinstance(v, torch.Tensor)}
    for key, first in prompts[0].extras.items():
        if not isinstance(first, torch.Tensor):
            continue
        values = [p.extras.get(key) for p in prompts]
        if not all(isinstance(v, torch.Tensor) and v.shape == first.shape for v in values):
            raise ValueError(f"the prompts' '{key}' tensors differ in shape ({[tuple(getattr(v, 'shape', ())) for v in values]}); "
                             "they cannot share a training batch")
        extras[key] = torch.cat(values, 0)
    return [[tokens, extras]]


def _signature(p: EncodedPrompt) -> tuple:
    """Prompts that can share a batch on a model whose cross-attention is not tile-safe: same shapes."""
    return (tuple(p.tokens.shape),) + tuple(sorted((k, tuple(v.shape)) for k, v in p.extras.items()
                                                   if isinstance(v, torch.Tensor)))


def batch_tokens(prompts: list[EncodedPrompt]) -> torch.Tensor:
    """Stack prompts of 77*k tokens; shorter ones are tiled (attention-neutral) to a common length."""
    import math

    n = 1
    for p in prompts:
        n = math.lcm(n, p.tokens.shape[1])
    return torch.cat([repeat_to_length(p.tokens, n) for p in prompts], 0)


class ComfyDistillHost:
    """Holds the trainable clone, the cached encodings and the x0 pool; provides the callables."""

    def __init__(self, model, prompts: list[EncodedPrompt], null: EncodedPrompt, guidance_scale: float,
                 batch_size: int, gradient_checkpointing: bool = False,
                 percent_range: tuple[float, float] = (0.0, 1.0),
                 negatives: list[EncodedPrompt] | None = None, negative_share: float = 0.0,
                 w_input: dict | None = None, trajectories: TrajectoryPoints | None = None,
                 one_level_per_batch: bool = False):
        start, end = percent_range
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"percent_range must satisfy 0 <= start < end <= 1 (got {percent_range!r})")
        if negative_share and not negatives:
            raise ValueError("negative_share > 0 needs negative prompts to draw from")
        if not 0.0 <= negative_share <= 1.0:
            raise ValueError(f"negative_share must be in [0, 1] (got {negative_share!r})")
        # Noise-level ranges: a refiner for one range of a K-range file only sees sigmas of that
        # range (sampling percent, as ComfyUI's start_percent / end_percent count it).
        self.percent_range = (float(start), float(end))
        # Negatives: with probability negative_share a sample's second input is a negative prompt
        # (drawn uniformly) instead of "", and the teacher is CFG with that negative.
        self.negatives, self.negative_share = list(negatives or []), float(negative_share)
        # One refiner for a range of w (RefinerInfo.w_input): w drawn per sample, the teacher is CFG at
        # that sample's w and the refiner reads it through its input.
        self.w_input = w_input
        # The official recipe draws one integer t per batch; here one noise level per batch (per
        # micro-batch) as an option, instead of one per sample.
        self.one_level_per_batch = one_level_per_batch
        self.mp = trainable_clone(model)
        self.gradient_checkpointing = gradient_checkpointing
        self.mp.model.requires_grad_(False)
        self.prompts, self.null, self.w, self.batch_size = prompts, null, guidance_scale, batch_size
        self.device = self.mp.load_device
        self.ms = self.mp.get_model_object("model_sampling")
        self.x0: list[torch.Tensor] = []  # model-space latents, one per pool entry
        # The UNet families' cross-attention has no positions on the text: prompts of 77*k tokens can be
        # tiled to a common length (as ComfyUI batches them). DiT text tokens carry positions (RoPE) or
        # masks, so there a batch holds prompts of one shape only (ComfyUI would not concat them either).
        self.tile_prompts = type(self.mp.model.diffusion_model).__name__ == "UNetModel"
        # DiTs: Flux-style blocks (Chroma, HunyuanVideo) update activations in place, and ComfyUI >= 0.8
        # applies RoPE with kernels that have no backward; see cfg_distill/autograd_safe.py.
        self.autograd_safe = not self.tile_prompts
        self.x0_prompt: list[int] = []  # which prompt each x0 belongs to
        if trajectories is not None and not 0.0 <= trajectories.share <= 1.0:
            raise ValueError(f"the trajectory share must be in [0, 1] (got {trajectories.share!r})")
        self.trajectories = trajectories
        self.traj: list[tuple[torch.Tensor, float, int]] = []  # (x_t [1, ...], sigma, prompt index)

    # -- set-up -----------------------------------------------------------------------------------
    def load(self) -> None:
        comfy.model_management.load_models_gpu([self.mp])
        self.mp.pre_run()

    def cleanup(self) -> None:
        self.mp.cleanup()

    def add_x0_from_images(self, latents: torch.Tensor, prompt_index: list[int]) -> None:
        """Real images, VAE-encoded (latent format): the paper's data."""
        lat = self.mp.model.process_latent_in(latents.to(torch.float32).clone())
        for i in range(lat.shape[0]):
            self.x0.append(lat[i:i + 1].cpu())
            self.x0_prompt.append(prompt_index[i])

    def add_x0_from_teacher(self, prompt_index: int, latent_hw: tuple[int, int], steps: int, seed: int) -> None:
        """No images: x0 from the model itself, a few CFG sampling steps at w (cached per prompt)."""
        h, w = latent_hw
        fmt = self.mp.model.latent_format
        # Video latent formats (Wan, HunyuanVideo; also Qwen-Image) are 5-D: one latent frame here.
        frames = (1,) * (getattr(fmt, "latent_dimensions", 2) - 2)
        latent = torch.zeros(1, fmt.latent_channels, *frames, h, w)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
        p = self.prompts[prompt_index]
        pos = [[p.tokens, dict(p.extras)]]
        neg = [[self.null.tokens, dict(self.null.extras)]]
        with torch.no_grad():
            x0 = comfy.sample.sample(self.mp, noise, steps, self.w, "euler", "normal", pos, neg, latent,
                                     seed=seed, disable_pbar=True)
        self.x0.append(self.mp.model.process_latent_in(x0.float()).cpu())
        self.x0_prompt.append(prompt_index)

    def add_trajectory_points(self, latent_hw: tuple[int, int], seed: int) -> None:
        """Sample self.trajectories.count trajectories (batches of batch_size) and keep every state the
        sampler evaluates inside percent_range. Call after the x0 pool is filled (its prompts are used)."""
        spec = self.trajectories
        if spec is None or spec.share == 0:
            return
        from ..cfg_distill.apply import refine_tokens

        g = torch.Generator().manual_seed(seed)
        h, w = latent_hw
        fmt = self.mp.model.latent_format
        frames = (1,) * (getattr(fmt, "latent_dimensions", 2) - 2)
        ks = comfy.samplers.KSampler(self.mp, steps=spec.steps, device=self.device, sampler=spec.sampler,
                                     scheduler=spec.scheduler, denoise=1.0, model_options=self.mp.model_options)
        sigmas = ks.sigmas.tolist()
        hi = float(self.ms.percent_to_sigma(self.percent_range[0]))
        lo = float(self.ms.percent_to_sigma(self.percent_range[1]))
        neg = [[self.null.tokens, dict(self.null.extras)]]
        done = 0
        while done < spec.count:
            n = min(self.batch_size, spec.count - done)
            pick = torch.randint(len(self.x0_prompt), (n,), generator=g).tolist()
            index = [self.x0_prompt[i] for i in pick]
            if not self.tile_prompts:
                index = [index[0]] * n  # DiTs: one prompt shape per batch
            prompts = [self.prompts[i] for i in index]
            tokens = batch_tokens(prompts)
            as_student = spec.student is not None and (done // self.batch_size) % 2 == 1
            cfg = self.w
            if as_student:
                ref = self.w_input["ref"] if self.w_input else self.w
                tokens = refine_tokens(spec.student, tokens, self.null.tokens, w=ref)
                cfg = 1.0
            latent = torch.zeros(n, fmt.latent_channels, *frames, h, w)
            noise = torch.randn(latent.shape, generator=g)
            states = []
            with torch.no_grad():
                ks.sample(noise, _stack_conditioning(tokens, prompts), neg, cfg=cfg, latent_image=latent,
                          callback=lambda i, _x0, x, _n: states.append((i, x.detach().float().cpu())),
                          disable_pbar=True, seed=seed + done)
            for i, x in states:
                if lo <= sigmas[i] <= hi and sigmas[i] > 0:
                    self.traj += [(x[j:j + 1], float(sigmas[i]), index[j]) for j in range(n)]
            done += n
        if not self.traj:
            raise ValueError("no sampling step falls inside the percent range: widen it or use more steps")

    # -- the three callables of the core loop ------------------------------------------------------
    def sample_batch(self, step: int, g: torch.Generator) -> Batch:
        idx = torch.randint(len(self.x0), (self.batch_size,), generator=g).tolist()
        if not self.tile_prompts:
            # Fill the batch from pool entries whose prompt has the first one's shapes.
            sig = _signature(self.prompts[self.x0_prompt[idx[0]]])
            alike = [i for i in range(len(self.x0)) if _signature(self.prompts[self.x0_prompt[i]]) == sig]
            idx = [idx[0]] + [alike[j % len(alike)] for j in idx[1:]]
        x0 = torch.cat([self.x0[i] for i in idx], 0)
        prompts = [self.prompts[self.x0_prompt[i]] for i in idx]
        lo, hi = max(self.percent_range[0], 0.001), min(self.percent_range[1], 0.999)
        u = torch.rand(1 if self.one_level_per_batch else self.batch_size, generator=g) * (hi - lo) + lo
        u = u.expand(self.batch_size).tolist()
        sigma = torch.tensor([self.ms.percent_to_sigma(v) for v in u], dtype=torch.float32)
        noise = torch.randn(x0.shape, generator=g)
        x_t = self.ms.noise_scaling(sigma, noise, x0)
        if self.negative_share > 0:
            # Drawn after the noise, so runs without negatives keep their exact random stream.
            pick = torch.rand(self.batch_size, generator=g) < self.negative_share
            which = torch.randint(len(self.negatives), (self.batch_size,), generator=g).tolist()
            ucs = [self.negatives[j] if p else self.null for p, j in zip(pick.tolist(), which)]
            uc = batch_tokens(ucs)
        else:
            uc = self.null.tokens
        extra = {"prompts": prompts}
        if self.w_input:  # drawn last, so runs without it keep their exact random stream
            lo, hi = self.w_input["range"]
            w = torch.rand(self.batch_size, generator=g) * (hi - lo) + lo
            extra["w"] = w.to(self.device)
            extra["w_amount"] = (self.w_input["scale"] * (w - self.w_input["ref"])).to(self.device)
        if self.traj and self.trajectories.share > 0:  # drawn last too; replaces whole samples
            pick = (torch.rand(self.batch_size, generator=g) < self.trajectories.share).tolist()
            which = torch.randint(len(self.traj), (self.batch_size,), generator=g).tolist()
            x_t, sigma = x_t.clone(), sigma.clone()
            for i in range(self.batch_size):
                state, s, p = self.traj[which[i]]
                if pick[i] and (self.tile_prompts or _signature(self.prompts[p]) == _signature(prompts[i])):
                    x_t[i:i + 1], sigma[i], prompts[i] = state, s, self.prompts[p]
        return Batch(x_t=x_t.to(self.device), sigma=sigma.to(self.device), c=batch_tokens(prompts).to(self.device),
                     uc=uc.to(self.device), extra=extra)

    def _process(self, cond, batch: Batch):
        # calc_cond_batch reads the active patcher, which ComfyUI's guider sets per sampling run.
        self.mp.model.current_patcher = self.mp
        conds = {"positive": comfy.sampler_helpers.convert_cond(cond)}
        return comfy.samplers.process_conds(self.mp.model, batch.x_t, conds, self.device)["positive"]

    def _eps(self, batch: Batch, denoised: torch.Tensor) -> torch.Tensor:
        s = batch.sigma.reshape(-1, *([1] * (batch.x_t.ndim - 1)))
        return (batch.x_t - denoised) / s

    def teacher(self, batch: Batch) -> torch.Tensor:
        cond = self._process(_stack_conditioning(batch.c, batch.extra["prompts"]), batch)
        if batch.uc.shape[0] == 1:
            uncond = self._process([[batch.uc, dict(self.null.extras)]], batch)
        else:  # per-sample negatives; pooled vectors of "" stand in (SD1.5 has none)
            uc_extras = dict(self.null.extras)
            if isinstance(uc_extras.get("pooled_output"), torch.Tensor):
                uc_extras["pooled_output"] = uc_extras["pooled_output"].expand(batch.uc.shape[0], -1)
            uncond = self._process([[batch.uc, uc_extras]], batch)
        if "w" in batch.extra:  # CFG at each sample's own w
            c_out, u_out = comfy.samplers.calc_cond_batch(self.mp.model, [cond, uncond], batch.x_t, batch.sigma,
                                                          self.mp.model_options)
            w = batch.extra["w"].to(c_out.device, c_out.dtype).reshape(-1, *([1] * (c_out.ndim - 1)))
            return self._eps(batch, u_out + w * (c_out - u_out))
        denoised = comfy.samplers.sampling_function(self.mp.model, batch.x_t, batch.sigma, uncond, cond, self.w,
                                                    model_options=self.mp.model_options)
        return self._eps(batch, denoised)

    def student(self, batch: Batch, refined_c: torch.Tensor) -> torch.Tensor:
        cond = self._process(_stack_conditioning(refined_c, batch.extra["prompts"]), batch)
        # Checkpointing (optional) trades one extra forward for not storing every block's activations.
        # out_of_place_updates: without it, DiT blocks that update activations with `x += ...` and
        # RoPE kernels without a backward would stop the backward pass into the conditioning.
        # host_training_mode: ComfyUI >= 0.33 otherwise calls fused kernels without a backward.
        with checkpointed_blocks(self.mp.model.diffusion_model, self.gradient_checkpointing), \
                out_of_place_updates(self.autograd_safe), host_training_mode():
            denoised = comfy.samplers.calc_cond_batch(self.mp.model, [cond], batch.x_t, batch.sigma,
                                                      self.mp.model_options)[0]
        return self._eps(batch, denoised)
