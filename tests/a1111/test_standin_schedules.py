"""The stand-in prompt parser's schedules against the REAL ones of A1111 1.10.1 and Forge.

The in-process tests of the hires pass (test_webui_script.py) rely on the stand-in giving the same
prompt-editing schedule as the hosts, in the first pass and in the hires pass (the host calls the
parser with the first pass's steps and the hires steps). This runs each host's own
modules/prompt_parser.py, unmodified, in its own venv (.webuis/, tools/setup_webuis.sh) and compares.
"""
import json
import os
import subprocess

import pytest

from webui_env import ROOT, load_webui, purge

WEBUIS = os.path.join(ROOT, ".webuis")
APPS = {"a1111": "a1111/stable-diffusion-webui", "forge": "forge/stable-diffusion-webui-forge"}
CASES = [  # (prompt, first-pass steps, hires steps or None, old scheduling)
    ("[blurry:ugly:0.5]", 4, None, False),
    ("[blurry:ugly:0.5]", 4, 3, False),
    ("[blurry:ugly:0.5]", 4, 3, True),
    ("[blurry:ugly:1.5]", 4, 4, False),
    ("[blurry:ugly:5]", 4, 3, False),
    ("a [red:blue:2] fox", 6, None, False),
    ("a [red:blue:2] fox", 6, 4, False),
    ("plain", 4, 2, False),
    ("[blurry:ugly:1.0]", 4, None, False),
    ("[blurry:ugly:1.0]", 4, None, True),
    ("[blurry:ugly:0.25]", 4, None, True),
]


def _real(host):
    python = os.path.join(WEBUIS, host, "venv", "bin", "python")
    app = os.path.join(WEBUIS, APPS[host])
    if not (os.path.exists(python) and os.path.isdir(app)):
        pytest.skip(f"{host} is not set up here: run `bash tools/setup_webuis.sh {host}`")
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]);"
            "from modules.prompt_parser import get_learned_conditioning_prompt_schedules as g;"
            "print(json.dumps([g([p], s, h, o)[0] for p, s, h, o in json.loads(sys.argv[2])]))")
    out = subprocess.run([python, "-c", code, app, json.dumps(CASES)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), timeout=120)
    return json.loads(out.stdout)


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_standin_schedules_match_the_hosts_real_parser(host):
    real = _real(host)
    env = load_webui(host)
    try:
        ours = [env.prompt_parser.get_learned_conditioning_prompt_schedules([p], s, h, o)[0] for p, s, h, o in CASES]
    finally:
        purge()
    assert [[list(x) for x in sched] for sched in ours] == real
