"""Train TeEFusion: distil CFG into a LoRA so that ONE pass with TeEFusion-fused conditioning at w
reproduces the CFG teacher at w, for every w in a range (w drawn per sample).

Host side of cfg_distill.teefusion_training, on the shared loop (cfg_distill.training.train_student)
and the DICE trainer's data pipeline (ComfyDistillHost: the x0 pool, noise and sigma draws).

The LoRA layers are ComfyUI's own training adapters (comfy.weight_adapter LoRAAdapter.create_train,
as its TrainLoraNode uses), attached with add_weight_wrapper to a CLONE: the user's MODEL is never
modified. A switch turns them off for the teacher's passes, so the teacher is the base model.
"""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
from comfy.weight_adapter.lora import LoRAAdapter
from comfy_api.latest import io

from ..cfg_distill.checkpointing import checkpointed_blocks
from ..cfg_distill.plot import loss_curve_image
from ..cfg_distill.prompts import default_prompts
from ..cfg_distill.teefusion_training import (FUSION_MODULATION, FUSION_TOKENS, LoraInfo, LoraStudent,
                                             cfg_per_sample, draw_w, fuse_per_sample, lora_layers_from_state_dict,
                                             lora_state_dict, save_lora,
                                             validate_w_range)
from ..cfg_distill.training import Batch, TrainConfig, TrainingDiverged, load_training_state, train_student
from .comfy_training import ComfyDistillHost, _stack_conditioning, encode_prompts, host_training_mode
from .teefusion_patch import TeEFusionYEmbedder, Y_EMBEDDER, apply_teefusion_patch
from .training_node import (_NAME, DONE_EVENT, _checkpoint_hash, _fill_x0_pool, _rank, checkpoint_of, family_of,
                            final_loss, progress_reporter, send_event)

log = logging.getLogger("cfg_distill")
LORA_FOLDER = "loras"


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


