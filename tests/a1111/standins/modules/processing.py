"""modules.processing (a1111.md "Changing the conditioning", "One pass per step at CFG 1").

process_images(p):
  scripts.before_process(p); stored = {k: opts.data[k]} for override_settings keys ALREADY in
  opts.data; try: apply override_settings; process_images_inner(p) finally: put `stored` back.
process_images_inner(p):
  setup_prompts; scripts.process(p); per batch: before_process_batch -> process_batch ->
  p.setup_conds() -> p.sample() (scripts.process_before_every_sampling before each sampling
  pass) -> postprocess_batch -> one infotext per image; then
  scripts.postprocess(p, processed). An exception while sampling propagates: postprocess is NOT
  called. An interrupt is caught by the sampler (launch_sampling) and the run finishes normally.
p.c / p.uc come from caches shared across runs (class attributes cached_c / cached_uc).
Forge (a `modules_forge` package is importable): setup_conds leaves p.uc None when cfg_scale is 1
  (and the hires pass's hr_uc None when hr_cfg is 1); samplers use ForgeCFGDenoiser.
Hires fix (txt2img, enable_hr): a second sampling pass with p.is_hr_pass True, the hires conds
  p.hr_c / p.hr_uc and p.hr_negative_prompts, at hr_upscale_to_x / _y.
Img2img: sampling starts from p.init_latent for int(denoising_strength * steps) steps.
"""
import importlib.util
import json
from dataclasses import dataclass

import torch

from modules import prompt_parser, sd_samplers_common, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser, ForgeCFGDenoiser
from modules.shared import opts, state


def is_forge():
    return importlib.util.find_spec("modules_forge") is not None


class Sampler:
    """sd_samplers_kdiffusion.KDiffusionSampler: a plain Euler loop over the denoiser."""

    def __init__(self, p):
        denoiser_class = ForgeCFGDenoiser if is_forge() else CFGDenoiser
        self.model_wrap_cfg = denoiser_class(self, p.sd_model.inner_model)
        self.sampler_extra_args = None
        self.last_latent = None

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = steps
        state.sampling_steps, state.sampling_step = steps, 0
        try:
            return func()
        except sd_samplers_common.InterruptedException:
            return self.last_latent

    def _run(self, p, x, c, uc, steps, cond_scale):
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0
        self.sampler_extra_args = {"cond": c, "image_cond": torch.zeros_like(x), "uncond": uc,
                                   "cond_scale": cond_scale, "s_min_uncond": 0.0}
        sigmas = torch.linspace(1.0, 0.1, steps + 1)
        self.last_latent = x

        def loop():
            latent = x
            for i in range(steps):
                state.sampling_step = i
                sigma = sigmas[i].expand(latent.shape[0])
                denoised = self.model_wrap_cfg(latent, sigma, **self.sampler_extra_args)
                latent = latent + (denoised - latent) * (sigmas[i] - sigmas[i + 1])
                self.last_latent = latent
            return latent

        return self.launch_sampling(steps, loop)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps):
        return self._run(p, x, conditioning, unconditional_conditioning, steps, p.cfg_scale)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps, cond_scale):
        return self._run(p, x + noise * 0.5, conditioning, unconditional_conditioning, steps, cond_scale)


