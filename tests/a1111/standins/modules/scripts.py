"""modules.scripts (a1111.md "Extension layout", "Changing the conditioning").

- Script: base class; show() returning AlwaysVisible makes a script run on every generation;
  process(p, *args) gets the values of the components ui() returned (p.script_args sliced with
  args_from / args_to); infotext_fields / paste_field_names set in ui().
- ScriptRunner: calls each always-on script's hook in try/except and only REPORTS an exception
  (a failing hook never stops the generation). before_process and process run at the start of
  every generation; process_before_every_sampling(p, x=, noise=, c=, uc=) right before each
  sampling pass (twice with hires fix); postprocess only when process_images_inner returns (not
  after an exception).
- after_component(component, elem_id=...) is called for the components the tab creates.
"""
from dataclasses import dataclass

from modules import errors

AlwaysVisible = object()


@dataclass
class OnComponent:
    component: object


class Script:
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_component(self, component, **kwargs):
        pass

    def after_component(self, component, **kwargs):
        pass


class ScriptRunner:
    """Always-on scripts only; the args of each come from p.script_args[args_from:args_to]."""

    def __init__(self, scripts=()):
        self.alwayson_scripts = []
        for script in scripts:
            self.add(script)

    def add(self, script, n_args=5):
        script.alwayson = script.show(script.is_img2img) is AlwaysVisible
        start = self.alwayson_scripts[-1].args_to if self.alwayson_scripts else 0
        script.args_from, script.args_to = start, start + n_args
        self.alwayson_scripts.append(script)

    def _each(self, hook, p, *extra, **kwargs):
        for script in self.alwayson_scripts:
            try:
                args = p.script_args[script.args_from:script.args_to]
                getattr(script, hook)(p, *extra, *args, **kwargs)
            except Exception:
                errors.report(f"Error running {hook}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def postprocess_batch(self, p, images, **kwargs):
        self._each("postprocess_batch", p, images=images, **kwargs)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
