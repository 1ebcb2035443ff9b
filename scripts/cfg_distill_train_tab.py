"""A1111 / Forge "DICE Training" tab: distil CFG at scale w into a DICE refiner for the loaded checkpoint.

A thin layer over sdwebui.training: it reads the webui's objects and hands them to the
core. How it fits into the webui (a1111.md "Training from a tab"):

- script_callbacks.on_ui_tabs (Forge has no Train tab, so not on_ui_train_tabs);
- the Train button goes through modules.call_queue.wrap_gradio_gpu_call: it takes the global
  queue lock, so training never overlaps a generation, and turns an unexpected error into the
  webui's error box;
- progress through shared.state (job, job_count, job_no, textinfo); the Interrupt button sets
  shared.state.interrupted, polled before every step: training stops and saves what was learned;
- A1111: shared.sd_model.apply_model(x_t, t, cond) under devices.autocast(); Forge: the UNet patcher
  shared.sd_model.forge_objects.unet, loaded with backend.memory_management.load_model_gpu, whose
  model.apply_model(x, sigma, c_crossattn=, y=) is k-diffusion style. Forge loads models under
  inference mode, so training runs on a trainable copy of that model (wt.trainable_copy), made
  after loading and dropped after the run; generation's model is never changed. The model trained
  through is frozen for the run (its requires_grad flags are put back afterwards);
- POST /cfg-distill/train (JSON, the tab's fields + optional eval_prompts): the same training for
  headless webui users, under the same queue lock; answers with the message, losses and gap. It
  exists only when the host's API does (--api / --nowebui) and carries the host's own guards
  (--api-auth: the host's HTTP basic check), copied from the host's /sdapi/v1/options route;
- refiners are saved into the folder the generation accordion lists (--dice-refiners-dir or
  models/dice_refiners) with the training state beside them (<name>.dice-train-state) for Resume.
"""
from __future__ import annotations

import contextlib
import html
import os

from sdwebui import logic
from sdwebui import training as wt
from modules import call_queue, devices, prompt_parser, script_callbacks, shared

try:
    from modules.paths import models_path as _MODELS_PATH
except ImportError:  # pragma: no cover - very old webuis
    _MODELS_PATH = os.path.join(getattr(shared, "data_path", os.getcwd()), "models")

TAB_TITLE = "DICE Training"
TAB_ID = "cfg_distill_train"
JOB = "cfg-distill-train"


def refiner_folder() -> str:
    """The same folder the generation script lists (scripts/cfg_distill_webui.py)."""
    return logic.refiner_folder_for(getattr(shared.cmd_opts, "dice_refiners_dir", None), _MODELS_PATH)


class _Progress:
    """The running (or last) run, for the "Show progress" button."""

    def __init__(self):
        self.losses: list[float] = []
        self.text = "No training has run yet."
        self.check = ""  # the latest held-out progress check

    def reset(self):
        self.losses, self.text, self.check = [], "Starting...", ""


PROGRESS = _Progress()


# ---------------------------------------------------------------------------------------------
# The webui's model -> the core's WebuiModel


def _is_forge_model(model) -> bool:
    return getattr(model, "forge_objects", None) is not None


def _encoder(model, resolution: int):
    """Prompts -> the host's cond batch, the way the webui encodes them for generation (SDXL's size
    embeddings from the resolution; never as a negative prompt, so "" is really encoded)."""
    def encode(texts):
        batch = list(texts)
        if hasattr(prompt_parser, "SdConditioning"):
            batch = prompt_parser.SdConditioning(batch, width=resolution, height=resolution)
        with (getattr(devices, "autocast", None) or contextlib.nullcontext)():
            return model.get_learned_conditioning(batch)
    return encode


