"""The ComfyUI range the pack declares (pyproject.toml's requires-comfyui, what ComfyUI-Manager and the
Registry check) is the range the CI matrix tests (tools/test.sh's stages): from the oldest tested
release to the newest tested minor line, no wider and no narrower."""
import os
import re
import tomllib

from tools.comfy_env import TREES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(text):
    return tuple(int(x) for x in text.split("."))


def ci_versions():
    with open(os.path.join(ROOT, "tools", "test.sh")) as f:
        found = set(re.findall(r"CFG_DISTILL_COMFYUI=(\d+\.\d+\.\d+)", f.read()))
    return sorted(found, key=_version)


def test_every_ci_stage_names_a_known_tree():
    versions = ci_versions()
    assert len(versions) >= 2 and set(versions) <= set(TREES), (versions, sorted(TREES))


def test_requires_comfyui_is_the_tested_range():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["tool"]["comfy"]["requires-comfyui"]
    m = re.fullmatch(r">=(\d+\.\d+\.\d+),<(\d+\.\d+)", declared.replace(" ", ""))
    assert m, f"requires-comfyui should read '>=OLDEST,<NEXT_MINOR', not {declared!r}"
    versions = ci_versions()
    oldest, newest = _version(versions[0]), _version(versions[-1])
    assert _version(m.group(1)) == oldest, f"{declared!r}: the oldest ComfyUI CI tests is {versions[0]}"
    assert _version(m.group(2)) == (newest[0], newest[1] + 1), \
        f"{declared!r}: the newest ComfyUI CI tests is {versions[-1]}, so the bound is <{newest[0]}.{newest[1] + 1}"


def test_the_torchaudio_stand_in_imports_refuses_use_and_never_shadows_a_real_package():
    """tools/torchaudio_cpu_shim.py (ComfyUI 0.33's CPU test venv): `import torchaudio` and its
    submodules work where none is installed, any use raises ImportError naming the stand-in, and an
    installed package is never replaced."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, 'tools'); import torchaudio_cpu_shim as shim\n"
        "shim.stand_in_if_missing('cfg_distill_no_such_pkg'); shim.stand_in_if_missing('json')\n"
        "import cfg_distill_no_such_pkg.functional as F\n"
        "from cfg_distill_no_such_pkg.transforms import MelScale\n"
        "class Sub(MelScale): pass\n"
        "for use in (lambda: F.resample(1, 2, 3), lambda: Sub()):\n"
        "    try: use(); raise SystemExit('no refusal')\n"
        "    except ImportError as e: assert 'stand-in' in str(e), e\n"
        "import json; assert json.dumps([1]) == '[1]' and not hasattr(json, 'CFG_DISTILL_SHIM')\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
