"""ComfyUI as a training host for cfg_distill.run: its folders, its model and text encoder, its
progress bar, live-view events and Cancel. Used by both training nodes and the command line."""
from __future__ import annotations

import logging
from dataclasses import replace
import os
import sys

import torch

import comfy.model_management
import comfy.utils
import folder_paths

from ..cfg_distill.families import FAMILIES, family_for_model_class, guidance_distilled_reason, model_size
from ..cfg_distill.refiner_file import short_hash_of_file
from ..cfg_distill.request import RequestError, TrainRequest
from ..cfg_distill.run import Reporter, check_text
from ..cfg_distill.training import check_ratio
from ..cfg_distill.teefusion_training import LoraInfo, LoraStudent
from . import folders
from .comfy_training import ComfyDistillHost, TrajectoryPoints, encode_prompts
from .teefusion_training import TeEFusionLoraHost

log = logging.getLogger("cfg_distill")
PROGRESS_EVENT, DONE_EVENT = "cfg_distill.train.progress", "cfg_distill.train.done"
CHECK_EVENT = "cfg_distill.train.check"  # {node, step, total, ratio, text}: a held-out progress check
LORA_FOLDER = "loras"


def family_of(model, token_dim: int) -> str:
    return family_for_model_class(type(model.model).__name__, token_dim)


def check_distillable(model, family: str) -> None:
    """Guidance-distilled models (Flux dev, HunyuanVideo T2V) have no CFG pass: say so, do not train."""
    params = getattr(model.model.diffusion_model, "params", None)
    why = guidance_distilled_reason(family, bool(getattr(params, "guidance_embed", False)))
    if why:
        raise RequestError(f"cannot distil {FAMILIES.get(family, FAMILIES['other']).label}: {why}.")


def checkpoint_of(prompt: dict | None, node_id: str | None) -> str:
    """Follow a node's `model` input upstream (through LoRA and patch nodes) to a loader's file."""
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


def checkpoint_hash(name: str) -> str:
    if not name:
        return ""
    path = folder_paths.get_full_path("checkpoints", name) or folder_paths.get_full_path("diffusion_models", name)
    return short_hash_of_file(path) if path else ""


def checkpoint_metadata(name: str) -> dict:
    """The safetensors header metadata of a checkpoint in ComfyUI's checkpoints folders ({} when it
    is not one, or not a .safetensors file)."""
    path = folder_paths.get_full_path("checkpoints", name) if name else None
    if not path or not path.endswith(".safetensors"):
        return {}
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # an unreadable header: the family's default size
        return {}


