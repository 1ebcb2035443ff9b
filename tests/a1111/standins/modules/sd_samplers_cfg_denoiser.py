"""modules.sd_samplers_cfg_denoiser: CFGDenoiser.forward, once per sampler step
(a1111.md "Changing the conditioning", "One pass per step at CFG 1").

Both variants, each step:
  1. raise InterruptedException when state.interrupted / skipped;
  2. build FRESH conds for this step: reconstruct_multicond_batch(cond) gives text_cond with one row
     per AND-subprompt (plus conds_list: which rows belong to which image, with weights), and
     reconstruct_cond_batch(uncond) one row per image;
  3. call script_callbacks.cfg_denoiser_callback(params) with params.denoiser = self (self.p is p);
  4. READ BACK params.text_cond / params.text_uncond and give those to the model.
A1111 (CFGDenoiser): never skips the negative pass because cfg = 1; it skips it only while
  opts.skip_early_cond != 0 and step / total_steps <= opts.skip_early_cond (and then writes
  "Skip Early CFG" into p.extra_generation_params); otherwise cond and uncond rows go through the
  model and are combined with cond_scale.
Forge (ForgeCFGDenoiser): uncond may be None (at cfg 1 p.uc is never encoded); its
  sampling_function drops the negative pass when isclose(cond_scale, 1); the hires pass uses
  p.hr_cfg.
`inner_model` is the k-diffusion-wrapped UNet: inner_model(x, sigma, cond=...) -> denoised.
"""
import math

import torch

from modules import prompt_parser, sd_samplers_common
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback
from modules.shared import opts, state


def _catenate(conds):
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def _condition_dict(c_crossattn, c_concat):
    if isinstance(c_crossattn, dict):
        return {**c_crossattn, "c_concat": [c_concat]}
    return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler, inner_model):
        super().__init__()
        self.sampler = sampler
        self.inner_model = inner_model
        self.p = None
        self.step = 0
        self.steps = None
        self.total_steps = None
        self.mask = None
        self.init_latent = None

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException

        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        batch_size = len(conds_list)
        repeats = [len(c) for c in conds_list]

        x_in = torch.cat([torch.stack([x[i]] * n) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i]] * n) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i]] * n) for i, n in enumerate(repeats)] + [image_cond])

        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond, self)
        cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond

        skip_uncond = False
        if opts.skip_early_cond != 0. and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]

        if skip_uncond:
            cond_in = tensor
        elif tensor.shape[1] == uncond.shape[1]:
            cond_in = _catenate([tensor, uncond])
        else:  # the host runs cond and uncond separately when their lengths differ
            cond_in = None
        if cond_in is not None:
            x_out = self.inner_model(x_in, sigma_in, cond=_condition_dict(cond_in, image_cond_in[:x_in.shape[0]]))
        else:
            n = tensor.shape[0]
            x_out = torch.cat([
                self.inner_model(x_in[:n], sigma_in[:n], cond=_condition_dict(tensor, image_cond_in[:n])),
                self.inner_model(x_in[n:], sigma_in[n:], cond=_condition_dict(uncond, image_cond_in[n:])),
            ])

        if skip_uncond:
            fake_uncond = torch.cat([x_out[i:i + 1] for i in [c[0][0] for c in conds_list]])
            x_out = torch.cat([x_out, fake_uncond])
            denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0)
        else:
            denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale)
        self.sampler.last_latent = denoised
        self.step += 1
        return denoised


class ForgeCFGDenoiser(CFGDenoiser):
    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException

        cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step) if uncond is not None else None

        params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self)
        cfg_denoiser_callback(params)

        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        if opts.skip_early_cond > 0 and self.step / self.total_steps <= opts.skip_early_cond:
            cond_scale = 1.0
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond

        denoised = self.sampling_function(params, cond_scale, cond_composition)
        self.sampler.last_latent = denoised
        self.step += 1
        return denoised

    def sampling_function(self, params, cond_scale, cond_composition):
        """backend.sampling.sampling_function: weighted cond rows per image; the negative pass is
        dropped when cond_scale is 1."""
        x, sigma, cond, uncond = params.x, params.sigma, params.text_cond, params.text_uncond
        rows = [i for i, comp in enumerate(cond_composition) for _ in comp]
        idx = torch.tensor(rows)
        out = self.inner_model(x[idx], sigma[idx], cond=_condition_dict(cond, params.image_cond[idx]))
        cond_pred = torch.stack([sum(out[r] * w for r, w in comp) for comp in cond_composition])
        if math.isclose(cond_scale, 1.0) or uncond is None:
            return cond_pred
        uncond_pred = self.inner_model(x, sigma, cond=_condition_dict(uncond, params.image_cond))
        return uncond_pred + (cond_pred - uncond_pred) * cond_scale
