"""Loads the webui stand-ins as `modules.*` (and, for Forge, `modules_forge` and `backend`) and the
extension's scripts the way the webui does (the extension root on sys.path, each script executed
from its file), fresh for every test."""
import importlib
import importlib.util
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STANDINS = os.path.join(HERE, "standins")
FORGE_STANDINS = os.path.join(HERE, "standins_forge")
SCRIPT_PATH = os.path.join(ROOT, "scripts", "cfg_distill_webui.py")
TRAIN_TAB_PATH = os.path.join(ROOT, "scripts", "cfg_distill_train_tab.py")
MODULES = ("shared", "script_callbacks", "scripts", "processing", "prompt_parser", "errors",
           "infotext_utils", "txt2img", "paths", "devices", "call_queue")


def purge():
    for name in list(sys.modules):
        if name in ("modules", "modules_forge", "backend") or name.startswith(("modules.", "backend.")):
            del sys.modules[name]
    for path in (STANDINS, FORGE_STANDINS):
        while path in sys.path:
            sys.path.remove(path)


def load_webui(host="a1111", model=None, refiners_dir=None):
    """Fresh stand-ins (fresh opts, state, callback registry) and a freshly executed script."""
    purge()
    sys.path.insert(0, STANDINS)
    if host == "forge":
        sys.path.insert(0, FORGE_STANDINS)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # the webui puts the extension root on sys.path while loading
    importlib.invalidate_caches()
    env = types.SimpleNamespace(host=host)
    for name in MODULES:
        setattr(env, name, importlib.import_module(f"modules.{name}"))
    env.shared.sd_model = model
    env.shared.cmd_opts.dice_refiners_dir = refiners_dir
    if host == "forge":
        env.memory_management = importlib.import_module("backend.memory_management")
    # scripts/*.py are executed from their file (modules.script_loading.load_module), in file order
    env.script_module = _exec_script(SCRIPT_PATH)
    env.train_tab = _exec_script(TRAIN_TAB_PATH)
    return env


def _exec_script(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