def lora_dir() -> str:
    path = folder_paths.get_folder_paths(LORA_FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path


def _prompt_server():
    """The running PromptServer, or None in library mode (command line, tests). Never imports
    ComfyUI's server module itself: outside a server that import is slow (seconds) and fails."""
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def send_event(name: str, data: dict) -> None:
    instance = _prompt_server()
    if instance is None:
        return
    try:
        instance.send_sync(name, data)
    except Exception:
        pass


def progress_text(text: str, node_id) -> None:
    instance = _prompt_server()
    if instance is None or node_id is None:
        return
    try:
        instance.send_progress_text(text, node_id)
    except Exception:
        pass


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class ComfyReporter(Reporter):
    """Progress bar, live-view events and log lines on the main rank; the UI's Cancel (it raises
    inside the progress update) stops the loop before the next step and keeps what was learned.
    extra_stop / on_step: the command line's Ctrl-C flag and progress bar."""

    def __init__(self, steps: int, node_id=None, extra_stop=None, on_step=None, log_every: int = 0,
                 on_status=None):
        self.node_id, self.extra_stop, self.on_step, self.log_every = node_id, extra_stop, on_step, log_every
        self.on_status = on_status
        self.main_rank = _rank() == 0
        self.pbar = comfy.utils.ProgressBar(steps, node_id=node_id)
        self.cancel = False
        self.last_check = ""

    def should_stop(self) -> bool:
        if self.extra_stop is not None and self.extra_stop():
            return True
        return self.cancel or comfy.model_management.processing_interrupted()

    def status(self, text: str) -> None:
        if self.on_status is not None:
            self.on_status(text)
        if self.main_rank:
            progress_text(text, self.node_id)

    def step(self, step, total, loss, elapsed, eta) -> None:
        if self.on_step is not None:
            self.on_step(step, total, loss, elapsed, eta)
        if not self.main_rank:
            return
        try:
            self.pbar.update_absolute(step, total)
        except comfy.model_management.InterruptProcessingException:
            self.cancel = True
        send_event(PROGRESS_EVENT, {"node": self.node_id, "step": step, "total": total, "loss": loss,
                                    "eta_s": eta, "elapsed_s": elapsed})
        check = f"  ·  {self.last_check}" if self.last_check else ""
        progress_text(f"step {step}/{total}  loss {loss:.4g}  eta {eta:.0f}s{check}", self.node_id)
        if self.log_every and (step % self.log_every == 0 or step == total):
            log.info("step %d/%d loss %.5g eta %.0fs", step, total, loss, eta)

    def check(self, step, total, checks) -> None:
        """A held-out progress check: on the node (live view and its text) and in the console."""
        if not self.main_rank:
            return
        text = check_text(checks, total)
        self.last_check = text
        ratio = check_ratio(checks) if len(checks) > 1 else None
        send_event(CHECK_EVENT, {"node": self.node_id, "step": step, "total": total, "ratio": ratio,
                                 "loss": checks[-1].loss, "text": text})
        log.info("%s", text)


class ComfyTrainingHost:
    """A MODEL + CLIP (+ VAE for images) of ComfyUI as cfg_distill.run's host.

    trajectories (lab): DICE training points on sampling trajectories (comfy_training.TrajectoryPoints)."""

    def __init__(self, model, clip, vae=None, checkpoint: str = "", trajectories: TrajectoryPoints | None = None):
        self.model, self.clip, self.vae, self.ckpt = model, clip, vae, checkpoint
        self.trajectories = trajectories

    def folder(self, kind: str) -> str:
        return folders.default_dir() if kind == folders.FOLDER else lora_dir()

    def checkpoint(self) -> tuple[str, str]:
        return self.ckpt, checkpoint_hash(self.ckpt)

    def is_interrupt(self, error: BaseException) -> bool:
        return isinstance(error, comfy.model_management.InterruptProcessingException)

    def prepare(self, r: TrainRequest, start, reporter: Reporter):
        if r.images is not None and self.vae is None:
            raise RequestError("images were given without a VAE: connect the checkpoint's VAE to encode them")
        known: dict[str, object] = {}  # text -> its encoding: a negative that is also a prompt is encoded once
        encoded = self._encode(r.training_prompts(), "prompts", known, reporter)
        null = encode_prompts(self.clip, [""])[0]
        token_dim = null.tokens.shape[-1]
        family = family_of(self.model, token_dim)
        if r.method == "dice":
            check_distillable(self.model, family)
            negatives = self._encode(r.negative_prompts, "negative prompts", known, reporter) \
                if r.negative_prompts else None
            session = ComfyDistillHost(self.model, encoded, null, r.guidance_scale, r.batch_size,
                                       r.gradient_checkpointing, percent_range=r.percent_range, negatives=negatives,
                                       negative_share=r.negative_share_used, w_input=r.w_input(),
                                       trajectories=self.trajectories, one_level_per_batch=r.one_level_per_batch)
        else:
            session = TeEFusionLoraHost(self.model, encoded, null, r.w_min, r.w_max, r.batch_size, r.rank,
                                        float(r.rank), r.seed, gradient_checkpointing=r.gradient_checkpointing)
            session.lora_info = LoraInfo(w_min=float(r.w_min), w_max=float(r.w_max), fusion=session.fusion,
                                         rank=r.rank, alpha=float(r.rank), base_family=family)
            session.lora_student = lambda: LoraStudent(session.named_trainable(), session.predict, r.rank)
        session.family, session.token_dim = family, token_dim
        session.size = model_size(r.width, r.height, family, checkpoint_metadata(self.ckpt))
        sized = replace(r, width=session.size[0], height=session.size[1])
        session.make_data = lambda rep: self._make_data(session, sized, encoded, rep)
        session.load()
        return session

    def _encode(self, texts: list[str], what: str, known: dict, reporter: Reporter) -> list:
        """Encodings of texts, in chunks so that a long list shows its progress and a Cancel / Ctrl-C
        stops it (nothing is saved); texts in `known` are not encoded again."""
        todo = list(dict.fromkeys(t for t in texts if t not in known))
        for start in range(0, len(todo), 25):
            if reporter.should_stop():
                raise comfy.model_management.InterruptProcessingException()
            reporter.status(f"encoding {what} {start + 1}/{len(todo)}")
            chunk = todo[start:start + 25]
            known.update(zip(chunk, encode_prompts(self.clip, chunk)))
        return [known[t] for t in texts]

    def _make_data(self, session, r: TrainRequest, encoded, reporter: Reporter) -> bool:
        if not self._fill_pool(session, r, encoded, reporter):
            return False
        spec = self.trajectories
        if r.method == "dice" and spec is not None and spec.share > 0:
            reporter.status(f"sampling {spec.count} training trajectories")
            session.add_trajectory_points((r.height // 8, r.width // 8), r.seed + 7919)
        return True

    def _fill_pool(self, session, r: TrainRequest, encoded, reporter: Reporter) -> bool:
        """The x0 pool: VAE-encoded images, or one teacher sample per prompt. False when stopped."""
        if r.images is not None:
            if r.captions:
                session.prompts.extend(encode_prompts(self.clip, r.captions))
                index = list(range(len(encoded), len(encoded) + len(r.captions)))
            else:
                index = [i % len(encoded) for i in range(r.images.shape[0])]
            with torch.no_grad():
                latents = self.vae.encode(r.images[:, :, :, :3].clone())
            session.add_x0_from_images(latents, index)
            return True
        # One latent per prompt, generated once. The pool never depends on the step count, so a run
        # resumed with more steps sees exactly the data an uninterrupted run would.
        count = len(encoded)
        for i in range(count):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if reporter.should_stop():
                return False
            reporter.status(f"preparing training latents {i + 1}/{count} (teacher CFG sampling)")
            session.add_x0_from_teacher(i, (r.height // 8, r.width // 8), r.x0_steps, r.seed + i)
        return True


def train(request: TrainRequest, model, clip, vae=None, checkpoint: str = "", should_stop=None, on_step=None,
          trajectories: TrajectoryPoints | None = None, hooks=None):
    """cfg_distill.run on a MODEL / CLIP in library mode (tests, the testbed): -> Outcome."""
    from ..cfg_distill.run import run

    reporter = ComfyReporter(request.steps, None, extra_stop=should_stop, on_step=on_step)
    return run(request, ComfyTrainingHost(model, clip, vae, checkpoint, trajectories), reporter, hooks)
