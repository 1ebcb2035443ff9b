"""Session fixtures: a real ComfyUI server with this pack and a tiny generated SD1.5 checkpoint."""
import json
import os
import sys

import pytest
import torch

from cfg_distill import DiceRefiner, RefinerInfo, save_refiner
from tools.comfy_env import (COMFY_DIR, FRONTEND_ROOT, SETUP_HINT, comfyui_version, frontend_version,
                              pinned_frontend)
from tools.comfy_server import ComfyServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = "tiny-sd15.safetensors"
# Torch threads of the test server. One by default: the server shares the machine with pytest, the
# browser and (in CI) other jobs, and threads competing for busy cores made steps about 10x slower.
SERVER_THREADS = int(os.environ.get("CFG_DISTILL_SERVER_THREADS", "1"))


def _random_refiner(dim, seed, family):
    torch.manual_seed(seed)
    r = DiceRefiner(dim)
    return r, RefinerInfo(dim, 512, base_family=family, guidance_scale=5.0, train_steps=0)


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory):
    if not os.path.isfile(os.path.join(COMFY_DIR, "main.py")):
        pytest.fail(f"ComfyUI is not installed at {COMFY_DIR}: run `{SETUP_HINT}`")
    if not FRONTEND_ROOT and frontend_version() != pinned_frontend():
        # The server runs with this python: it must be the venv set up for the selected tree.
        pytest.fail(f"{sys.executable} has comfyui-frontend-package {frontend_version()}, but ComfyUI "
                    f"{comfyui_version()} at {COMFY_DIR} pins {pinned_frontend()}: run the tests with that "
                    "tree's venv (.venv for 0.3.75, .venv-comfy080 for 0.8.0; see tools/test.sh)")
    from tools.tiny_models import write_tiny_sd15

    base = tmp_path_factory.mktemp("comfy")
    ckpts, refs = base / "models" / "checkpoints", base / "models" / "dice_refiners"
    ckpts.mkdir(parents=True)
    refs.mkdir(parents=True)
    write_tiny_sd15(str(ckpts / CKPT))
    save_refiner(str(refs / "sd15-random.safetensors"), *_random_refiner(768, 0, "sd15"))
    save_refiner(str(refs / "sdxl-random.safetensors"), *_random_refiner(2048, 1, "sdxl"))
    data = (refs / "sd15-random.safetensors").read_bytes()
    (refs / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    (refs / "pickled.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    return base


@pytest.fixture(scope="session")
def server(comfy_base):
    srv = ComfyServer(str(comfy_base), threads=SERVER_THREADS).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def object_info(server):
    return server.get("/object_info")


def load_workflow(name):
    with open(os.path.join(ROOT, "example_workflows", name)) as f:
        return json.load(f)


def shrink_for_tests(api, ckpt=CKPT, refiner="sd15-random.safetensors", size=64, steps=3):
    """Point an example workflow at the tiny checkpoint and a test refiner, small and fast."""
    for node in api.values():
        inp, t = node["inputs"], node["class_type"]
        if t == "CheckpointLoaderSimple":
            inp["ckpt_name"] = ckpt
        elif t == "DiceRefinerLoader":
            inp["refiner_name"] = refiner
        elif t == "EmptyLatentImage":
            inp["width"] = inp["height"] = size
        elif t == "KSampler":
            inp["steps"] = steps
    return api


def node_of(api, class_type):
    return next(k for k, v in api.items() if v["class_type"] == class_type)


def add_call_counter(api, label):
    """Wrap the sampler's MODEL with the probe pack's counter and report after sampling."""
    ks = node_of(api, "KSampler")
    api["900"] = {"class_type": "CountModelCalls", "inputs": {"model": api[ks]["inputs"]["model"], "label": label}}
    api[ks]["inputs"]["model"] = ["900", 0]
    api["901"] = {"class_type": "ReportModelCalls", "inputs": {"samples": [ks, 0], "label": label}}
    return api


def report(entry, node="901", key="model_calls"):
    return entry["outputs"][node][key][0]
