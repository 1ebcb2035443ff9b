"""modules.script_callbacks (a1111.md "Changing the conditioning").

- on_cfg_denoiser(fn) adds fn to a registry; every sampler step calls cfg_denoiser_callback(params)
  with a CFGDenoiserParams whose text_cond / text_uncond the denoiser reads back afterwards.
- Each callback runs inside try/except: an exception is only REPORTED, sampling goes on.
- clear_callbacks() empties the registries (the webui does it before re-importing scripts on
  "Reload UI"), after calling the script_unloaded callbacks.
"""
from modules import errors

callback_map = {"callbacks_cfg_denoiser": [], "callbacks_script_unloaded": [], "callbacks_ui_tabs": [],
                "callbacks_cfg_denoised": [], "callbacks_app_started": []}


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


def on_cfg_denoiser(callback, *, name=None):
    callback_map["callbacks_cfg_denoiser"].append(callback)


def on_script_unloaded(callback, *, name=None):
    callback_map["callbacks_script_unloaded"].append(callback)


def on_ui_tabs(callback, *, name=None):
    callback_map["callbacks_ui_tabs"].append(callback)


def on_cfg_denoised(callback, *, name=None):
    callback_map["callbacks_cfg_denoised"].append(callback)


def on_app_started(callback, *, name=None):
    callback_map["callbacks_app_started"].append(callback)


def cfg_denoised_callback(params):
    for callback in list(callback_map["callbacks_cfg_denoised"]):
        try:
            callback(params)
        except Exception:
            errors.report("Error executing callback cfg_denoised_callback", exc_info=True)


def cfg_denoiser_callback(params):
    for callback in list(callback_map["callbacks_cfg_denoiser"]):
        try:
            callback(params)
        except Exception:
            errors.report("Error executing callback cfg_denoiser_callback", exc_info=True)


def script_unloaded_callback():
    for callback in list(callback_map["callbacks_script_unloaded"]):
        try:
            callback()
        except Exception:
            errors.report("Error executing callback script_unloaded_callback", exc_info=True)


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()
