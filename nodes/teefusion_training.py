"""The ComfyUI side of TeEFusion training: a LoRA is trained so that ONE pass with TeEFusion-fused
conditioning at w reproduces the CFG teacher at w, for every w in a range (w drawn per sample).

Host side of cfg_distill.teefusion_training, on the shared loop (cfg_distill.training.train_student)
and the DICE trainer's data pipeline (ComfyDistillHost: the x0 pool, noise and sigma draws).

The LoRA layers are ComfyUI's own training adapters (comfy.weight_adapter LoRAAdapter.create_train,
as its TrainLoraNode uses), attached with add_weight_wrapper to a CLONE: the user's MODEL is never
modified. A switch turns them off for the teacher's passes, so the teacher is the base model.
"""
from __future__ import annotations

import torch

import comfy.samplers
from comfy.weight_adapter.lora import LoRAAdapter

from ..cfg_distill.checkpointing import checkpointed_blocks
from ..cfg_distill.teefusion_training import (FUSION_MODULATION, FUSION_TOKENS, cfg_per_sample, draw_w,
                                             fuse_per_sample, lora_layers_from_state_dict, lora_state_dict)
from ..cfg_distill.training import Batch
from .comfy_training import ComfyDistillHost, _stack_conditioning, host_training_mode
from .teefusion_patch import TeEFusionYEmbedder, Y_EMBEDDER, apply_teefusion_patch



class _Switchable(torch.nn.Module):
    """A ComfyUI training adapter that the host can turn off (teacher passes see the base weights)."""

    def __init__(self, adapter: torch.nn.Module, switch: list):
        super().__init__()
        self.adapter, self.switch = adapter, switch

    def __call__(self, weight):
        return self.adapter(weight) if self.switch[0] else weight

    def passive_memory_usage(self):
        return self.adapter.passive_memory_usage()

    def move_to(self, device):
        return self.adapter.move_to(device)


def is_mmdit(model) -> bool:
    dm = getattr(model.model, "diffusion_model", None)
    return dm is not None and hasattr(dm, "y_embedder") and hasattr(dm, "t_embedder") and dm.y_embedder is not None


