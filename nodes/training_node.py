"""The two training nodes, Train DICE Refiner and Train TeEFusion: each maps its inputs onto one
cfg_distill TrainRequest and calls cfg_distill.run with ComfyUI as the host (nodes/comfy_host.py)."""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management
import comfy.sd
import folder_paths
from comfy_api.latest import io

from ..cfg_distill.plot import loss_curve_image
from ..cfg_distill.request import OUTPUT_LABEL, RequestError, TrainRequest
from ..cfg_distill.run import Outcome, run
from ..cfg_distill.training import TrainingDiverged
from . import folders
from .comfy_host import DONE_EVENT, LORA_FOLDER, ComfyReporter, ComfyTrainingHost, checkpoint_of, send_event
from .refiner_nodes import DiceRefinerType

log = logging.getLogger("cfg_distill")
D = TrainRequest.defaults("dice")
T = TrainRequest.defaults("teefusion")
NO_START = "none (fresh refiner)"
NO_INIT = "none (fresh LoRA)"
SIZE_TIP = ("Training image size (px). 0: the model's own size: the checkpoint's modelspec.resolution, else its "
            "family's (SD1.5 512, SD2 768, SDXL / SD3 / DiTs 1024).")


def train_in_comfyui(request: TrainRequest, model, clip, vae=None, node_id=None, checkpoint: str = "",
                     label: str = "Train DICE Refiner") -> Outcome:
    """Run one request on the node's inputs; errors come back as the node's message (label: the node's
    name, which starts it), a Cancel stops the rest of the graph after saving what was learned."""
    reporter = ComfyReporter(request.steps, node_id)
    host = ComfyTrainingHost(model, clip, vae, checkpoint)
    try:
        out = run(request, host, reporter)
    except (RequestError, TrainingDiverged) as e:
        raise ValueError(f"{label}: {e}") from None
    if out.path is None:  # stopped while preparing: nothing saved
        raise comfy.model_management.InterruptProcessingException()
    if reporter.main_rank:
        send_event(DONE_EVENT, {"node": node_id, "final_loss": out.final_loss, "file": os.path.basename(out.path),
                                "cancelled": out.cancelled, "steps": out.step})
        log.info("%s saved after %d steps (final loss %.5g)%s: %s", OUTPUT_LABEL[request.method], out.step, out.final_loss,
                 " - cancelled" if out.cancelled else "", out.path)
    if out.cancelled:
        raise comfy.model_management.InterruptProcessingException()  # stop the rest of the graph
    return out


# Node inputs named otherwise than the request's fields; every other input is the field of its name.
INPUT_FIELDS = {"learning_rate": "lr", "refiner_name": "name", "lora_name": "name"}


def request_from_inputs(method: str, inputs: dict, **data) -> TrainRequest:
    """A training node's inputs as the one request (validated later, by the run)."""
    return TrainRequest(method=method, **{INPUT_FIELDS.get(k, k): v for k, v in inputs.items()}, **data)


def cls_node(cls) -> tuple[str | None, str]:
    """(node id, the checkpoint file upstream of its model input) from the node's hidden inputs."""
    node_id = str(cls.hidden.unique_id) if cls.hidden else None
    return node_id, checkpoint_of(cls.hidden.prompt if cls.hidden else None, node_id)


