"""Real AUTOMATIC1111 1.10.1, Forge and reForge servers (API mode, CPU, offline) with cfg-distill installed.

tools/setup_webuis.sh builds them into .webuis/ (tools/test.sh runs it). One server per webui per
test session, started on first use with a fresh data folder:
  data/extensions/cfg-distill -> this checkout (the extension under test, linked)
  data/extensions/count-unet  -> tests/webui/count_unet_ext (test-only: counts UNet rows per call)
  shared-models/Stable-diffusion/tiny(.safetensors|.yaml), tiny-inpainting(...)  (--ckpt-dir, both)
  data/models/VAE-taesd -> shared-models/VAE-taesd (taesd_{decoder,encoder}.pth)
  data/models/dice_refiners/*.safetensors
  data/models/Lora -> shared-models/Lora (TeEFusion student LoRAs; its merged reference checkpoint is
                      shared-models/Stable-diffusion/tiny-teefusion-merged)
Settings that make tiny random models work: TAESD decode / encode (the checkpoint's VAE is a
TAESD), and emphasis "No norm" (the default turns the empty prompt into NaN with a random text
encoder).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WEBUIS = os.path.join(ROOT, ".webuis")
SCRIPT_KEY = "cfg distill (dice / teefusion)"  # the script's title, lower-case (alwayson_scripts)
STAMP = ".cfg_distill_webui_v1"

HOSTS = {
    "a1111": dict(app="a1111/stable-diffusion-webui", flags=[
        "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--precision", "full",
        # Its restricted unpickler refuses torch 2.13's zip layout (extra records); the only .pth
        # files here are the TAESD tensors this test wrote a moment ago.
        "--disable-safe-unpickle"]),
    "forge": dict(app="forge/stable-diffusion-webui-forge", flags=["--always-cpu"]),
    # reForge (Panchovix, 2026-03): the Forge-style ldm_patched backend on A1111's front end.
    "reforge": dict(app="reforge/stable-diffusion-webui-reForge", flags=["--always-cpu", "--skip-torch-cuda-test"]),
}
NAMES = list(HOSTS)
COMMON_FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-version-check", "--api",
                "--nowebui", "--server-name", "127.0.0.1", "--no-download-sd-model"]
START_TIMEOUT = float(os.environ.get("CFG_DISTILL_WEBUI_START_TIMEOUT", "400"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shared_models(tmp_root: str, name: str) -> str:
    """Checkpoints (+ yaml), TAESD files and student LoRAs, written once per session for both webuis."""
    shared = os.path.join(tmp_root, "shared-models")
    if os.path.isdir(shared):
        return shared
    configs = os.path.join(WEBUIS, HOSTS["a1111"]["app"], "configs")  # the ldm v1 yamls
    if not os.path.isdir(configs):
        configs = os.path.join(WEBUIS, HOSTS[name]["app"], "configs")
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]);"
        "from tests.webui import webui_models as m;"
        "c = os.path.join(sys.argv[2], 'Stable-diffusion'); os.makedirs(c);"
        "t = m.write_checkpoint(os.path.join(c, 'tiny.safetensors'), sys.argv[3]);"
        "m.write_checkpoint(os.path.join(c, 'tiny-inpainting.safetensors'), sys.argv[3], seed=3, inpainting=True);"
        "m.write_taesd(t, os.path.join(sys.argv[2], 'VAE-taesd'));"
        "m.write_students(c, os.path.join(sys.argv[2], 'Lora'))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    partial = shared + ".partial"
    subprocess.run([sys.executable, "-c", code, ROOT, partial, configs], check=True, env=env, cwd=ROOT)
    os.rename(partial, shared)
    return shared


def _make_data(name: str, data: str, shared: str) -> None:
    models = os.path.join(data, "models")
    os.makedirs(models, exist_ok=True)
    os.symlink(os.path.join(shared, "VAE-taesd"), os.path.join(models, "VAE-taesd"))
    os.symlink(os.path.join(shared, "Lora"), os.path.join(models, "Lora"))  # the webui's default --lora-dir
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.webui import webui_models as m;"
            "m.write_refiners(sys.argv[2])")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    subprocess.run([sys.executable, "-c", code, ROOT, os.path.join(models, "dice_refiners")], check=True,
                   env=env, cwd=ROOT)
    ext = os.path.join(data, "extensions")
    os.makedirs(ext, exist_ok=True)
    os.symlink(ROOT, os.path.join(ext, "cfg-distill"))
    os.symlink(os.path.join(HERE, "count_unet_ext"), os.path.join(ext, "count-unet"))
    config = {"sd_model_checkpoint": "tiny.safetensors", "sd_vae_decode_method": "TAESD",
              "sd_vae_encode_method": "TAESD", "samples_save": False, "grid_save": False,
              "save_images_add_number": False, "live_previews_enable": False,
              # A random text encoder: "Original" emphasis rescales by a mean that can be ~0 (NaN).
              "emphasis": "No norm"}
    with open(os.path.join(data, "config.json"), "w") as f:
        json.dump(config, f)


class Webui:
    """A running webui server: HTTP helpers for the tests."""

    def __init__(self, name, url, data, proc, log):
        self.name, self.url, self.data, self.proc, self.log = name, url, data, proc, log

    @property
    def forge(self) -> bool:
        """Forge or reForge: their backend skips the negative pass at CFG 1 by itself."""
        return self.name in ("forge", "reforge")

    def get(self, path, **kw):
        r = requests.get(self.url + path, timeout=600, **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path, payload=None, ok=True):
        r = requests.post(self.url + path, json=payload or {}, timeout=600)
        if ok and r.status_code != 200:
            raise AssertionError(f"{path} -> HTTP {r.status_code}: {r.text[:2000]}\n--- server log ---\n{self.tail()}")
        return r

    def tail(self, n=60) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def options(self) -> dict:
        return self.get("/sdapi/v1/options")

    def saved_config(self) -> dict:
        with open(os.path.join(self.data, "config.json")) as f:
            return json.load(f)

    def generate(self, mode=None, refiner="tiny_sd15.safetensors", strength=1.0, negative_as_null=True, w=2.0,
                 img2img=False, **fields):
        """txt2img / img2img; returns (response json, UNet rows of each call of this request)."""
        payload = dict(prompt="a red circle on a blue background", negative_prompt="", steps=4, cfg_scale=1.0,
                       width=64, height=64, seed=1, sampler_name="Euler", send_images=True, save_images=False)
        payload.update(fields)
        if mode is not None:
            payload.setdefault("alwayson_scripts", {})[SCRIPT_KEY] = {
                "args": [mode, refiner, strength, negative_as_null, w]}
        self.post("/count-unet/reset")
        r = self.post("/sdapi/v1/img2img" if img2img else "/sdapi/v1/txt2img", payload)
        calls = self.get("/count-unet/calls")
        out = r.json()
        out["info_dict"] = json.loads(out["info"])
        return out, calls


def _start(name: str, tmp_root: str, variant: str = "", add_flags=(), drop_flags=()) -> Webui:
    """Start webui `name` on a fresh data folder. A variant (its own data folder and log) starts
    with COMMON_FLAGS less drop_flags plus add_flags, e.g. --api-auth, or the UI without --api."""
    base = os.path.join(WEBUIS, name)
    app = os.path.join(WEBUIS, HOSTS[name]["app"])
    python = os.path.join(base, "venv", "bin", "python")
    if not os.path.exists(os.path.join(base, "venv", STAMP)):
        pytest.skip(f"{name} is not set up here: run `bash tools/setup_webuis.sh {name}` "
                    f"(tools/test.sh does it)")
    data = os.path.join(tmp_root, name + (f"-{variant}" if variant else ""))
    os.makedirs(data)
    shared = _shared_models(tmp_root, name)
    _make_data(name, data, shared)
    port = _free_port()
    log = os.path.join(ROOT, "test-artifacts",  # kept after the run (git-ignored)
                       f"webui-{name}{'-' + variant if variant else ''}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HF_HOME=os.path.join(WEBUIS, "hf-cache"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TORCH_NUM_THREADS="1", PYTHONUNBUFFERED="1", COMMANDLINE_ARGS="")
    env.pop("PYTHONPATH", None)
    flags = [f for f in COMMON_FLAGS if f not in drop_flags] + list(add_flags)
    cmd = ["nice", "-n", "10", python, "launch.py", *flags, *HOSTS[name]["flags"],
           "--port", str(port), "--data-dir", data,
           "--ckpt-dir", os.path.join(shared, "Stable-diffusion")]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=app, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    ui = Webui(name, f"http://127.0.0.1:{port}", data, proc, log)
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{ui.tail()}")
        try:
            if requests.get(ui.url + "/count-unet/calls", timeout=5).status_code == 200:
                return ui
        except requests.RequestException:
            pass
        time.sleep(2)
    proc.kill()
    raise RuntimeError(f"{name} did not start within {START_TIMEOUT:.0f} s:\n{ui.tail()}")


def stop(ui: Webui) -> None:
    ui.proc.terminate()
    try:
        ui.proc.wait(60)
    except subprocess.TimeoutExpired:
        ui.proc.kill()
        ui.proc.wait(30)


_SERVERS: dict[str, Webui] = {}


@pytest.fixture(scope="session")
def webui_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("webuis"))
    yield root
    for ui in _SERVERS.values():
        ui.proc.terminate()
        try:
            ui.proc.wait(30)
        except subprocess.TimeoutExpired:
            ui.proc.kill()
    _SERVERS.clear()
    shutil.rmtree(root, ignore_errors=True)  # ~600 MB of checkpoints: not kept in pytest's basetemp


@pytest.fixture(scope="session", params=NAMES)
def webui(request, webui_root):
    """The real webui server (one per webui per session; the a1111 tests run first, then forge,
    then reforge)."""
    name = request.param
    if name not in _SERVERS:
        for other in list(_SERVERS):  # one server at a time keeps the 2-core machine usable
            ui = _SERVERS.pop(other)
            ui.proc.terminate()
            ui.proc.wait(60)
        t0 = time.time()
        _SERVERS[name] = _start(name, webui_root)
        print(f"\n[webui] {name} started in {time.time() - t0:.1f} s")
    return _SERVERS[name]


def png_bytes(b64: str) -> bytes:
    return base64.b64decode(b64.split(",", 1)[-1])


def image_array(b64: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png_bytes(b64))).convert("RGB"), dtype=np.int16)
