"""Test-only webui extension: counts the UNet's rows per call, and can make the next call fail.

Wraps diffusion_model.forward when a model is loaded (A1111: sd_model.model.diffusion_model;
Forge: sd_model.forge_objects.unet.model.diffusion_model) and serves, over the webui's own app:
  GET  /count-unet/calls      -> {"rows": [batch rows of each UNet call since the last reset],
                                  "shapes": [[rows, channels] of x, per call]}
  POST /count-unet/reset      -> clears the record (and a pending failure)
  POST /count-unet/fail-next  -> the next UNet call raises (a generation that fails mid-sampling)
  POST /count-unet/paste      -> {"infotext", "hide_folder"} -> what the webui's paste path gives for cfg-distill's
                                  fields (the UI's paste function, run on a UI built here)
  POST /count-unet/save-in-step {"on": bool} -> while on, an on_cfg_denoiser callback that runs after
                                  cfg-distill's (this extension loads after it), i.e. just before the
                                  host reads opts.skip_early_cond, saves the settings the way the settings
                                  page does (opts.save to config.json) and records, per step, what
                                  `shared.opts.skip_early_cond` read then and what config.json got:
                                  GET /count-unet/calls -> "saves": [[read, saved or null], ...]
Never installed outside the tests.
"""
import os
import threading

from modules import script_callbacks, shared

_LOCK = threading.Lock()
RECORD = {"rows": [], "shapes": [], "fail_next": False, "saves": [], "save_in_step": False}


def _unet(sd_model):
    forge = getattr(sd_model, "forge_objects", None)
    if forge is not None:
        return forge.unet.model.diffusion_model
    return sd_model.model.diffusion_model


def _wrap(module):
    if getattr(module, "_count_unet_wrapped", False):
        return
    inner = module.forward

    def forward(x, *args, **kwargs):
        with _LOCK:
            RECORD["rows"].append(int(x.shape[0]))
            RECORD["shapes"].append([int(x.shape[0]), int(x.shape[1])])
            fail, RECORD["fail_next"] = RECORD["fail_next"], False
        if fail:
            raise RuntimeError("count-unet: failure requested by the test")
        return inner(x, *args, **kwargs)

    module.forward = forward
    module._count_unet_wrapped = True


def _on_cfg_denoiser(params):
    if not RECORD["save_in_step"]:
        return
    import json

    read = shared.opts.skip_early_cond  # what the host reads a few lines later
    shared.opts.save(shared.config_filename)
    with open(shared.config_filename, encoding="utf8") as f:
        saved = json.load(f).get("skip_early_cond")
    with _LOCK:
        RECORD["saves"].append([float(read), saved])


def _on_model_loaded(sd_model):
    _wrap(_unet(sd_model))


def _paste(infotext: str, hide_folder: str | None = None) -> dict:
    """Run the webui's real paste function (infotext_utils.connect_paste) on our script's fields.
    hide_folder: a folder moved away while the UI is built (a refiner dropdown empty at start-up)."""
    import gradio as gr
    from modules import infotext_utils, scripts

    script_cls = next(s.script_class for s in scripts.scripts_data
                      if s.script_class.__module__.endswith("cfg_distill_webui.py")
                      or getattr(s.script_class, "__name__", "") == "CfgDistillScript")
    with gr.Blocks() as demo:
        script = script_cls()
        script.is_img2img = False
        if hide_folder:
            os.rename(hide_folder, hide_folder + ".hidden")
        try:
            script.ui(False)
        finally:
            if hide_folder:
                os.rename(hide_folder + ".hidden", hide_folder)
        fields = [(c, k) for c, k in script.infotext_fields]
        text = gr.Textbox()
        button = gr.Button()
        infotext_utils.connect_paste(button, fields, text, None, "txt2img")
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    fn = next(f.fn for f in fns if getattr(f.fn, "__name__", "") == "paste_func")
    updates = fn(infotext)
    keys = [k for _, k in fields]
    out = {"paste_field_names_are_keys": all(n in keys for n in (script.paste_field_names or []))}
    for (component, key), update in zip(fields, updates):
        key = key if isinstance(key, str) else key.__name__
        out[key] = {k: v for k, v in update.items() if k in ("value", "choices")}
        if "choices" in out[key]:
            out[key]["choices"] = [c[0] if isinstance(c, (list, tuple)) else c for c in out[key]["choices"]]
        out[key]["start_value"] = component.value
    return out


def _on_app_started(demo, app):
    from fastapi import Body

    @app.get("/count-unet/calls")
    def calls():
        with _LOCK:
            return {"rows": list(RECORD["rows"]), "shapes": list(RECORD["shapes"]), "saves": list(RECORD["saves"])}

    @app.post("/count-unet/reset")
    def reset():
        with _LOCK:
            RECORD["rows"].clear()
            RECORD["shapes"].clear()
            RECORD["saves"].clear()
            RECORD["fail_next"] = False
        if shared.sd_model is not None and not isinstance(shared.sd_model, type(None)):
            try:
                _wrap(_unet(shared.sd_model))
            except AttributeError:  # Forge: not loaded yet (it loads inside the first txt2img)
                pass
        return {"ok": True}

    @app.post("/count-unet/fail-next")
    def fail_next():
        with _LOCK:
            RECORD["fail_next"] = True
        return {"ok": True}

    @app.post("/count-unet/save-in-step")
    def save_in_step(on: bool = Body(..., embed=True)):
        RECORD["save_in_step"] = bool(on)
        return {"ok": True}

    @app.post("/count-unet/paste")
    def paste(infotext: str = Body(..., embed=True), hide_folder: str = Body(None, embed=True)):
        return _paste(infotext, hide_folder)


script_callbacks.on_model_loaded(_on_model_loaded)
script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
script_callbacks.on_app_started(_on_app_started)