def _checkpoint(model) -> tuple[str, str]:
    """(name, short hash) of the loaded checkpoint, from sd_checkpoint_info when the webui has it."""
    info = getattr(model, "sd_checkpoint_info", None)
    if info is None:
        return "", ""
    name = getattr(info, "name", None) or getattr(info, "title", None) or ""
    short = getattr(info, "shorthash", None)
    if not short and callable(getattr(info, "calculate_shorthash", None)):
        try:
            short = info.calculate_shorthash()
        except Exception as e:  # an unreadable file only costs the metadata
            print(f"[cfg-distill] could not hash the checkpoint: {e}")
    return str(name), str(short or "")


def _in_channels(model) -> int | None:
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    return getattr(unet, "in_channels", None)


def webui_model(model, resolution: int, checkpoint: tuple[str, str] = ("", "")) -> wt.WebuiModel:
    encode = _encoder(model, resolution)
    channels = int(getattr(model, "latent_channels", None) or 4)
    in_channels = _in_channels(model)
    if getattr(model, "is_inpaint", False) or (in_channels is not None and in_channels != channels):
        raise wt.TrainTabError("this is an inpainting (or otherwise image-conditioned) checkpoint: DICE training "
                               "needs a plain text-to-image checkpoint of the same family. Train on the base "
                               "model; the refiner then also works with its inpainting variant.")
    autocast = getattr(devices, "autocast", None) or contextlib.nullcontext
    key = (id(model),) + tuple(checkpoint)  # the training-latent cache is per loaded checkpoint
    if _is_forge_model(model):
        try:
            from backend import memory_management  # Forge
        except ImportError:
            from ldm_patched.modules import model_management as memory_management  # reForge

        unet = model.forge_objects.unet
        device = getattr(unet, "load_device", None) or devices.device
        denoiser = wt.ForgeDenoiser(unet.model, device)
        freeze: list = []

        def load():
            # Forge's parameters are inference tensors: train through a copy made from the loaded
            # (LoRA-patched) weights; it lives as long as this WebuiModel, i.e. one run.
            memory_management.load_model_gpu(unet)
            denoiser.model = wt.trainable_copy(unet.model)
            freeze.append(denoiser.model)

        return wt.WebuiModel(
            denoiser=denoiser, encode=encode, freeze=freeze, latent_channels=channels, load=load,
            autocast=wt.training_autocast(device, getattr(unet.model, "computation_dtype", None)),
            host_autocast=autocast, key=key)
    device = devices.device
    weight_dtype = getattr(devices, "dtype_unet", None) or getattr(devices, "dtype", None)
    return wt.WebuiModel(
        denoiser=wt.A1111Denoiser(model, device), encode=encode, freeze=[model], latent_channels=channels,
        autocast=wt.training_autocast(device, weight_dtype), host_autocast=autocast, key=key)


# ---------------------------------------------------------------------------------------------
# The Train button


def _html(text: str, error: bool = False) -> str:
    body = "<br>".join(html.escape(line) for line in text.splitlines())
    return f"<div class='error'>{body}</div>" if error else f"<p>{body}</p>"


def train_from_tab(prompts, guidance_scale, steps, batch_size, lr, loss, resolution, seed, name, save_every,
                   resume, negative_prompts="", negative_share=wt.DEFAULT_NEGATIVE_SHARE,
                   grad_accum=wt.DEFAULT_GRAD_ACCUM, w_min=0.0, w_max=0.0):
    """The Train button (runs inside wrap_gradio_gpu_call): returns (loss image, status HTML)."""
    outcome = run_training(prompts, guidance_scale, steps, batch_size, lr, loss, resolution, seed, name,
                           save_every, resume, negative_prompts=negative_prompts, negative_share=negative_share,
                           grad_accum=grad_accum, w_min=w_min, w_max=w_max)
    return outcome.image(), _html(outcome.message, error=not outcome.ok)