class TeEFusionLoraHost(ComfyDistillHost):
    """ComfyDistillHost plus: w per sample, a per-sample CFG teacher (adapters off) and a fused one-pass
    student (adapters on)."""

    def __init__(self, model, prompts, null, w_min: float, w_max: float, batch_size: int, rank: int, alpha: float,
                 seed: int, fuse_pooled: bool = True, gradient_checkpointing: bool = False):
        super().__init__(model, prompts, null, (w_min + w_max) / 2, batch_size, gradient_checkpointing)
        self.w_min, self.w_max, self.rank, self.alpha, self.fuse_pooled = w_min, w_max, rank, alpha, fuse_pooled
        self.switch = [False]  # adapters off until the student's pass
        self.fusion = FUSION_MODULATION if is_mmdit(self.mp) else FUSION_TOKENS
        self.adapters: dict[str, tuple[torch.nn.Module, tuple]] = {}
        with torch.random.fork_rng(devices=[]):  # same init for a given seed, global RNG untouched
            torch.manual_seed(seed)
            for name, m in self.mp.model.named_modules():
                weight = getattr(m, "weight", None)
                if not name.startswith("diffusion_model.") or not hasattr(m, "weight_function") or \
                        weight is None or weight.ndim < 2:
                    continue
                adapter = LoRAAdapter.create_train(weight, rank=rank, alpha=alpha).to(torch.float32)
                adapter.requires_grad_(False)
                adapter.lora_up.weight.requires_grad_(True)
                adapter.lora_down.weight.requires_grad_(True)
                self.mp.add_weight_wrapper(f"{name}.weight", _Switchable(adapter, self.switch))
                self.adapters[name] = (adapter, tuple(weight.shape))
        if self.fusion == FUSION_MODULATION:
            pooled = null.extras.get("pooled_output")
            if not isinstance(pooled, torch.Tensor):
                raise ValueError("Train TeEFusion: this MMDiT model needs the pooled vector of \"\" (p_null); the text "
                                 "encoder returned none")
            apply_teefusion_patch(self.mp, pooled, None, clone=False)  # w None: off (teacher, x0 pool)

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        out = []
        for name, (adapter, _shape) in self.adapters.items():
            out.append((f"{name}.lora_up", adapter.lora_up.weight))
            out.append((f"{name}.lora_down", adapter.lora_down.weight))
        return out

    def load_lora_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Start from a saved student LoRA (continued training) instead of the fresh initialisation."""
        shapes = {name: shape for name, (_a, shape) in self.adapters.items()}
        layers = lora_layers_from_state_dict(tensors, shapes, self.rank)
        with torch.no_grad():
            for name, (up, down) in layers.items():
                adapter = self.adapters[name][0]
                adapter.lora_up.weight.copy_(up)
                adapter.lora_down.weight.copy_(down)

    def lora_tensors(self, dtype=torch.float16) -> dict[str, torch.Tensor]:
        return lora_state_dict({name: (a.lora_up.weight, a.lora_down.weight, float(a.alpha), shape)
                                for name, (a, shape) in self.adapters.items()}, dtype)

    def sample_batch(self, step: int, g: torch.Generator) -> Batch:
        batch = super().sample_batch(step, g)
        batch.extra["w"] = draw_w(g, batch.x_t.shape[0], self.w_min, self.w_max)
        return batch

    def _y_embedder(self) -> TeEFusionYEmbedder:
        return self.mp.object_patches[Y_EMBEDDER]

    def teacher(self, batch: Batch) -> torch.Tensor:
        self.switch[0] = False
        cond = self._process(_stack_conditioning(batch.c, batch.extra["prompts"]), batch)
        uncond = self._process([[self.null.tokens.to(self.device), dict(self.null.extras)]], batch)
        c_out, u_out = comfy.samplers.calc_cond_batch(self.mp.model, [cond, uncond], batch.x_t, batch.sigma,
                                                      self.mp.model_options)
        return self._eps(batch, cfg_per_sample(c_out, u_out, batch.extra["w"]))

    def fused_conditioning(self, batch: Batch) -> list:
        """The student's conditioning: fused tokens (+ pooled) for UNets, unfused for MMDiT."""
        prompts, w = batch.extra["prompts"], batch.extra["w"]
        extras = {k: v for k, v in prompts[0].extras.items() if not isinstance(v, torch.Tensor)}
        pooled = [p.extras.get("pooled_output") for p in prompts]
        pooled = torch.cat(pooled, 0) if all(isinstance(x, torch.Tensor) for x in pooled) else None
        null_pooled = self.null.extras.get("pooled_output")
        if self.fusion == FUSION_MODULATION:
            tokens = batch.c
        else:
            tokens = fuse_per_sample(batch.c, self.null.tokens.to(self.device), w)
            if pooled is not None and self.fuse_pooled and isinstance(null_pooled, torch.Tensor):
                pooled = fuse_per_sample(pooled, null_pooled, w)
        if pooled is not None:
            extras["pooled_output"] = pooled
        return [[tokens, extras]]

    def predict(self, batch: Batch, lora: bool = True) -> torch.Tensor:
        """One pass with fused conditioning; lora=False: the base model (the untrained baseline)."""
        cond = self._process(self.fused_conditioning(batch), batch)
        self.switch[0] = lora
        if self.fusion == FUSION_MODULATION:
            self._y_embedder().w = batch.extra["w"]
        try:
            with checkpointed_blocks(self.mp.model.diffusion_model, self.gradient_checkpointing), host_training_mode():
                denoised = comfy.samplers.calc_cond_batch(self.mp.model, [cond], batch.x_t, batch.sigma,
                                                          self.mp.model_options)[0]
        finally:
            self.switch[0] = False
            if self.fusion == FUSION_MODULATION:
                self._y_embedder().w = None
        return self._eps(batch, denoised)
