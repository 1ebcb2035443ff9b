"""Train DICE Refiner: distil CFG at scale w into a refiner for the connected checkpoint."""
from __future__ import annotations

import logging
import os
import re
import sys

import numpy as np
import torch

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..cfg_distill.families import FAMILIES, family_for_model_class, guidance_distilled_reason
from ..cfg_distill.plot import loss_curve_image
from ..cfg_distill.prompts import default_prompts
from ..cfg_distill.refiner import DiceRefiner
from ..cfg_distill.refiner_file import LoadedRefiner, RefinerInfo, save_refiner, short_hash_of_file
from ..cfg_distill.training import (TrainConfig, TrainingDiverged, TrainResult, load_training_state,
                                   train_refiner)
from . import folders
from .comfy_training import ComfyDistillHost, encode_prompts
from .refiner_nodes import DiceRefinerType

log = logging.getLogger("cfg_distill")
PROGRESS_EVENT, DONE_EVENT = "cfg_distill.train.progress", "cfg_distill.train.done"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,120}$")


def family_of(model, token_dim: int) -> str:
    return family_for_model_class(type(model.model).__name__, token_dim)


def check_distillable(model, family: str) -> None:
    """Guidance-distilled models (Flux dev, HunyuanVideo T2V) have no CFG pass: say so, do not train."""
    params = getattr(model.model.diffusion_model, "params", None)
    why = guidance_distilled_reason(family, bool(getattr(params, "guidance_embed", False)))
    if why:
        raise ValueError(f"Train DICE Refiner: cannot distil {FAMILIES.get(family, FAMILIES['other']).label}: {why}.")


def checkpoint_of(prompt: dict | None, node_id: str | None) -> str:
    """Follow this node's `model` input upstream (through LoRA and patch nodes) to a loader's file."""
    node = (prompt or {}).get(str(node_id))
    for _ in range(64):
        if node is None:
            return ""
        inputs = node.get("inputs", {})
        for key in ("ckpt_name", "unet_name"):
            if isinstance(inputs.get(key), str):
                return inputs[key]
        link = inputs.get("model")
        node = prompt.get(str(link[0])) if isinstance(link, list) else None
    return ""


def _prompt_server():
    """The running PromptServer, or None in library mode (headless trainer, tests). Never imports
    ComfyUI's server module itself: outside a server that import is slow (seconds) and fails."""
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def send_event(name: str, data: dict) -> None:
    instance = _prompt_server()
    if instance is None:  # library mode (headless trainer): no server to tell
        return
    try:
        instance.send_sync(name, data)
    except Exception:
        pass


def state_path_for(name: str) -> str:
    return os.path.join(folders.default_dir(), f"{name}.dice-train-state")