def run_training(prompts, guidance_scale, steps, batch_size, lr, loss, resolution, seed, name, save_every,
                 resume, eval_prompts=None, negative_prompts="", negative_share=wt.DEFAULT_NEGATIVE_SHARE,
                 grad_accum=wt.DEFAULT_GRAD_ACCUM, w_min=0.0, w_max=0.0) -> wt.TrainOutcome:
    """One training run on the loaded checkpoint (the caller holds the queue lock)."""
    state = shared.state
    PROGRESS.reset()
    state.job = JOB
    state.job_no = 0
    state.textinfo = "Preparing DICE training..."
    try:
        request = wt.TrainRequest.from_ui(prompts, guidance_scale, steps, batch_size, lr, loss, resolution, seed,
                                          name, save_every, resume, negative_prompts, negative_share, grad_accum,
                                          w_min, w_max)
        model = _loaded_model()
        if model is None:
            raise wt.TrainTabError("no checkpoint is loaded: pick one at the top of the page first")
        checkpoint, short_hash = _checkpoint(model)
        host_model = webui_model(model, request.resolution, (checkpoint, short_hash))
    except wt.TrainTabError as e:
        PROGRESS.text = str(e)
        return wt.TrainOutcome(False, str(e))
    state.job_count = request.steps

    def on_status(text):
        state.textinfo = PROGRESS.text = text

    def on_step(step, total, loss_value, elapsed, eta):
        PROGRESS.losses.append(loss_value)
        state.job_no = step
        text = wt.progress_text(step, total, loss_value, eta)
        on_status(f"{text}\n{PROGRESS.check}" if PROGRESS.check else text)

    def on_check(text):
        PROGRESS.check = text

    print(f"[cfg-distill] training {request.settings_line()}")
    outcome = wt.train_in_webui(request, host_model, folder=refiner_folder(),
                                should_stop=lambda: bool(state.interrupted), on_step=on_step, on_status=on_status,
                                on_check=on_check, base_checkpoint=checkpoint, base_hash=short_hash,
                                eval_prompts=eval_prompts)
    PROGRESS.losses = list(outcome.losses)
    on_status(outcome.message)
    print(f"[cfg-distill] {outcome.message}")
    return outcome


def _loaded_model():
    """The selected checkpoint, loaded. Forge loads it lazily at the first generation, so a Train
    click before any image would see a placeholder; Forge's own tools (the checkpoint merger) call
    sd_models.forge_model_reload() first, and so does this. A1111 has no such step."""
    try:
        from modules import sd_models
    except ImportError:  # a host without the module has nothing to reload
        sd_models = None
    reload = getattr(sd_models, "forge_model_reload", None)
    if reload is not None:
        reload()
    return shared.sd_model


def show_progress():
    """The "Show progress" button: the loss curve so far and the latest status line."""
    return (wt.TrainOutcome(True, "", losses=list(PROGRESS.losses)).image(), _html(PROGRESS.text))


def interrupt():
    shared.state.interrupt()


# Wrapped once: the queue lock, shared.state.begin/end, and the webui's error box on the last output.
train_click = call_queue.wrap_gradio_gpu_call(train_from_tab, extra_outputs=[None])


# ---------------------------------------------------------------------------------------------
# The tab


