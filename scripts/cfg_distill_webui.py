"""AUTOMATIC1111 / Forge adapter for cfg-distill: DICE refiners and TeEFusion at CFG 1.

A thin layer over sdwebui.logic: it reads the webui's objects and hands tensors to the
core. How it hooks in (the smallest hook that works in A1111, Forge, reForge and Forge-classic):

- ONE on_cfg_denoiser callback, registered when this file is imported. Every sampler calls it each
  step with FRESH conds; reassigning params.text_cond changes what the model sees, and p.c / p.uc
  (caches shared across runs) are never touched.
- The callback does nothing unless process() of this AlwaysVisible script put a run state on p
  for the current run (process() sets or clears it on every run, so stale state never applies).
- A1111 runs the negative pass even at CFG 1; only opts.skip_early_cond (1.0 = all steps) skips it.
  We never write that option: the host reads it as `shared.opts.skip_early_cond`, an attribute
  that Options serves from opts.data through __getattr__, which Python consults only when the
  Options object has no attribute of that name itself. So we put the value on the object itself
  (logic.OptionShadow), never into opts.data, which is all that any settings save writes: no save,
  from any thread at any time, can persist it, and the user's value is never touched. The shadow
  is up from the end of our on_cfg_denoiser callback until the host records the skip in
  p.extra_generation_params a few lines later (before the model call); on_cfg_denoised,
  postprocess and the next run's process() remove it too, should that record not come. While we
  skip, the image conditioning rows of the skipped negative are trimmed (A1111 trims x and sigma
  but not image_cond: inpainting models). The value is max(1, step / total_steps) of the host's
  denoiser: the host skips while step / total_steps <= the option, and samplers that call the model
  more often than the host counts steps (DPM adaptive) pass 1.0 within a run.
  Forge skips the pass by itself at CFG 1 but then never encodes the negative (text_uncond is
  None): we encode it ourselves when the mode needs it, with the schedule the host uses for that
  pass (the hires pass: first-pass steps plus hires steps).
- The infotext says what was sampled: the callback records, per batch, the steps the mode applied
  to, and postprocess_batch (after sampling, before the webui writes the batch's infotexts) keeps
  the mode's entries only if it applied, with "CFG distill steps" when a refusal cut it short.
  Forge batches whose AND parts Forge itself would cut or re-weight run without the mode.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from cfg_distill import ConditioningError, RefinerFileError
from sdwebui import logic
from sdwebui import students as webui_students
from modules import devices, prompt_parser, script_callbacks, scripts, shared

try:  # models/ of the webui; `paths` has been there since 2022, fall back to the data dir
    from modules.paths import models_path as _MODELS_PATH
except ImportError:  # pragma: no cover - very old webuis
    _MODELS_PATH = os.path.join(getattr(shared, "data_path", os.getcwd()), "models")

TITLE = "CFG distill (DICE / TeEFusion)"
RUN_ATTR = "_cfg_distill_run"  # the per-run state lives on p: it dies with p and copies of p
SKIP_KEY = "skip_early_cond"
HOST_SKIP_INFOTEXT = "Skip Early CFG"  # what A1111 writes into the infotext while it skips


# The extension's own bundled refiners (weights/ beside scripts/), listed after the user's folder.
BUNDLED_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")


def refiner_folder() -> str:
    """--dice-refiners-dir (see preload.py) or models/dice_refiners: ComfyUI can share it."""
    return logic.refiner_folder_for(getattr(shared.cmd_opts, "dice_refiners_dir", None), _MODELS_PATH)


STORE = logic.RefinerStore(lambda: [refiner_folder(), BUNDLED_FOLDER])
SKIP = logic.OptionShadow(SKIP_KEY, 1.0)


def _claim(extra: dict, run, applied: str | None) -> None:
    """The mode's infotext entries for what was sampled: none (applied None), all of them (""), or all
    of them with the steps it applied to."""
    for key in logic.INFOTEXT_KEYS:
        extra.pop(key, None)
    if applied is not None:
        extra.update(run.claims)
        if applied:
            extra[logic.INFO_STEPS] = applied


def _host_is_forge() -> bool:
    # Forge, reForge and Forge-classic all ship modules_forge and skip the pass at CFG 1 themselves.
    return importlib.util.find_spec("modules_forge") is not None


def _say(p, text: str, note: bool = True) -> None:
    """Console, the comments shown under the result in the UI, and (note=True) the infotext, which
    is what API users get back (the API response has no comments)."""
    print(text)
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(text)
    extra = getattr(p, "extra_generation_params", None)
    if note and isinstance(extra, dict):
        logic.add_note(extra, text.replace("[cfg-distill] ", "", 1))


def _restore_skip(token=None) -> None:
    SKIP.restore(shared.opts, token)


# ---------------------------------------------------------------------------------------------
# Per-run state and the per-step callback

class _Run:
    """What process() decided for one run of one p; read by the callback each step."""

    def __init__(self, settings: logic.Settings, transform: logic.CondTransform):
        self.settings, self.transform = settings, transform
        self.encoded: dict = {}  # (texts, negative?, size, steps, hires steps, model) -> prompt schedules
        self.failed = False
        self.want_skip = False  # A1111 at CFG 1: skip the negative pass at every step
        self.claims: dict = {}  # the mode's infotext entries, written for the images it was applied to
        self.batch_refusal: str | None = None  # why this batch runs without the mode (host changes its prompt)
        self.batch_note: str | None = None  # the note that says so, in this batch's infotexts only
        self.steps = logic.AppliedSteps()  # what this batch was sampled with

    def apply(self, params):
        denoiser = params.denoiser
        p = denoiser.p
        step = getattr(denoiser, "step", params.sampling_step)
        cond, uncond = params.text_cond, params.text_uncond
        negatives = _negatives(p)
        rows_per_image = _rows_per_image(denoiser)
        if uncond is not None:
            n_images = logic.rows_of(uncond)  # one row per image
        else:
            n_images = len(rows_per_image) if rows_per_image else len(negatives)
        owners = logic.image_of_rows(logic.rows_of(cond), n_images, rows_per_image)
        plan = logic.null_plan(self.settings, negatives, n_images)

        negative_rows = empty = None
        if "negative" in plan:  # Forge at CFG 1 never encodes the negative: do it here
            negative_rows = uncond if uncond is not None else self.encode(p, negatives, True, step)
        if "empty" in plan:
            empty = logic.take_row(self.encode(p, [""], False, step), 0)
        nulls = [logic.take_row(negative_rows, i) if kind == "negative" else empty
                 for i, kind in enumerate(plan)]
        return self.transform(cond, nulls, owners)

    def prepare(self, p, uc) -> None:
        """Encode what this pass will need before sampling starts (Forge: the text encoder is not
        swapped in between UNet steps); the callback then finds it cached."""
        negatives = _negatives(p)
        plan = logic.null_plan(self.settings, negatives, len(negatives))
        if "empty" in plan:
            self.schedules(p, [""], False)
        if "negative" in plan and uc is None:
            self.schedules(p, negatives, True)

    def encode(self, p, texts, is_negative: bool, step: int):
        """This step's rows of the host's own encoding (prompt editing included)."""
        return prompt_parser.reconstruct_cond_batch(self.schedules(p, texts, is_negative), step)

    def schedules(self, p, texts, is_negative: bool):
        """prompt_parser.get_learned_conditioning as the host calls it for this pass, once per run
        and pass: in the hires pass with the hires size and the hires step count (prompt editing and
        alternation then switch where the host's own conditioning switches)."""
        hr = bool(getattr(p, "is_hr_pass", False))
        width = (getattr(p, "hr_upscale_to_x", 0) if hr else 0) or p.width
        height = (getattr(p, "hr_upscale_to_y", 0) if hr else 0) or p.height
        steps = getattr(p, "firstpass_steps", None) or p.steps
        hires_steps = _hires_total_steps(p) if hr else None
        old_scheduling = bool(getattr(shared.opts, "use_old_scheduling", False))
        model = shared.sd_model
        key = (tuple(texts), is_negative, width, height, steps, hires_steps, old_scheduling, id(model))
        schedules = self.encoded.get(key)
        if schedules is None:
            prompts = list(texts)
            if hasattr(prompt_parser, "SdConditioning"):  # carries is_negative_prompt and size (SDXL)
                prompts = prompt_parser.SdConditioning(prompts, is_negative_prompt=is_negative,
                                                       width=width, height=height)
            with devices.autocast():
                if hires_steps is None and not old_scheduling:  # the defaults (and webuis before 1.6)
                    schedules = prompt_parser.get_learned_conditioning(model, prompts, steps)
                else:  # both passes: the host passes opts.use_old_scheduling, which changes both
                    schedules = prompt_parser.get_learned_conditioning(model, prompts, steps, hires_steps,
                                                                       old_scheduling)
            self.encoded[key] = schedules
        return schedules

    def fail(self, p, error: Exception) -> None:
        self.failed = True
        _say(p, f"[cfg-distill] {self.settings.mode} could not be applied: {error} "
                f"The rest of this generation runs without it.")


def _negatives(p) -> list[str]:
    if getattr(p, "is_hr_pass", False) and getattr(p, "hr_negative_prompts", None) is not None:
        return list(p.hr_negative_prompts)
    return list(getattr(p, "negative_prompts", None) or [])


def _hires_total_steps(p) -> int:
    """The hires pass's step count as the host gives it to the prompt schedules (calculate_hr_conds:
    hires steps or steps, times the hires sampler's steps multiplier)."""
    steps = int(getattr(p, "hr_second_pass_steps", 0) or p.steps)
    try:
        from modules import sd_samplers
        config = sd_samplers.find_sampler_config(getattr(p, "hr_sampler_name", None) or p.sampler_name)
    except (ImportError, AttributeError):
        config = None
    return config.total_steps(steps) if config is not None else steps


def _rows_per_image(denoiser) -> list[int] | None:
    """AND-subprompts per image, from the multicond batch the sampler was given (None if unreadable)."""
    try:
        return [len(entry) for entry in denoiser.sampler.sampler_extra_args["cond"].batch]
    except (AttributeError, KeyError, TypeError):
        return None


def _on_cfg_denoiser(params) -> None:
    denoiser = getattr(params, "denoiser", None)
    p = getattr(denoiser, "p", None)
    run = getattr(p, RUN_ATTR, None)
    if run is None:
        return
    hires = bool(getattr(p, "is_hr_pass", False))
    step = getattr(denoiser, "step", params.sampling_step)
    total = getattr(denoiser, "total_steps", None) or getattr(params, "total_sampling_steps", None)
    applied = False
    if not run.failed and run.batch_refusal is None:
        try:
            params.text_cond = run.apply(params)
            applied = True
        except Exception as e:  # the host would only log it, every step; say it once, clearly
            run.fail(p, e)
    run.steps.ran(hires, step, total, applied)
    if applied and run.want_skip:
        _skip_this_step(p, params)


def _skip_this_step(p, params) -> None:
    """A1111: skip this step's negative pass. The host reads opts.skip_early_cond right after the
    callbacks; _SkipRecord takes the shadow down when the host records the skip."""
    if not isinstance(p.extra_generation_params, _SkipRecord):
        p.extra_generation_params = _SkipRecord(p.extra_generation_params)
    if not SKIP.apply(shared.opts, p.extra_generation_params.token, _skip_value(params.denoiser)):
        return  # _can_skip checked the host; a host that does not read the shadow runs both passes
    uncond = params.text_uncond
    n_uncond = logic.rows_of(uncond) if uncond is not None else 0
    image_cond = params.image_cond
    # The host drops the last n_uncond rows of x and sigma but not of image_cond.
    if (n_uncond and isinstance(image_cond, torch.Tensor) and image_cond.ndim > 0
            and image_cond.shape[0] == params.x.shape[0] > n_uncond):
        params.image_cond = image_cond[:-n_uncond]


def _skip_value(denoiser) -> float:
    """The smallest skip_early_cond with which the host skips this call's negative pass: it skips
    while denoiser.step / denoiser.total_steps <= the option, and DPM adaptive (any number of model
    calls) counts step past total_steps within a run; 1.0 where the counters cannot be read."""
    try:
        return max(1.0, float(denoiser.step) / float(denoiser.total_steps))
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return 1.0


class _SkipRecord(dict):
    """p.extra_generation_params while we skip: when the host writes its "Skip Early CFG" entry (the
    moment it has read the option), the shadow comes down at once, and the entry is dropped
    (our transient 1.0 is not the user's setting: pasted back it would outlive cfg-distill)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.token = object()

    def __setitem__(self, key, value):
        if key == HOST_SKIP_INFOTEXT and SKIP.token is self.token:
            _restore_skip(self.token)
            return
        super().__setitem__(key, value)

    def __reduce__(self):  # copies and pickles are plain dicts
        return dict, (dict(self),)


def _on_cfg_denoised(params) -> None:
    _restore_skip()  # fallback: the record above did not come (never leave our value past a step)


def _on_script_unloaded() -> None:
    _restore_skip()  # "Reload UI" drops this module's state: never leave our value behind


# Registered once, at import (the webui clears callbacks before it re-imports scripts).
script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
if hasattr(script_callbacks, "on_cfg_denoised"):
    script_callbacks.on_cfg_denoised(_on_cfg_denoised)
script_callbacks.on_script_unloaded(_on_script_unloaded)


# ---------------------------------------------------------------------------------------------
# The script

class CfgDistillScript(scripts.Script):
    _cfg_slider = None

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def after_component(self, component, **kwargs):
        # The tab's CFG slider, to warn in the accordion when it is not 1.
        tab = "img2img" if self.is_img2img else "txt2img"
        if kwargs.get("elem_id") == f"{tab}_cfg_scale":
            self._cfg_slider = component

    def ui(self, is_img2img):
        import gradio as gr  # imported here: only the UI needs gradio (the hooks are tested without it)

        tab = "img2img" if is_img2img else "txt2img"
        names = STORE.names()
        with gr.Accordion(TITLE, open=False, elem_id=f"{tab}_cfg_distill"):
            gr.Markdown("One model pass per step: set **CFG scale to 1**. DICE rewrites the prompt's "
                        "tokens with a small trained refiner; TeEFusion folds the guidance into the "
                        "embedding, e + w (e - e_negative).")
            mode = gr.Radio(list(logic.MODES), value=logic.MODE_OFF, label="Mode", elem_id=f"{tab}_cfg_distill_mode")
            with gr.Column(visible=False) as dice_box:
                with gr.Row():
                    refiner = gr.Dropdown(names, value=names[0] if names else None, label="DICE refiner",
                                          elem_id=f"{tab}_cfg_distill_refiner")
                    refresh = gr.Button("\U0001f504", elem_classes=["tool"], elem_id=f"{tab}_cfg_distill_refresh")
                details = gr.Markdown(_describe(names[0]) if names else _no_refiner_text())
                strength = gr.Slider(0.0, 2.0, step=0.05, value=logic.DEFAULT_STRENGTH, label="Strength (alpha)",
                                     elem_id=f"{tab}_cfg_distill_strength")
                negative = gr.Checkbox(value=logic.DEFAULT_NEGATIVE_AS_NULL,
                                       label='Use the negative prompt as the refiner\'s null input '
                                             '(untrained, zero-shot; off or empty: the empty prompt "")',
                                       elem_id=f"{tab}_cfg_distill_negative")
            with gr.Column(visible=False) as tee_box:
                w = gr.Slider(0.0, 15.0, step=0.1, value=logic.DEFAULT_W,
                              label="w (TeEFusion; DICE refiners trained for a range of w)",
                              elem_id=f"{tab}_cfg_distill_w")
            warning = gr.Markdown("", visible=False)

        def on_mode(mode_value, *cfg):
            return (gr.update(visible=mode_value == logic.MODE_DICE),
                    gr.update(visible=mode_value in (logic.MODE_TEEFUSION, logic.MODE_DICE)),
                    _warning_update(gr, mode_value, cfg[0] if cfg else None))

        cfg_inputs = [self._cfg_slider] if self._cfg_slider is not None else []
        mode.change(on_mode, inputs=[mode, *cfg_inputs], outputs=[dice_box, tee_box, warning])
        if cfg_inputs:
            self._cfg_slider.change(lambda m, c: _warning_update(gr, m, c), inputs=[mode, *cfg_inputs],
                                    outputs=[warning])
        refresh.click(lambda current: _refresh_update(gr, current), inputs=[refiner], outputs=[refiner])
        refiner.change(lambda name: gr.update(value=_describe(name)), inputs=[refiner], outputs=[details])

        for component in (mode, refiner, strength, negative, w):
            component.do_not_save_to_config = True  # the refiner list changes; settings come from infotext
        # Paste from infotext reads each field by its key: a string is looked up in the parsed
        # infotext and converted with the component's value type; a function is called. The webui
        # matches paste_field_names ("send to txt2img / img2img") against these same keys, so the
        # functions are module-level: one object shared by both tabs' scripts.
        self.infotext_fields = [
            (mode, _paste_mode),
            (refiner, _paste_refiner),
            (strength, logic.INFO_STRENGTH),
            (negative, logic.INFO_NEGATIVE),
            (w, _paste_w),
        ]
        self.paste_field_names = [key for _, key in self.infotext_fields]
        return [mode, refiner, strength, negative, w]

    def before_process(self, p, *args):
        _restore_skip()  # a previous run that failed: its p may still be alive

    def process(self, p, mode=None, refiner=None, strength=None, negative_as_null=None, w=None, *rest):
        _restore_skip()  # hosts without before_process
        setattr(p, RUN_ATTR, None)  # stale state from an earlier run of this p never applies
        try:
            settings = logic.Settings.from_ui(mode, refiner, strength, negative_as_null, w)
        except ValueError as e:
            _say(p, f"[cfg-distill] {e}")
            return
        if not settings.active:
            return
        forge = _host_is_forge()
        problem = _sampler_problem(p, settings.mode) or logic.and_prompt_problem(_and_weights(p))
        if problem:
            _say(p, f"[cfg-distill] {problem} This image is generated without {settings.mode}.")
            return
        try:
            transform, refiner_hash = _prepare(p, settings)
        except (ConditioningError, RefinerFileError, ValueError, OSError) as e:
            _say(p, f"[cfg-distill] {e} This image is generated without {settings.mode}.")
            return

        run = _Run(settings, transform)
        setattr(p, RUN_ATTR, run)
        takes_w = bool(transform.refiner is not None and transform.refiner.info.w_input)
        # Claimed now (a run cut short still says what was asked for); postprocess_batch then
        # makes each batch's infotext say what its images were really sampled with.
        run.claims = logic.infotext_params(settings, refiner_hash, takes_w)
        p.extra_generation_params.update(run.claims)

        if settings.mode == logic.MODE_TEEFUSION:
            try:
                notes = _student_notes(p, settings.w)
            except Exception as e:  # advisory only: never stop a generation over a header we could not read
                print(f"[cfg-distill] could not check the TeEFusion student LoRAs of the prompt: {e}")
                notes = []
            for note in notes:
                _say(p, f"[cfg-distill] {note}")

        hr_cfg = getattr(p, "hr_cfg", None) if forge and getattr(p, "enable_hr", False) else None
        warning = logic.cfg_warning(settings.mode, p.cfg_scale, hr_cfg)
        if warning:
            _say(p, warning)
        elif not forge:
            run.want_skip = _can_skip(p)

    def process_batch(self, p, *args, **kwargs):
        """Before each batch: refuse a batch whose prompt the host itself would change."""
        run = getattr(p, RUN_ATTR, None)
        if run is None:
            return
        run.steps.reset()
        run.batch_refusal = None
        if run.batch_note:  # the previous batch's refusal holds for that batch only
            logic.remove_note(p.extra_generation_params, run.batch_note)
            run.batch_note = None
        if _host_is_forge():
            prompts = list(kwargs.get("prompts") or getattr(p, "prompts", None) or [])
            batches = [prompts]
            if getattr(p, "enable_hr", False) and getattr(p, "hr_prompts", None):
                batches.append(list(p.hr_prompts))
            for batch in batches:
                problem = logic.forge_and_batch_problem(_weights_of(batch))
                if problem:
                    run.batch_refusal = problem
                    run.batch_note = f"{problem} This batch is generated without {run.settings.mode}."
                    _say(p, f"[cfg-distill] {run.batch_note}")
                    break
        # What this batch is about to be sampled with (the webui writes params.txt, "read the last
        # generation's parameters", right after this hook); postprocess_batch settles it.
        _claim(p.extra_generation_params, run, None if run.failed or run.batch_refusal else "")

    def postprocess_batch(self, p, *args, **kwargs):
        """After each batch, before the webui writes its images' infotexts: claim the mode only for
        what was sampled with it (not at all when it was refused, with the steps when it applied to
        part of the run)."""
        run = getattr(p, RUN_ATTR, None)
        if run is None:
            return
        _claim(p.extra_generation_params, run, run.steps.describe())

    def process_before_every_sampling(self, p, *args, **kwargs):
        # Forge (and newer A1111) call this before each pass, the hires pass included.
        run = getattr(p, RUN_ATTR, None)
        if run is not None and not run.failed and run.batch_refusal is None:
            try:
                run.prepare(p, kwargs.get("uc"))
            except Exception as e:
                run.fail(p, e)

    def postprocess(self, p, processed, *args):
        run = getattr(p, RUN_ATTR, None)
        setattr(p, RUN_ATTR, None)
        if run is not None or SKIP.active:
            _restore_skip()


# ---------------------------------------------------------------------------------------------
# UI helpers (plain functions: the gradio events call them, the tests too)

def _no_refiner_text() -> str:
    return f"No refiner found in `{STORE.folder()}`: put DICE refiner .safetensors files there and refresh."


def _describe(name) -> str:
    if not name:
        return _no_refiner_text()
    try:
        return f"{logic.display_name(name)}: {STORE.info(name).summary()}"
    except (RefinerFileError, ValueError, OSError) as e:
        return f"Cannot use {name}: {e}"


def _refresh_update(gr, current):
    names = STORE.names()
    value = current if current in names else (names[0] if names else None)
    return gr.update(choices=names, value=value)


def _warning_update(gr, mode, cfg_scale):
    text = logic.cfg_warning(mode, cfg_scale)
    return gr.update(value=f"**{text}**" if text else "", visible=bool(text))


def _paste_mode(params) -> str:
    return logic.parse_infotext(params)["mode"]  # no key: the image was made with cfg-distill off


def _paste_w(params):
    """w from the key of the pasted mode ("DICE w", or "TeEFusion w": TeEFusion images, and DICE
    images written before DICE had its own key); no key: the slider keeps its value."""
    found = logic.parse_infotext(params)
    return found["w"] if found["has_w"] else None


def _paste_refiner(params):
    """A gr.update with the current refiner list: converting the name with the dropdown's value type
    would fail for a dropdown that was empty (value None) when the page was built."""
    found = logic.parse_infotext(params)
    if not found["refiner"] and not found["refiner_hash"]:
        return None
    import gradio as gr

    names = STORE.names()
    name = logic.resolve_refiner(found["refiner"], found["refiner_hash"], names, STORE.short_hash)
    return gr.update(choices=names, value=name) if name else gr.update(choices=names)


def _sampler_problem(p, mode: str) -> str | None:
    """reForge's CFG++ samplers (its ldm_patched k-diffusion) switch its CFG-1 shortcut off
    (disable_cfg1_optimization): their renoising step uses the negative prompt's prediction, so
    the negative pass runs at every step even at CFG 1. A1111's and Forge's DDIM CFG++ make one
    pass per step at CFG 1 (measured: tests/webui, every listed sampler)."""
    if importlib.util.find_spec("ldm_patched") is None:
        return None
    names = [getattr(p, "sampler_name", None)]
    if getattr(p, "enable_hr", False):
        names.append(getattr(p, "hr_sampler_name", None))
    for name in names:
        if isinstance(name, str) and "CFG++" in name:
            return (f"The sampler '{name}' evaluates the negative prompt at every step on this webui, even "
                    f"at CFG 1 (CFG++ renoises with its prediction), so {mode} cannot make it one model "
                    f"pass per step: pick a sampler without CFG++.")
    return None


def _and_weights(p) -> list[list[float]]:
    """The AND-subprompt weights of each prompt of this run (hires prompts included)."""
    prompts = list(getattr(p, "all_prompts", None) or [p.prompt])
    if getattr(p, "enable_hr", False) and getattr(p, "all_hr_prompts", None):
        prompts += list(p.all_hr_prompts)
    return _weights_of(list(dict.fromkeys(prompts)))


def _weights_of(prompts) -> list[list[float]]:
    """The AND-subprompt weights of each prompt, as the host's prompt parser splits them."""
    if not prompts:
        return []
    res_indexes, _, _ = prompt_parser.get_multicond_prompt_list(list(prompts))
    return [[weight for _, weight in entry] for entry in res_indexes]


def _prepare(p, settings: logic.Settings):
    """Load and check what the run needs; raises with a message that says what to do."""
    if settings.mode != logic.MODE_DICE:
        return logic.CondTransform(settings), ""
    if not settings.refiner:
        raise ConditioningError(
            f"DICE is on but no refiner is selected: put a refiner .safetensors into "
            f"{STORE.folder()} and pick it (the refresh button rescans the folder).")
    loaded = STORE.load(settings.refiner)
    model = getattr(p, "sd_model", None) or shared.sd_model
    model_dim = logic.model_token_dim(is_sd1=bool(getattr(model, "is_sd1", False)),
                                      is_sd2=bool(getattr(model, "is_sd2", False)),
                                      is_sdxl=bool(getattr(model, "is_sdxl", False)))
    logic.check_refiner_for_model(loaded.info, settings.refiner, model_dim)
    loaded.info.w_amount(settings.w)  # a refiner for a range of w: the w slider must lie in it
    return logic.CondTransform(settings, loaded), STORE.short_hash(settings.refiner)


def lora_folder() -> str:
    """The webui's LoRA folder (--lora-dir of its Lora extension, both webuis: models/Lora)."""
    return getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(_MODELS_PATH, "Lora")


def _student_notes(p, w: float) -> list[str]:
    """TeEFusion with a student LoRA loaded by the webui's own LoRA support (<lora:name:1> in the
    prompt): read each named file's header and say when the student does not fit this run."""
    if getattr(p, "disable_extra_networks", False):
        return []
    prompts = list(getattr(p, "all_prompts", None) or [getattr(p, "prompt", "") or ""])
    if getattr(p, "enable_hr", False) and getattr(p, "all_hr_prompts", None):
        prompts += list(p.all_hr_prompts)
    students = []
    for name in webui_students.lora_names(prompts):
        path = webui_students.find_lora_file(lora_folder(), name)
        student = webui_students.read_student(path, name) if path else None
        if student is not None:
            students.append(student)
    if not students:
        return []
    model = getattr(p, "sd_model", None) or shared.sd_model
    family = webui_students.model_family(is_sd1=bool(getattr(model, "is_sd1", False)),
                                         is_sd2=bool(getattr(model, "is_sd2", False)),
                                         is_sdxl=bool(getattr(model, "is_sdxl", False)))
    return webui_students.student_notes(students, w, family)


def _can_skip(p) -> bool:
    """A1111 at CFG 1: whether the negative pass can be skipped per step (skip_early_cond)."""
    if SKIP_KEY not in getattr(shared.opts, "data_labels", {SKIP_KEY: None}):
        print("[cfg-distill] this webui has no 'skip_early_cond' option (A1111 v1.10+): it runs the "
              "negative pass even at CFG 1, so the result is right but there is no speed-up.")
        return False
    if not logic.OptionShadow.reads_through(shared.opts, SKIP_KEY):
        print("[cfg-distill] this webui's options do not read 'skip_early_cond' the way A1111 1.10 does, "
              "and cfg-distill never changes your settings: it runs the negative pass even at CFG 1, so "
              "the result is right but there is no speed-up.")
        return False
    model = getattr(p, "sd_model", None) or shared.sd_model
    if getattr(model, "cond_stage_key", None) == "edit":  # instruct-pix2pix: the skip breaks its CFG
        return False
    return True


# Training tab: scripts/cfg_distill_train_tab.py (on_ui_tabs, Forge has no Train tab) writes refiners
# into the same folder (logic.refiner_folder_for); the refresh button above then lists them, and
# STORE reloads a file that training replaced (it caches by modification time and size).