class TrainDiceRefiner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TrainDiceRefiner",
            display_name="Train DICE Refiner",
            category="conditioning/cfg-distill",
            description="Distils classifier-free guidance at scale w into a DICE refiner for the connected "
                        "checkpoint: only the small refiner is trained, the model stays frozen and unchanged. "
                        "Without images, training latents come from the model itself (a few CFG sampling "
                        "steps per prompt). Saves to models/dice_refiners/<name>.safetensors; Cancel stops "
                        "within one step and keeps what was learned; 'resume' continues a saved run.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="One prompt per line. Empty: the bundled list of varied prompts."),
                io.Float.Input("guidance_scale", default=5.0, min=1.0, max=30.0, step=0.1,
                               tooltip="The CFG scale w the refiner reproduces at cfg 1 (paper: 5)."),
                io.Int.Input("steps", default=2000, min=1, max=1_000_000,
                             tooltip="Total optimizer steps (with resume: the target, not the extra)."),
                io.Int.Input("batch_size", default=4, min=1, max=512,
                             tooltip="Samples per micro-batch (sets the memory); the effective batch is "
                                     "batch_size x grad_accum. Defaults: see the README's training table."),
                io.Float.Input("learning_rate", default=5e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW lr. 5e-4 (testbed: 5e-4 and 1e-3 alike; the paper's 2e-4 is "
                                       "for batch 128)."),
                io.Combo.Input("loss", options=["l2", "l1"], default="l2",
                               tooltip="Paper: L1 for SD1.5, L2 for SDXL (both summed per sample)."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Training image width (px)."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.String.Input("refiner_name", default="my_dice_refiner",
                                tooltip="File name in models/dice_refiners (no extension)."),
                io.Int.Input("save_every", default=200, min=0, max=1_000_000,
                             tooltip="Checkpoint every N steps (0: only at the end and on cancel)."),
                io.Boolean.Input("resume", default=False, tooltip="Continue the saved run of this name."),
                io.Int.Input("x0_steps", default=8, min=1, max=100, optional=True,
                             tooltip="Teacher sampling steps per prompt when no images are given."),
                io.Combo.Input("autocast", options=["none", "bf16", "fp16"], default="none", optional=True,
                               tooltip="Mixed precision on CUDA GPUs (ignored on CPU)."),
                io.Int.Input("grad_accum", default=4, min=1, max=1024, optional=True,
                             tooltip="Micro-batches per optimizer step: effective batch batch_size x grad_accum "
                                     "at the memory of batch_size. Default 4 x 4 = 16, the batch at which the "
                                     "testbed's recovery levels off by 2000 steps. Absent (older API workflows): 1."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute the frozen model's blocks in the backward pass instead of "
                                         "storing them: less memory (SD1.5 at 512 px on CPU: peak 11.6 -> 6.4 "
                                         "GiB), slower steps (measured +1% to +26%)."),
                io.Image.Input("images", optional=True, tooltip="Real images to noise, as in the paper."),
                io.Vae.Input("vae", optional=True, tooltip="Needed with images."),
                io.String.Input("captions", multiline=True, optional=True, default="",
                                tooltip="One caption per image; else the prompts are used in turn."),
                io.Combo.Input("lr_schedule", options=["cosine", "constant"], default="cosine", optional=True,
                               tooltip="cosine (default): the learning rate falls to 0 over the run; on the testbed "
                                       "it took the same 2000 x 16 run from 68% to 77% of CFG's gain. constant: "
                                       "the same rate throughout (a run extended by resume then continues "
                                       "exactly)."),
                io.Float.Input("w_min", default=0.0, min=0.0, max=30.0, step=0.1, optional=True,
                               tooltip="With w_max: one refiner for every w in [w_min, w_max] (w an input of "
                                       "Apply DICE Refiner), w drawn per sample; guidance_scale must lie inside "
                                       "(the reference w). The refiner reads c + s (w - w_ref)(c - uc), s set "
                                       "so the range's farther end moves halfway to the negative (0.25 for 3-7 "
                                       "around 5). 0 and 0: a refiner for guidance_scale only."),
                io.Float.Input("w_max", default=0.0, min=0.0, max=30.0, step=0.1, optional=True),
                io.String.Input("negative_prompts", multiline=True, optional=True, default="",
                                tooltip="One negative prompt per line to train with, so that the refiner works "
                                        "with a negative prompt when applied (the teacher is CFG with that "
                                        "negative; the file records it). Mix short ones ('blurry', 'red') and "
                                        "full prompts: on the testbed, short negatives as half the list took "
                                        "avoidance from 20% to 5%. Empty: trained with \"\" only."),
                io.Float.Input("negative_share", default=0.5, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Share of samples that get a negative prompt (the rest: \"\"); used "
                                       "only with negative_prompts. Testbed: 0.5."),
            ],
            outputs=[DiceRefinerType.Output(display_name="refiner"), io.Image.Output(display_name="loss_curve")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, prompts, guidance_scale, steps, batch_size, learning_rate, loss, width, height,
                seed, refiner_name, save_every, resume, x0_steps=8, autocast="none", images=None, vae=None,
                captions="", gradient_checkpointing=False, grad_accum=1, lr_schedule="cosine", w_min=0.0,
                w_max=0.0, negative_prompts="", negative_share=0.5) -> io.NodeOutput:
        node_id = str(cls.hidden.unique_id) if cls.hidden else None
        prompt_graph = cls.hidden.prompt if cls.hidden else None
        result = run_training(model, clip, prompts, guidance_scale, steps, batch_size, learning_rate, loss,
                              width, height, seed, refiner_name, save_every, resume, x0_steps, autocast,
                              images, vae, captions, node_id=node_id,
                              base_checkpoint=checkpoint_of(prompt_graph, node_id),
                              gradient_checkpointing=gradient_checkpointing, grad_accum=grad_accum,
                              lr_schedule=lr_schedule, w_range=(w_min, w_max) if (w_min or w_max) else None,
                              negative_prompts=negative_prompts or "",
                              negative_share=negative_share if (negative_prompts or "").strip() else 0.0)
        return io.NodeOutput(*result)



def progress_reporter(steps: int, node_id, on_step, main_rank: bool, log_every: int):
    """(should_stop, on_step) for the training loop: progress bar, live-view events and log lines on
    the main rank, and the UI's Cancel, which raises inside the progress update and stops the loop
    before the next step, keeping what was learned."""
    pbar = comfy.utils.ProgressBar(steps, node_id=node_id)
    cancel = [False]

    def stop() -> bool:
        return cancel[0] or comfy.model_management.processing_interrupted()

    def report_step(step, total, loss_value, elapsed, eta):
        if on_step is not None:
            on_step(step, total, loss_value, elapsed, eta)
        if not main_rank:
            return
        try:
            pbar.update_absolute(step, total)
        except comfy.model_management.InterruptProcessingException:
            cancel[0] = True
        send_event(PROGRESS_EVENT, {"node": node_id, "step": step, "total": total, "loss": loss_value,
                                    "eta_s": eta, "elapsed_s": elapsed})
        _progress_text(f"step {step}/{total}  loss {loss_value:.4g}  eta {eta:.0f}s", node_id)
        if log_every and (step % log_every == 0 or step == total):
            log.info("step %d/%d loss %.5g eta %.0fs", step, total, loss_value, eta)

    return stop, report_step


def final_loss(losses: list[float]) -> float:
    """The mean of the last tenth (at most 10 steps): less noisy than the last loss, never dominated
    by the first steps of a short run."""
    tail = max(1, min(10, len(losses) // 10))
    return float(np.mean(losses[-tail:])) if losses else float("nan")

def run_training(model, clip, prompts, guidance_scale, steps, batch_size, learning_rate, loss, width, height,
                 seed, refiner_name, save_every, resume, x0_steps=8, autocast="none", images=None, vae=None,
                 captions="", node_id=None, base_checkpoint="", should_stop=None, log_every=0, on_step=None,
                 gradient_checkpointing=False, percent_range=(0.0, 1.0), negative_prompts="",
                 negative_share=0.0, init=None, grad_accum=1, lr_schedule="constant", w_range=None,
                 trajectories=None, one_level_per_batch=False):
    """The node's work, callable from the headless trainer too. Returns (LoadedRefiner, loss image).

    Headless use: should_stop() replaces ComfyUI's interrupt flag (polled before every step and while
    the training latents are prepared; a stop there raises InterruptProcessingException and nothing is
    saved); a run cancelled during training then returns normally. on_step(step, total, loss,
    elapsed_s, eta_s) follows every step. Under torch.distributed only rank 0 writes and reports."""
    name = (refiner_name or "").strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _NAME.match(name):
        raise ValueError(f"refiner_name {refiner_name!r} is not a plain file name: use letters, digits, '.', "
                         "'_', '-' or spaces (no folders); it is saved in models/dice_refiners")
    texts = [p.strip() for p in (prompts or "").splitlines() if p.strip()] or default_prompts()
    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8 (got {width}x{height})")
    if images is not None and vae is None:
        raise ValueError("images were given without a VAE: connect the checkpoint's VAE to encode them")
    config = TrainConfig(guidance_scale=guidance_scale, steps=steps, batch_size=batch_size, lr=learning_rate,
                         loss=loss, seed=seed, save_every=save_every, grad_accum=grad_accum,
                         lr_schedule=lr_schedule, autocast=None if autocast == "none" else autocast).validate()

    with torch.inference_mode(False), torch.enable_grad():
        encoded = encode_prompts(clip, texts)
        null = encode_prompts(clip, [""])[0]
        token_dim = null.tokens.shape[-1]
        family = family_of(model, token_dim)
        check_distillable(model, family)
        config.keep_first_token = FAMILIES.get(family, FAMILIES["other"]).keep_first_token
        negs = [p.strip() for p in (negative_prompts or "").splitlines() if p.strip()]
        w_input = w_input_for(w_range, guidance_scale)
        host = ComfyDistillHost(model, encoded, null, guidance_scale, batch_size, gradient_checkpointing,
                                percent_range=percent_range, negatives=encode_prompts(clip, negs) if negs else None,
                                negative_share=negative_share, w_input=w_input, trajectories=trajectories,
                                one_level_per_batch=one_level_per_batch)
        host.load()
        try:
            _fill_x0_pool(host, texts, encoded, clip, images, vae, captions,
                          (height // 8, width // 8), x0_steps, seed, node_id, should_stop=should_stop)
            if trajectories is not None and trajectories.share > 0:
                _progress_text(f"sampling {trajectories.count} training trajectories", node_id)
                host.add_trajectory_points((height // 8, width // 8), seed + 7919)
            info_fields = dict(base_family=family, base_checkpoint=base_checkpoint,
                               base_hash=_checkpoint_hash(base_checkpoint),
                               negatives=bool(negs) and negative_share > 0, w_input=w_input)
            if tuple(percent_range) != (0.0, 1.0):  # one range of a K-range refiner (combined later)
                info_fields["extra"] = {"trained_percent_range": [float(v) for v in percent_range]}
            main_rank = _rank() == 0  # torch.distributed: all ranks hold the same weights; one writes
            stop, report_step = progress_reporter(steps, node_id, on_step, main_rank, log_every)

            state_path = state_path_for(name)
            state_info = RefinerInfo(token_dim, config.inner_dim, config.heads, guidance_scale=guidance_scale,
                                     keep_first_token=config.keep_first_token, **info_fields)
            try:
                result = train_refiner(
                    config, host.sample_batch, host.teacher, host.student, token_dim=token_dim,
                    device=host.device, state_path=state_path, resume=resume, init=init,
                    should_stop=should_stop or stop, on_step=report_step, info=state_info)
            except TrainingDiverged as e:
                raise ValueError(f"Train DICE Refiner: {e}") from None
            except comfy.model_management.InterruptProcessingException:
                # Cancel arrived inside a model pass: the loop saved its state before re-raising.
                if not os.path.exists(state_path):
                    raise
                result = _result_from_state(state_path, config)
        finally:
            host.cleanup()

    info = result.info(**info_fields)
    path = os.path.join(folders.default_dir(), f"{name}.safetensors")
    refiner = result.refiner.cpu().eval().requires_grad_(False)
    final = final_loss(result.losses)
    if main_rank:
        save_refiner(path, refiner, info)
        send_event(DONE_EVENT, {"node": node_id, "final_loss": final, "file": os.path.basename(path),
                                "cancelled": result.cancelled, "steps": result.step})
        log.info("DICE refiner %s after %d steps (final loss %.5g)%s: %s", "saved", result.step, final,
                 " - cancelled" if result.cancelled else "", path)
    if result.cancelled and should_stop is None:
        raise comfy.model_management.InterruptProcessingException()  # stop the rest of the graph
    curve = torch.from_numpy(loss_curve_image(result.losses))[None]
    return LoadedRefiner(refiner, info, os.path.basename(path)), curve


# How far a w-conditioned refiner's input c + s (w - w_ref)(c - uc) may move towards the negative over the
# trained range: |s (w - w_ref)| <= W_INPUT_REACH. At 1 the query at the range's end is uc itself and the
# refiner cannot see the prompt (testbed: s = 0.5 over 3-7 fell to 47% at w = 3); 0.5 is s = 0.25 over
# 3-7, the best measured (0.1 read too little of w). At w_ref the input is c, so a single-w refiner
# trained at w_ref is a valid start.
W_INPUT_REACH = 0.5
W_INPUT_SCALE: float | None = None  # a fixed s instead (the testbed's --w-input-scale ablation)


def w_input_for(w_range, guidance_scale) -> dict | None:
    """RefinerInfo.w_input of a refiner trained for w in w_range (None: a single-w refiner), centred
    on guidance_scale."""
    if w_range is None:
        return None
    lo, hi = (float(v) for v in w_range)
    if not (0 <= lo < hi and lo <= guidance_scale <= hi):
        raise ValueError(f"w range must satisfy 0 <= w_min < w_max with the guidance scale inside it, e.g. 3 to 7 "
                         f"around 5 (got {lo:g} to {hi:g}, guidance scale {guidance_scale:g})")
    scale = W_INPUT_SCALE
    if scale is None:
        scale = round(W_INPUT_REACH / max(hi - guidance_scale, guidance_scale - lo), 6)
    return {"range": [lo, hi], "ref": float(guidance_scale), "scale": scale}


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _result_from_state(state_path: str, config: TrainConfig) -> TrainResult:
    state = load_training_state(state_path)
    refiner = DiceRefiner(*state.shape)
    refiner.load_state_dict(state.refiner)
    return TrainResult(refiner=refiner, step=state.step, losses=list(state.losses), cancelled=True,
                       state_path=state_path, config=config)


def _fill_x0_pool(host, texts, encoded, clip, images, vae, captions, latent_hw, x0_steps, seed,
                  node_id=None, should_stop=None):
    if images is not None:
        caps = [c.strip() for c in (captions or "").splitlines() if c.strip()]
        if caps and len(caps) != images.shape[0]:
            raise ValueError(f"{len(caps)} captions for {images.shape[0]} images: give one caption per line "
                             "per image, or none (then the prompts are used in turn)")
        if caps:
            host.prompts.extend(encode_prompts(clip, caps))
            index = list(range(len(encoded), len(encoded) + len(caps)))
        else:
            index = [i % len(encoded) for i in range(images.shape[0])]
        with torch.no_grad():
            latents = vae.encode(images[:, :, :, :3].clone())
        host.add_x0_from_images(latents, index)
        return
    # One latent per prompt, generated once. The pool never depends on the step count, so a run
    # resumed with more steps sees exactly the data an uninterrupted run would.
    count = len(texts)
    for i in range(count):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if should_stop is not None and should_stop():  # headless cancel before the first step
            raise comfy.model_management.InterruptProcessingException()
        _progress_text(f"preparing training latents {i + 1}/{count} (teacher CFG sampling)", node_id)
        host.add_x0_from_teacher(i, latent_hw, x0_steps, seed + i)


def _checkpoint_hash(name: str) -> str:
    if not name:
        return ""
    path = folder_paths.get_full_path("checkpoints", name) or folder_paths.get_full_path("diffusion_models", name)
    return short_hash_of_file(path) if path else ""


def _progress_text(text: str, node_id) -> None:
    instance = _prompt_server()
    if instance is None or node_id is None:
        return
    try:
        instance.send_progress_text(text, node_id)
    except Exception:
        pass