def loss_curve(losses) -> torch.Tensor:
    return torch.from_numpy(loss_curve_image(losses))[None]


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
                io.Float.Input("guidance_scale", default=D["guidance_scale"], min=1.0, max=30.0, step=0.1,
                               tooltip="The CFG scale w the refiner reproduces at cfg 1 (paper: 5)."),
                io.Int.Input("steps", default=D["steps"], min=1, max=1_000_000,
                             tooltip="Total optimizer steps (with resume: the target, not the extra)."),
                io.Int.Input("batch_size", default=D["batch_size"], min=1, max=512,
                             tooltip="Samples per micro-batch (sets the memory); the effective batch is "
                                     "batch_size x grad_accum. Defaults: see the README's training table."),
                io.Float.Input("learning_rate", default=D["lr"], min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW lr. 5e-4 (testbed: 5e-4 and 1e-3 alike; the paper's 2e-4 is "
                                       "for batch 128)."),
                io.Combo.Input("loss", options=["l2", "l1"], default="l2",
                               tooltip="Paper: L1 for SD1.5, L2 for SDXL (both summed per sample)."),
                io.Int.Input("width", default=D["width"], min=0, max=4096, step=8, tooltip=SIZE_TIP),
                io.Int.Input("height", default=D["height"], min=0, max=4096, step=8, tooltip=SIZE_TIP),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.String.Input("refiner_name", default=D["name"],
                                tooltip="File name in models/dice_refiners (no extension)."),
                io.Int.Input("save_every", default=D["save_every"], min=0, max=1_000_000,
                             tooltip="Checkpoint every N steps (0: only at the end and on cancel)."),
                io.Boolean.Input("resume", default=False, tooltip="Continue the saved run of this name."),
                io.Int.Input("x0_steps", default=D["x0_steps"], min=1, max=100, optional=True,
                             tooltip="Teacher sampling steps per prompt when no images are given."),
                io.Combo.Input("autocast", options=["none", "bf16", "fp16"], default="none", optional=True,
                               tooltip="Mixed precision on CUDA GPUs (ignored on CPU)."),
                io.Int.Input("grad_accum", default=D["grad_accum"], min=1, max=1024, optional=True,
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
                io.Combo.Input("lr_schedule", options=["cosine", "constant"], default=D["lr_schedule"], optional=True,
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
                io.Float.Input("negative_share", default=D["negative_share"], min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Share of samples that get a negative prompt (the rest: \"\"); used "
                                       "only with negative_prompts. Testbed: 0.5."),
                io.Combo.Input("start_from", options=[NO_START] + folders.refiner_names(), default=NO_START,
                               optional=True,
                               tooltip="Start from this refiner (made for this model family, the same width and w "
                                       "range) instead of a fresh one: a warm start, e.g. for a fine-tuned "
                                       "checkpoint. Refused with a message when it does not fit."),
            ],
            outputs=[DiceRefinerType.Output(display_name="refiner"), io.Image.Output(display_name="loss_curve")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, images=None, vae=None, start_from=NO_START, **inputs) -> io.NodeOutput:
        inputs.setdefault("grad_accum", 1)  # absent in API workflows made before it existed: as then
        request = request_from_inputs("dice", inputs, images=images, start_from="" if start_from in (None, "", NO_START)
                                      else folders.refiner_path(start_from))
        out = train_in_comfyui(request, model, clip, vae, *cls_node(cls))
        return io.NodeOutput(out.refiner, loss_curve(out.losses))


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
                io.Float.Input("w_min", default=T["w_min"], min=0.0, max=30.0, step=0.1),
                io.Float.Input("w_max", default=T["w_max"], min=0.0, max=30.0, step=0.1),
                io.Int.Input("steps", default=T["steps"], min=1, max=1_000_000,
                             tooltip="Total optimizer steps (with resume: the target, not the extra)."),
                io.Int.Input("batch_size", default=T["batch_size"], min=1, max=512),
                io.Float.Input("learning_rate", default=T["lr"], min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW; the LoRA's scale is alpha / rank = 1. Too high oscillates (the "
                                       "loss curve jumps up and down): lower it."),
                io.Int.Input("rank", default=T["rank"], min=1, max=256, tooltip="LoRA rank."),
                io.Combo.Input("loss", options=["l2", "l1"], default="l2"),
                io.Int.Input("width", default=T["width"], min=0, max=4096, step=8, tooltip=SIZE_TIP),
                io.Int.Input("height", default=T["height"], min=0, max=4096, step=8, tooltip=SIZE_TIP),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.String.Input("lora_name", default=T["name"],
                                tooltip="File name in models/loras (no extension)."),
                io.Int.Input("save_every", default=T["save_every"], min=0, max=1_000_000),
                io.Boolean.Input("resume", default=False, tooltip="Continue the saved run of this name."),
                io.Int.Input("x0_steps", default=8, min=1, max=100, optional=True,
                             tooltip="Teacher sampling steps per prompt when no images are given."),
                io.Combo.Input("autocast", options=["none", "bf16", "fp16"], default="none", optional=True),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True),
                io.Image.Input("images", optional=True, tooltip="Real images to noise."),
                io.Vae.Input("vae", optional=True, tooltip="Needed with images."),
                io.String.Input("captions", multiline=True, optional=True, default=""),
                io.Combo.Input("lr_schedule", options=["constant", "cosine"], default=T["lr_schedule"], optional=True,
                               tooltip="cosine: the learning rate falls to 0 over the run (the default: on the "
                                       "testbed 2000 x 4 x 4 at 1e-3 cosine kept 95-98% of CFG's gain at w 3-7)."),
                io.Int.Input("grad_accum", default=T["grad_accum"], min=1, max=1024, optional=True,
                             tooltip="Micro-batches per optimizer step: effective batch batch_size x grad_accum at "
                                     "the memory of batch_size. Absent (older API workflows): 1, as then."),
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
    def execute(cls, model, clip, images=None, vae=None, continue_from=NO_INIT, **inputs) -> io.NodeOutput:
        inputs.setdefault("grad_accum", 1)  # absent in API workflows made before it existed: as then
        request = request_from_inputs("teefusion", inputs, images=images, start_from="" if continue_from in
                                      (None, "", NO_INIT) else folder_paths.get_full_path_or_raise(LORA_FOLDER,
                                                                                                    continue_from))
        out = train_in_comfyui(request, model, clip, vae, *cls_node(cls), label="Train TeEFusion")
        return io.NodeOutput(*teefusion_outputs(model, out))


def teefusion_outputs(model, out: Outcome):
    """(the user's MODEL with the saved LoRA, through ComfyUI's own LoRA loading; file name; loss curve)."""
    with_lora = comfy.sd.load_lora_for_models(model, None, {k: v.float() for k, v in out.lora_tensors.items()},
                                              1.0, 0)[0]
    return with_lora, os.path.basename(out.path), loss_curve(out.losses)
