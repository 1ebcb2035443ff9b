"""ComfyUI in library mode: find a ComfyUI, import it without its server, and load this pack as a
package. The one loader the command line, the tests, the benchmarks, the testbed and the demo use.

    comfy_dir = find_comfyui(None)      # --comfyui, $COMFYUI_DIR, custom_nodes/.., the dev tree
    import_comfy(comfy_dir, cpu=True)   # before comfy.model_management is first imported
    pack = load_pack()                  # the pack as `cfg_distill_pack` (nodes/ and cfg_distill/)
    pack_module(pack, "nodes.comfy_host")
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_MODULE = "cfg_distill_pack"
# Where tools/setup_env.sh puts the development ComfyUI (git-ignored).
DEV_TREE = os.path.join(PACK_DIR, ".comfyui", "ComfyUI")


def is_comfyui(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "main.py")) and os.path.isdir(os.path.join(path, "comfy"))


def find_comfyui(flag: str | None = None) -> str:
    """The ComfyUI folder: --comfyui, else $COMFYUI_DIR, else the folder two levels above this pack
    (installed in ComfyUI/custom_nodes/), else the checkout's development tree."""
    if flag:
        candidates = [("--comfyui", flag)]
    elif os.environ.get("COMFYUI_DIR"):
        candidates = [("COMFYUI_DIR", os.environ["COMFYUI_DIR"])]
    else:
        candidates = [("the folder two levels above this pack", os.path.dirname(os.path.dirname(PACK_DIR))),
                      ("the development tree (tools/setup_env.sh)", DEV_TREE)]
    for _source, path in candidates:
        path = os.path.abspath(os.path.expanduser(path))
        if is_comfyui(path):
            return path
    source, path = candidates[0]
    raise SystemExit(f"error: no ComfyUI at {os.path.abspath(path)} (from {source}). Install this pack in "
                     "ComfyUI/custom_nodes/, or pass --comfyui /path/to/ComfyUI (or set COMFYUI_DIR).")


def import_comfy(comfy_dir: str, cpu: bool = True, extra_configs: list[str] | tuple = ()) -> str:
    """Put ComfyUI first on sys.path and import it in library mode (CPU when asked)."""
    if not is_comfyui(comfy_dir):
        raise RuntimeError(f"ComfyUI not found at {comfy_dir}: run `bash tools/setup_env.sh` first")
    # This pack's folder has a `nodes` package, ComfyUI a `nodes.py`: ComfyUI's must win, so it goes first.
    sys.path[:] = [comfy_dir] + [p for p in sys.path if os.path.abspath(p or os.getcwd()) != comfy_dir]
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True  # must precede the first import of comfy.model_management
    own = os.path.join(comfy_dir, "extra_model_paths.yaml")
    yamls = ([own] if os.path.isfile(own) else []) + list(extra_configs)
    if yamls:
        from utils.extra_config import load_extra_path_config

        for yaml_path in yamls:
            load_extra_path_config(yaml_path)
    return comfy_dir


def load_pack(name: str = PACK_MODULE) -> ModuleType:
    """This pack as a package (as ComfyUI loads custom nodes); ComfyUI must be importable first."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(PACK_DIR, "__init__.py"),
                                                  submodule_search_locations=[PACK_DIR])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def pack_module(pack: ModuleType, dotted: str) -> ModuleType:
    """A submodule of the loaded pack, e.g. pack_module(pack, "nodes.comfy_host")."""
    full = f"{pack.__name__}.{dotted}"
    if full not in sys.modules:
        importlib.import_module(full)
    return sys.modules[full]