def lora_dir() -> str:
    path = folder_paths.get_folder_paths(LORA_FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path


def state_path_for(name: str) -> str:
    return os.path.join(lora_dir(), f"{name}.teefusion-train-state")


NO_INIT = "none (fresh LoRA)"


class TrainTeEFusion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TrainTeEFusion",
            display_name="Train TeEFusion",
            category="conditioning/cfg-distill",
            description="Distils classifier-free guidance into a LoRA for the connected checkpoint, so that ONE "
                        "model pass with TeEFusion-fused conditioning at w (TeEFusion Conditioning; SD3: TeEFusion "
                        "Model Patch) reproduces CFG at w. w is drawn per sample from [w_min, w_max], so one LoRA "
                        "serves every w in the range. The input MODEL stays unchanged; the output MODEL has the "
                        "LoRA. Saves models/loras/<name>.safetensors (a standard LoRA: LoraLoaderModelOnly loads "
                        "it); Cancel keeps what was learned; 'resume' continues a saved run.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="One prompt per line. Empty: the bundled list of varied prompts."),
                io.Float.Input("w_min", default=2.0, min=0.0, max=30.0, step=0.1),
                io.Float.Input("w_max", default=8.0, min=0.0, max=30.0, step=0.1),
                io.Int.Input("steps", default=2000, min=1, max=1_000_000,
                             tooltip="Total optimizer steps (with resume: the target, not the extra)."),
                io.Int.Input("batch_size", default=4, min=1, max=512),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW; the LoRA's scale is alpha / rank = 1. Too high oscillates (the "
                                       "loss curve jumps up and down): lower it."),
                io.Int.Input("rank", default=8, min=1, max=256, tooltip="LoRA rank."),
                io.Combo.Input("loss", options=["l2", "l1"], default="l2"),
                io.Int.Input("width", default=512, min=64, max=4096, step=8),
                io.Int.Input("height", default=512, min=64, max=4096, step=8),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.String.Input("lora_name", default="my_teefusion_lora",
                                tooltip="File name in models/loras (no extension)."),
                io.Int.Input("save_every", default=200, min=0, max=1_000_000),
                io.Boolean.Input("resume", default=False, tooltip="Continue the saved run of this name."),
                io.Int.Input("x0_steps", default=8, min=1, max=100, optional=True,
                             tooltip="Teacher sampling steps per prompt when no images are given."),
                io.Combo.Input("autocast", options=["none", "bf16", "fp16"], default="none", optional=True),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True),
                io.Image.Input("images", optional=True, tooltip="Real images to noise."),
                io.Vae.Input("vae", optional=True, tooltip="Needed with images."),
                io.String.Input("captions", multiline=True, optional=True, default=""),
                io.Combo.Input("lr_schedule", options=["constant", "cosine"], default="constant", optional=True,
                               tooltip="cosine: the learning rate falls to 0 over the run (a final polish)."),
                io.Combo.Input("continue_from", options=[NO_INIT] + folder_paths.get_filename_list(LORA_FOLDER),
                               default=NO_INIT, optional=True,
                               tooltip="Start from a student LoRA saved by Train TeEFusion for this checkpoint (same "
                                       "rank) instead of a fresh one, e.g. for a cosine polish."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="lora_name"),
                     io.Image.Output(display_name="loss_curve")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, prompts, w_min, w_max, steps, batch_size, learning_rate, rank, loss, width,
                height, seed, lora_name, save_every, resume, x0_steps=8, autocast="none",
                gradient_checkpointing=False, images=None, vae=None, captions="", lr_schedule="constant",
                continue_from=NO_INIT) -> io.NodeOutput:
        node_id = str(cls.hidden.unique_id) if cls.hidden else None
        graph = cls.hidden.prompt if cls.hidden else None
        out = run_teefusion_training(model, clip, prompts, w_min, w_max, steps, batch_size, learning_rate, rank,
                                     loss, width, height, seed, lora_name, save_every, resume, x0_steps, autocast,
                                     images, vae, captions, node_id=node_id,
                                     base_checkpoint=checkpoint_of(graph, node_id),
                                     gradient_checkpointing=gradient_checkpointing, lr_schedule=lr_schedule,
                                     init_lora=None if continue_from in (None, "", NO_INIT) else
                                     folder_paths.get_full_path_or_raise(LORA_FOLDER, continue_from))
        return io.NodeOutput(*out)


def _read_init_lora(path: str):
    """(tensors, LoraInfo) of a student LoRA made by this pack; a clear error for anything else."""
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ValueError(f"init LoRA {path!r} does not exist: give the path of a .safetensors student LoRA")
    try:
        with safe_open(path, framework="pt") as f:
            info = LoraInfo.from_metadata(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"init LoRA {name!r} is not a readable .safetensors file ({e})") from None
    if info is None:
        raise ValueError(f"init LoRA {name!r} has no TeEFusion student metadata: only LoRAs saved by Train TeEFusion "
                         "can be continued")
    return tensors, info


