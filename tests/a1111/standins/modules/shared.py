"""modules.shared (+ modules.options.Options and modules.shared_state.State).

- opts: values live in opts.data only once set; untouched options read their default from
  data_labels, so `key in opts.data` is False for them -- which is why override_settings only
  restores keys already in opts.data (a1111.md "One pass per step at CFG 1"). Setting an option as
  an attribute goes through the same checks as the host (refused under --freeze-settings).
- skip_early_cond: fraction of steps whose negative pass A1111 skips (v1.10+; 1.0 = all).
- state: interrupted / skipped flags the denoiser checks each step; sampling_step(s). Training
  reports through job, job_count, job_no and textinfo and stops when interrupted is set (a1111.md
  "Training from a tab"); begin() (called by wrap_gradio_gpu_call under the queue lock) clears the
  flags and the job fields, end() clears job and job_count; interrupt() is what the Interrupt
  buttons call.
- cmd_opts: parsed command line, including flags extensions add in preload.py.
- sd_model: the loaded checkpoint (tests put a fake one here).
"""
import os
import tempfile
import types


class OptionInfo:
    def __init__(self, default=None, label="", infotext=None):
        self.default, self.label, self.infotext = default, label, infotext
        self.do_not_save = False


_BUILTIN = {"data", "data_labels", "typemap", "restricted_opts"}


class Options:
    def __init__(self, data_labels):
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", data_labels)

    def __setattr__(self, key, value):
        if key in _BUILTIN:
            return object.__setattr__(self, key, value)
        if key in self.data or key in self.data_labels:
            assert not cmd_opts.freeze_settings, "changing settings is disabled"
            self.data[key] = value
            return
        return object.__setattr__(self, key, value)

    def __getattr__(self, item):
        if item in _BUILTIN:
            return object.__getattribute__(self, item)
        data = object.__getattribute__(self, "data")
        if item in data:
            return data[item]
        labels = object.__getattribute__(self, "data_labels")
        if item in labels:
            return labels[item].default
        return object.__getattribute__(self, item)

    def get_default(self, key):
        info = self.data_labels.get(key)
        return None if info is None else info.default

    def set(self, key, value, is_api=False, run_callbacks=True):
        if self.data.get(key, None) == value:
            return False
        setattr(self, key, value)
        return True


class State:
    def __init__(self):
        self.interrupted = False
        self.skipped = False
        self.sampling_step = 0
        self.sampling_steps = 0
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.textinfo = None
        self.begun = 0  # how many times begin() ran (tests)

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True

    def begin(self, job="(unknown)"):
        self.begun += 1
        self.interrupted = self.skipped = False
        self.sampling_step = 0
        self.job, self.job_count, self.job_no, self.textinfo = job, -1, 0, None

    def end(self):
        self.job, self.job_count = "", 0


cmd_opts = types.SimpleNamespace(freeze_settings=False, dice_refiners_dir=None)
opts = Options({
    "skip_early_cond": OptionInfo(0.0, "Ignore negative prompt during early sampling", infotext="Skip Early CFG"),
    "s_min_uncond_all": OptionInfo(False),
    "pad_cond_uncond": OptionInfo(False),
    "pad_cond_uncond_v0": OptionInfo(False),
    "batch_cond_uncond": OptionInfo(True),
    "persistent_cond_cache": OptionInfo(True),
    "CLIP_stop_at_last_layers": OptionInfo(1),
})
state = State()
sd_model = None
data_path = os.path.join(tempfile.gettempdir(), "cfg-distill-standin-webui")