def on_ui_tabs():
    import gradio as gr  # only the UI needs gradio (the training path is tested without it)

    n_default = len(wt.default_prompts())
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown(
            "Distil classifier-free guidance at scale **w** into a small DICE refiner for the **loaded "
            "checkpoint**: only the refiner (2-3M parameters) is trained, the model stays frozen and unchanged. "
            "Training latents come from the model itself (a few CFG sampling steps per prompt). Use the result in "
            "txt2img / img2img: *CFG distill → DICE*, with CFG scale 1 (one model pass per step).")
        with gr.Row():
            with gr.Column():
                prompts = gr.Textbox(label="Prompts (one per line)", lines=8, elem_id=f"{TAB_ID}_prompts",
                                     placeholder=f"Empty: the bundled list of {n_default} varied prompts")
                with gr.Row():
                    negative_prompts = gr.Textbox(
                        label="Negative prompts to train with (one per line; mix short ones such as 'blurry' "
                              "and full prompts)", lines=3, elem_id=f"{TAB_ID}_negatives",
                        placeholder='Empty: trained with "" only; use the refiner without a negative prompt')
                    negative_share = gr.Slider(0.0, 1.0, step=0.05, value=wt.DEFAULT_NEGATIVE_SHARE,
                                               label="Share of samples with a negative",
                                               elem_id=f"{TAB_ID}_negative_share")
                with gr.Row():
                    name = gr.Textbox(label="Refiner name", value=wt.DEFAULT_NAME, elem_id=f"{TAB_ID}_name")
                    resume = gr.Checkbox(label="Resume the saved run of this name", value=False,
                                         elem_id=f"{TAB_ID}_resume")
                with gr.Row():
                    guidance = gr.Slider(1.0, 30.0, step=0.5, value=wt.DEFAULT_GUIDANCE,
                                         label="Guidance scale w to distil (paper: 5)", elem_id=f"{TAB_ID}_w")
                    loss = gr.Radio(["l2", "l1"], value=wt.DEFAULT_LOSS, label="Loss (paper: L1 SD1.5, L2 SDXL)",
                                    elem_id=f"{TAB_ID}_loss")
                with gr.Row():
                    steps = gr.Number(value=wt.DEFAULT_STEPS, precision=0, label="Steps (with Resume: the total)",
                                      elem_id=f"{TAB_ID}_steps")
                    batch_size = gr.Slider(1, 64, step=1, value=wt.DEFAULT_BATCH, label="Batch size",
                                           elem_id=f"{TAB_ID}_batch")
                    lr = gr.Number(value=wt.DEFAULT_LR, label="Learning rate", elem_id=f"{TAB_ID}_lr")
                with gr.Row():
                    grad_accum = gr.Number(value=wt.DEFAULT_GRAD_ACCUM, precision=0,
                                           label="Gradient accumulation (effective batch = batch x this)",
                                           elem_id=f"{TAB_ID}_grad_accum")
                    w_min = gr.Number(value=0.0, label="w range: from (0 and 0: w only)", elem_id=f"{TAB_ID}_w_min")
                    w_max = gr.Number(value=0.0, label="w range: to (one refiner for every w in it)",
                                      elem_id=f"{TAB_ID}_w_max")
                with gr.Row():
                    resolution = gr.Slider(256, 2048, step=64, value=wt.DEFAULT_RESOLUTION,
                                           label="Resolution (SDXL: 1024)", elem_id=f"{TAB_ID}_resolution")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id=f"{TAB_ID}_seed")
                    save_every = gr.Number(value=wt.DEFAULT_SAVE_EVERY, precision=0,
                                           label="Save state every N steps (0: at the end)",
                                           elem_id=f"{TAB_ID}_save_every")
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id=f"{TAB_ID}_train")
                    stop = gr.Button("Interrupt (saves what was learned)", elem_id=f"{TAB_ID}_interrupt")
                    check = gr.Button("Show progress", elem_id=f"{TAB_ID}_progress")
            with gr.Column():
                plot = gr.Image(label="Loss", type="numpy", interactive=False, elem_id=f"{TAB_ID}_plot")
                status = gr.HTML(f"<p>Refiners are saved to {html.escape(refiner_folder())}</p>",
                                 elem_id=f"{TAB_ID}_status")
        inputs = [prompts, guidance, steps, batch_size, lr, loss, resolution, seed, name, save_every, resume,
                  negative_prompts, negative_share, grad_accum, w_min, w_max]
        train.click(train_click, inputs=inputs, outputs=[plot, status])
        stop.click(interrupt, inputs=[], outputs=[])
        check.click(show_progress, inputs=[], outputs=[plot, status])
    return [(tab, TAB_TITLE, TAB_ID)]