def run_teefusion_training(model, clip, prompts, w_min, w_max, steps, batch_size, learning_rate, rank, loss, width,
                           height, seed, lora_name, save_every, resume, x0_steps=8, autocast="none", images=None,
                           vae=None, captions="", node_id=None, base_checkpoint="", should_stop=None, log_every=0,
                           on_step=None, gradient_checkpointing=False, alpha=None, lr_schedule="constant",
                           init_lora=None):
    """The node's work, also for the headless trainer. Returns (MODEL with the LoRA, file name, loss image).

    Same contract as training_node.run_training (should_stop, on_step, events, cancel, resume, NaN).
    init_lora: path of a student LoRA of this pack (same base model and rank) to continue from instead of
    a fresh initialisation; a saved state of this name (resume) takes precedence over it."""
    name = (lora_name or "").strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _NAME.match(name):
        raise ValueError(f"lora_name {lora_name!r} is not a plain file name: use letters, digits, '.', '_', '-' or "
                         "spaces (no folders); it is saved in models/loras")
    validate_w_range(w_min, w_max)
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, e.g. 8 (got {rank!r})")
    alpha = float(rank if alpha is None else alpha)
    texts = [p.strip() for p in (prompts or "").splitlines() if p.strip()] or default_prompts()
    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8 (got {width}x{height})")
    if images is not None and vae is None:
        raise ValueError("images were given without a VAE: connect the checkpoint's VAE to encode them")
    config = TrainConfig(guidance_scale=(w_min + w_max) / 2, steps=steps, batch_size=batch_size, lr=learning_rate,
                         loss=loss, seed=seed, save_every=save_every, lr_schedule=lr_schedule,
                         autocast=None if autocast == "none" else autocast).validate()
    init_tensors, init_info = _read_init_lora(init_lora) if init_lora else (None, None)
    main_rank = _rank() == 0
    state_path = state_path_for(name)

    with torch.inference_mode(False), torch.enable_grad():
        encoded = encode_prompts(clip, texts)
        null = encode_prompts(clip, [""])[0]
        family = family_of(model, null.tokens.shape[-1])
        host = TeEFusionLoraHost(model, encoded, null, w_min, w_max, batch_size, rank, alpha, seed,
                                 gradient_checkpointing=gradient_checkpointing)
        info = LoraInfo(w_min=float(w_min), w_max=float(w_max), fusion=host.fusion, rank=rank, alpha=alpha,
                        base_family=family, base_checkpoint=base_checkpoint,
                        base_hash=_checkpoint_hash(base_checkpoint))
        if init_tensors is not None:
            if init_info.fusion != host.fusion or init_info.rank != rank:
                raise ValueError(f"init LoRA {os.path.basename(init_lora)!r} is a {init_info.summary()}; this run "
                                 f"trains rank {rank} with fusion {host.fusion}: pick a LoRA made for this model "
                                 "with the same rank")
            host.load_lora_tensors(init_tensors)
            info.continued_from = f"{os.path.basename(init_lora)} ({init_info.train_steps} steps)"
        student = LoraStudent(host.named_trainable(), host.predict, rank)
        host.load()
        try:
            _fill_x0_pool(host, texts, encoded, clip, images, vae, captions, (height // 8, width // 8), x0_steps,
                          seed, node_id, should_stop=should_stop)
            stop, report_step = progress_reporter(steps, node_id, on_step, main_rank, log_every)

            def state_meta(step):
                info.train_steps = step
                return info.to_metadata()

            try:
                run = train_student(config, student, host.sample_batch, host.teacher, device=host.device,
                                    state_path=state_path, resume=resume, should_stop=should_stop or stop,
                                    on_step=report_step, metadata=state_meta)
                steps_done, losses, cancelled = run.step, run.losses, run.cancelled
            except TrainingDiverged as e:
                raise ValueError(f"Train TeEFusion: {e}") from None
            except comfy.model_management.InterruptProcessingException:
                if not os.path.exists(state_path):
                    raise
                state = load_training_state(state_path)  # the loop saved it before re-raising
                with torch.no_grad():
                    for key, p in student.named_trainable():
                        p.copy_(state.refiner[key])
                steps_done, losses, cancelled = state.step, list(state.losses), True
            tensors = host.lora_tensors()
        finally:
            host.cleanup()

    info.train_steps = steps_done
    file_name = f"{name}.safetensors"
    final = final_loss(losses)
    if main_rank:
        save_lora(os.path.join(lora_dir(), file_name), tensors, info)
        send_event(DONE_EVENT, {"node": node_id, "final_loss": final, "file": file_name, "cancelled": cancelled,
                                "steps": steps_done})
        log.info("TeEFusion LoRA saved after %d steps (final loss %.5g)%s: %s", steps_done, final,
                 " - cancelled" if cancelled else "", os.path.join(lora_dir(), file_name))
    if cancelled and should_stop is None:
        raise comfy.model_management.InterruptProcessingException()
    # The output MODEL: the user's model with the saved LoRA, through ComfyUI's own LoRA loading.
    with_lora = comfy.sd.load_lora_for_models(model, None, {k: v.float() for k, v in tensors.items()}, 1.0, 0)[0]
    curve = torch.from_numpy(loss_curve_image(losses))[None]
    return with_lora, file_name, curve
