"""The house rules: a host-free core, imports that only point downward, one loader for the pack.

    cfg_distill/      core: maths, files, the one training request and run; torch / safetensors / numpy
    nodes/            ComfyUI adapter            sdwebui/ + scripts/   A1111 / Forge adapter
    comfy_headless/   ComfyUI in library mode (the command line's trainer, the one pack loader)
    testbed/, benchmarks/, tools/, tests/   the lab and the tooling, on top
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# spec_from_file_location(NAME, os.path.join(..., "__init__.py"), ...): a package loaded by hand
LOADS_A_PACKAGE = re.compile(r'spec_from_file_location\([^()]*(?:\([^()]*)?"__init__\.py"')
HOST_MODULES = ("comfy", "comfy_api", "folder_paths", "server", "modules", "gradio", "ldm_patched", "backend")


def _python_files(folder: str):
    for base, dirs, files in os.walk(os.path.join(ROOT, folder)):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(base, name)


def _imports(path: str) -> list[tuple[str, int, bool]]:
    """(module, level, inside a function) of every import in a file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, 0, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                out.append((child.module or "", child.level, inner))
            visit(child, inner)

    visit(tree, False)
    return out


def test_importing_the_whole_core_loads_no_host():
    """Every module of cfg_distill, imported in a fresh process, loads neither ComfyUI nor a webui."""
    code = f"""
import importlib, pkgutil, sys
sys.path.insert(0, {ROOT!r})
import cfg_distill
names = [m.name for m in pkgutil.iter_modules(cfg_distill.__path__, "cfg_distill.")]
assert len(names) > 15, names
for name in names:
    importlib.import_module(name)
hosts = {HOST_MODULES!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in hosts + ("nodes", "sdwebui", "comfy_headless"))
print(len(names), loaded)
sys.exit(1 if loaded else 0)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_core_imports_only_the_core():
    """No module of cfg_distill names a host, an adapter or the lab, even inside a function; the
    command line's entry point (__main__) alone starts the ComfyUI side, when `train` runs."""
    bad = []
    for path in _python_files("cfg_distill"):
        for module, level, in_function in _imports(path):
            top = module.split(".")[0]
            if level:
                continue  # relative: inside the core
            if top in HOST_MODULES + ("nodes", "sdwebui", "scripts", "tools", "testbed", "benchmarks"):
                bad.append((os.path.relpath(path, ROOT), module))
            if top == "comfy_headless" and not (path.endswith("__main__.py") and in_function):
                bad.append((os.path.relpath(path, ROOT), module))
    assert not bad, bad


def test_adapters_and_lab_never_import_tools_or_root_scripts():
    bad = []
    for folder in ("cfg_distill", "nodes", "sdwebui", "scripts", "comfy_headless", "testbed"):
        for path in _python_files(folder):
            for module, level, _ in _imports(path):
                if level == 0 and module.split(".")[0] in ("tools", "train_dice_refiner", "train_teefusion_lora"):
                    bad.append((os.path.relpath(path, ROOT), module))
    assert not bad, bad


def test_the_webui_adapter_does_not_reach_into_comfyui_and_back():
    bad = []
    for path in _python_files("sdwebui"):
        for module, level, _ in _imports(path):
            if level == 0 and module.split(".")[0] in ("comfy", "comfy_api", "folder_paths", "nodes", "comfy_headless"):
                bad.append((os.path.relpath(path, ROOT), module))
    for path in _python_files("nodes"):
        for module, level, _ in _imports(path):
            if level == 0 and module.split(".")[0] in ("modules", "sdwebui", "scripts"):
                bad.append((os.path.relpath(path, ROOT), module))
    assert not bad, bad


def test_one_pack_loader():
    """Loading the pack as a package (spec_from_file_location on its __init__.py) happens in
    comfy_headless only; tests, benchmarks, the testbed and tools call it."""
    copies = []
    for folder in ("tests", "benchmarks", "testbed", "tools", "cfg_distill", "nodes", "sdwebui", "scripts"):
        for path in _python_files(folder):
            text = open(path, encoding="utf-8").read()
            if path != os.path.abspath(__file__) and LOADS_A_PACKAGE.search(text):
                copies.append(os.path.relpath(path, ROOT))
    assert not copies, copies
    assert LOADS_A_PACKAGE.search(open(os.path.join(ROOT, "comfy_headless", "__init__.py")).read())


def test_no_monkeypatching_of_pack_classes_in_the_lab():
    """The testbed varies the run through request options and the engine's hooks, never by
    assigning to the pack's classes or module settings."""
    bad = []
    for path in _python_files("testbed"):
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and \
                            target.value.id in ("DiceRefiner", "ComfyDistillHost", "training_node", "refiner_class",
                                                "host"):
                        bad.append((os.path.relpath(path, ROOT), node.lineno))
    assert not bad, bad