# ---------------------------------------------------------------------------------------------
# The API route (headless webuis: --api / --nowebui)

_API_FIELDS = {"prompts": "", "guidance_scale": wt.DEFAULT_GUIDANCE, "steps": wt.DEFAULT_STEPS,
               "batch_size": wt.DEFAULT_BATCH, "lr": wt.DEFAULT_LR, "loss": wt.DEFAULT_LOSS,
               "resolution": wt.DEFAULT_RESOLUTION, "seed": 0, "name": wt.DEFAULT_NAME,
               "save_every": wt.DEFAULT_SAVE_EVERY, "resume": False, "negative_prompts": "",
               "negative_share": wt.DEFAULT_NEGATIVE_SHARE, "grad_accum": wt.DEFAULT_GRAD_ACCUM, "w_min": 0.0,
               "w_max": 0.0}


def train_api(body: dict) -> dict:
    """POST /cfg-distill/train: the tab's fields as JSON (prompts: a string, one per line, or a list),
    plus eval_prompts (list) for a held-out gap. Waits for the run; 400 on a bad field."""
    unknown = set(body) - set(_API_FIELDS) - {"eval_prompts"}
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}; expected {', '.join(_API_FIELDS)}, "
                         f"eval_prompts")
    values = {k: body.get(k, default) for k, default in _API_FIELDS.items()}
    for key in ("prompts", "negative_prompts"):
        if isinstance(values[key], list):
            values[key] = "\n".join(map(str, values[key]))
    eval_prompts = [str(x) for x in body.get("eval_prompts") or []]
    with call_queue.queue_lock:
        shared.state.begin(job=JOB)
        try:
            outcome = run_training(**values, eval_prompts=eval_prompts or None)
        finally:
            shared.state.end()
    gap = outcome.gap
    return {"ok": outcome.ok, "message": outcome.message, "path": outcome.path, "step": outcome.step,
            "losses": outcome.losses, "family": outcome.family, "cancelled": outcome.cancelled,
            "gap": None if gap is None else {"refined": gap.refined, "baseline": gap.baseline,
                                             "ratio": gap.ratio, "samples": gap.samples}}


HOST_API_ROUTE = ("/sdapi/v1/options", "POST")  # the host's own settings-writing API route
ROUTE = "/cfg-distill/train"


def host_api_route(app):
    """The host's own POST /sdapi/v1/options on this app, or None when the host's API is off.

    A1111, Forge and reForge add it (with all of /sdapi/v1/*, through their Api class) only when
    their API is on (--api, or --nowebui), and with --api-auth it carries the host's own
    `Depends(Api.auth)` (HTTP basic against the host's credentials); none of them puts the gradio
    login (--gradio-auth) on its API. Any other /sdapi/v1/ path proves nothing: the built-in Lora
    extension adds /sdapi/v1/loras to the app with the API off, unguarded."""
    path, method = HOST_API_ROUTE
    for route in getattr(app, "routes", None) or []:
        if (getattr(route, "path", None) == path and method in (getattr(route, "methods", None) or ())
                and hasattr(route, "dependencies")):
            return route
    return None


def on_app_started(demo, app):
    """POST /cfg-distill/train, only where the host serves its own API, and guarded by exactly the
    dependencies (the host's auth check, with the host's credentials) that guard the host's route:
    a request the host would refuse is refused before the endpoint runs, so it starts nothing."""
    from fastapi import Body, HTTPException

    host = host_api_route(app)
    if host is None:
        print(f"[cfg-distill] the webui's API is off (start it with --api): {ROUTE} is not added")
        return
    app_level = list(getattr(getattr(app, "router", None), "dependencies", None) or [])
    guards = [d for d in host.dependencies if d not in app_level]  # the app adds its own again

    def _train(body: dict = Body(...)):
        try:
            return train_api(body)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e))

    app.add_api_route(ROUTE, _train, methods=["POST"], dependencies=guards)


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