class Processed:
    def __init__(self, p, images, infotexts):
        self.images = images
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.extra_generation_params = dict(p.extra_generation_params)


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def create_infotext(p, index):
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": p.all_seeds[index],
              "Size": f"{p.width}x{p.height}", **p.extra_generation_params}
    text = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {p.all_negative_prompts[index]}" if p.all_negative_prompts[index] else ""
    return f"{p.all_prompts[index]}{negative}\n{text}".strip()


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    prompt: object = ""
    negative_prompt: object = ""
    seed: int = 0
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 4
    cfg_scale: float = 1.0
    width: int = 64
    height: int = 64
    sampler_name: str = "Euler"
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    extra_generation_params: dict = None
    scripts: object = None
    script_args: list = None

    cached_c = [None, None]
    cached_uc = [None, None]

    def __post_init__(self):
        self.sd_model = self.sd_model or shared.sd_model
        self.override_settings = dict(self.override_settings or {})
        self.extra_generation_params = dict(self.extra_generation_params or {})
        self.script_args = list(self.script_args or [])
        self.comments = {}
        self.c = self.uc = None
        self.is_hr_pass = False
        self.iteration = 0
        self.sampler = None

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        n = self.batch_size * self.n_iter
        self.all_prompts = list(self.prompt) if isinstance(self.prompt, list) else [self.prompt] * n
        self.all_negative_prompts = (list(self.negative_prompt) if isinstance(self.negative_prompt, list)
                                     else [self.negative_prompt] * n)
        self.all_seeds = [self.seed + i for i in range(len(self.all_prompts))]

    def get_conds_with_caching(self, function, required_prompts, steps, cache):
        key = (tuple(required_prompts), getattr(required_prompts, "is_negative_prompt", False),
               required_prompts.width, required_prompts.height, steps, id(shared.sd_model))
        if cache[0] == key:
            return cache[1]
        # Both hosts pass opts.use_old_scheduling in the first pass too (hires_steps None there).
        cache[1] = function(shared.sd_model, required_prompts, steps, None,
                            bool(getattr(shared.opts, "use_old_scheduling", False)))
        cache[0] = key
        return cache[1]

    def setup_conds(self):
        self.firstpass_steps = self.steps
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negatives = prompt_parser.SdConditioning(self.negative_prompts, width=self.width, height=self.height,
                                                 is_negative_prompt=True)
        if is_forge() and self.cfg_scale == 1:
            self.uc = None
        else:
            self.uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, negatives, self.steps,
                                                  StableDiffusionProcessing.cached_uc)
        self.c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, prompts, self.steps,
                                             StableDiffusionProcessing.cached_c)

    def noise(self):
        gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        shape = (4, self.height // 8, self.width // 8)
        return torch.stack([torch.randn(shape, generator=g) for g in gens])

    def close(self):
        self.sampler = None
        self.c = None
        self.uc = None


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_second_pass_steps: int = 0
    hr_cfg: float = 1.0  # Forge only: the hires pass's own CFG scale
    hr_prompt: str = ""
    hr_negative_prompt: str = ""

    def sample(self):
        self.sampler = Sampler(self)
        x = self.noise()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=self.c, uc=self.uc)
        samples = self.sampler.sample(self, x, self.c, self.uc, self.steps)
        if not self.enable_hr or state.interrupted:
            return samples
        return self.sample_hr_pass(samples)

    def sample_hr_pass(self, samples):
        self.is_hr_pass = True
        self.hr_upscale_to_x, self.hr_upscale_to_y = int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        n = slice(self.iteration * self.batch_size, (self.iteration + 1) * self.batch_size)
        self.hr_prompts = [self.hr_prompt or p for p in self.all_prompts[n]]
        self.hr_negative_prompts = [self.hr_negative_prompt or p for p in self.all_negative_prompts[n]]
        prompts = prompt_parser.SdConditioning(self.hr_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y)
        negatives = prompt_parser.SdConditioning(self.hr_negative_prompts, width=self.hr_upscale_to_x,
                                                 height=self.hr_upscale_to_y, is_negative_prompt=True)
        steps = self.hr_second_pass_steps or self.steps
        forge = is_forge()
        # Both hosts (calculate_hr_conds): the first pass's steps, then the hires steps.
        old = bool(getattr(shared.opts, "use_old_scheduling", False))
        self.hr_uc = None if forge and self.hr_cfg == 1 else prompt_parser.get_learned_conditioning(
            shared.sd_model, negatives, self.firstpass_steps, steps, old)
        self.hr_c = prompt_parser.get_multicond_learned_conditioning(shared.sd_model, prompts, self.firstpass_steps,
                                                                     steps, old)
        upscaled = torch.nn.functional.interpolate(samples, scale_factor=self.hr_scale)
        self.sampler = Sampler(self)
        noise = torch.zeros_like(upscaled)
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=upscaled, noise=noise, c=self.hr_c, uc=self.hr_uc)
        result = self.sampler.sample_img2img(self, upscaled, noise, self.hr_c, self.hr_uc, steps,
                                             self.hr_cfg if forge else self.cfg_scale)
        self.is_hr_pass = False
        return result


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    init_latent: object = None
    denoising_strength: float = 0.75

    def sample(self):
        self.sampler = Sampler(self)
        steps = max(1, int(self.denoising_strength * self.steps))
        init = self.init_latent.expand(len(self.seeds), -1, -1, -1)
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=init, noise=init, c=self.c, uc=self.uc)
        return self.sampler.sample_img2img(self, init, self.noise(), self.c, self.uc, steps, self.cfg_scale)


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored = {k: opts.data[k] for k in p.override_settings if k in opts.data}
    try:
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
        return process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored.items():
                setattr(opts, k, v)


def process_images_inner(p):
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    images, infotexts = [], []
    with torch.no_grad():
        for n in range(p.n_iter):
            p.iteration = n
            if state.skipped:
                state.skipped = False
            if state.interrupted:
                break
            batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
            p.prompts, p.negative_prompts = p.all_prompts[batch], p.all_negative_prompts[batch]
            p.seeds = p.all_seeds[batch]
            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds)
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds)
            p.setup_conds()
            samples = p.sample()
            if p.scripts is not None:
                p.scripts.postprocess_batch(p, samples, batch_number=n)
            for i in range(samples.shape[0]):
                images.append(samples[i])
                infotexts.append(create_infotext(p, n * p.batch_size + i))
    processed = Processed(p, images, infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed
