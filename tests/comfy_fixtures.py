"""Session fixtures: a real ComfyUI server with this pack and a tiny generated SD1.5 checkpoint, plus
tiny stock-loadable SD3.5 / Wan 2.1 / Qwen-Image model files for the DiT example workflows."""
import dataclasses
import json
import os
import sys

import pytest
import torch

from cfg_distill import DiceRefiner, RefinerInfo, save_refiner
from cfg_distill.families import FAMILIES
from tools.comfy_env import (COMFY_DIR, FRONTEND_ROOT, SETUP_HINT, comfyui_version, frontend_version,
                              pinned_frontend)
from tools.comfy_server import ComfyServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = "tiny-sd15.safetensors"
# Torch threads of the test server. One by default: the server shares the machine with pytest, the
# browser and (in CI) other jobs, and threads competing for busy cores made steps about 10x slower.
SERVER_THREADS = int(os.environ.get("CFG_DISTILL_SERVER_THREADS", "1"))
# Test-only node pack (tests/stand_in_nodes): mounted in the test server's custom_nodes, never shipped.
STAND_IN_PACK = os.path.join(ROOT, "tests", "stand_in_nodes", "cfg_distill_stand_in")
STAND_IN_LOADER = "StandInTextEncoderLoader"

# The files each example workflow runs on in the tests (names in the test server's model folders;
# written by the family_models fixture except the SD1.5 defaults). "stand_in": the workflow's
# CLIPLoader is swapped for the stand-in loader (see stand_in_text_encoders).
SD35_CKPT = "tiny-sd35.safetensors"
EXAMPLE_FILES = {
    "dice_sd35.json": dict(ckpt=SD35_CKPT, refiner="sd3-random.safetensors"),
    "teefusion_sd3_patch.json": dict(ckpt=SD35_CKPT, unet="tiny-sd35-mmdit.safetensors"),
    "dice_wan_t2v.json": dict(unet="tiny-wan21-t2v.safetensors", vae="tiny-wan21-vae.safetensors",
                              refiner="wan-random.safetensors", stand_in=True, length=5),
    # Wan 2.2 A14B's two experts have Wan 2.1 14B's architecture: two tiny Wan T2V files (two seeds).
    "dice_wan22_t2v.json": dict(unet={"wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": "tiny-wan22-t2v-high.safetensors",
                                      "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": "tiny-wan22-t2v-low.safetensors"},
                                vae="tiny-wan21-vae.safetensors", refiner="wan-random.safetensors", stand_in=True,
                                length=5),
    "dice_qwen_image.json": dict(unet="tiny-qwen-image.safetensors", vae="tiny-wan21-vae.safetensors",
                                 refiner="qwen-image-random.safetensors", stand_in=True),
}
FAMILY_FILES = {  # file -> (model folder, tools.tiny_family_files kind)
    SD35_CKPT: ("checkpoints", "sd35"),
    "tiny-sd35-mmdit.safetensors": ("diffusion_models", "sd35_mmdit"),
    "tiny-wan21-t2v.safetensors": ("diffusion_models", "wan21_t2v"),
    "tiny-wan22-t2v-high.safetensors": ("diffusion_models", "wan21_t2v"),
    "tiny-wan22-t2v-low.safetensors": ("diffusion_models", "wan21_t2v"),
    "tiny-qwen-image.safetensors": ("diffusion_models", "qwen_image"),
    "tiny-wan21-vae.safetensors": ("vae", "wan21_vae"),
}
FAMILY_REFINERS = {"sd3-random.safetensors": (4096, "sd3"), "wan-random.safetensors": (4096, "wan"),
                   "qwen-image-random.safetensors": (3584, "qwen_image")}


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
                    "tree's venv (.venv for 0.3.75, .venv-comfy080 for 0.8.0, .venv-comfy033 for 0.33.0; see tools/test.sh)")
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
def family_models(comfy_base):
    """The DiT families' tiny model files and random refiners (~1 GB, ~15 s: Qwen-Image's smallest
    stock-detectable model is one full-width block), written only for the tests that run them."""
    from tools.tiny_family_files import write

    for i, (name, (folder, kind)) in enumerate(FAMILY_FILES.items()):
        (comfy_base / "models" / folder).mkdir(parents=True, exist_ok=True)
        write(kind, str(comfy_base / "models" / folder / name), seed=i)
    for i, (name, (dim, family)) in enumerate(FAMILY_REFINERS.items()):
        refiner, info = _random_refiner(dim, 10 + i, family)
        # as the trainer writes it: the family's start-token rule (Wan, Qwen-Image: none to keep)
        info = dataclasses.replace(info, keep_first_token=FAMILIES[family].keep_first_token)
        save_refiner(str(comfy_base / "models" / "dice_refiners" / name), refiner, info)
    yield comfy_base
    for name, (folder, _) in FAMILY_FILES.items():  # ~1 GB: not left in pytest's kept temp folders
        (comfy_base / "models" / folder / name).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def server(comfy_base):
    srv = ComfyServer(str(comfy_base), threads=SERVER_THREADS,
                      extra_packs={"cfg_distill_stand_in": STAND_IN_PACK}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def object_info(server):
    return server.get("/object_info")


def load_workflow(name):
    with open(os.path.join(ROOT, "example_workflows", name)) as f:
        return json.load(f)


def shrink_for_tests(api, ckpt=CKPT, refiner="sd15-random.safetensors", size=64, steps=3, example=None):
    """Point an example workflow at the tiny models and a test refiner (EXAMPLE_FILES[example] where
    the workflow has its own), small and fast."""
    files = {"ckpt": ckpt, "refiner": refiner, **EXAMPLE_FILES.get(example, {})}
    for node in api.values():
        inp, t = node["inputs"], node["class_type"]
        if t == "CheckpointLoaderSimple":
            inp["ckpt_name"] = files["ckpt"]
        elif t == "UNETLoader":  # one file, or one per original name (Wan 2.2's two experts)
            unet = files["unet"]
            inp["unet_name"] = unet[inp["unet_name"]] if isinstance(unet, dict) else unet
        elif t == "VAELoader":
            inp["vae_name"] = files["vae"]
        elif t == "DiceRefinerLoader":
            inp["refiner_name"] = files["refiner"]
        elif t in ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo"):
            inp["width"] = inp["height"] = size
            if "length" in inp:
                inp["length"] = files.get("length", 1)
        elif t == "KSampler":
            inp["steps"] = steps
        elif t == "KSamplerAdvanced":  # keep where the steps are split (Wan 2.2: high / low noise)
            old = inp["steps"]
            inp["steps"] = steps
            inp["start_at_step"] = min(round(inp["start_at_step"] * steps / old), steps)
            if inp["end_at_step"] <= old:
                inp["end_at_step"] = min(round(inp["end_at_step"] * steps / old), steps)
    return api


def stand_in_text_encoders(api):
    """Swap each stock CLIPLoader for the test-only stand-in (same clip_name and type): UMT5-XXL and
    Qwen2.5-VL 7B have hard-coded multi-billion-parameter configs that cannot run here (see
    tests/stand_in_nodes). Every other node of the workflow stays stock."""
    swapped = 0
    for node in api.values():
        if node["class_type"] == "CLIPLoader":
            node["class_type"] = STAND_IN_LOADER
            node["inputs"] = {"clip_name": node["inputs"]["clip_name"], "type": node["inputs"]["type"]}
            swapped += 1
    return swapped


def node_of(api, class_type):
    return next(k for k, v in api.items() if v["class_type"] == class_type)


def add_call_counter(api, label):
    """Wrap the sampler's MODEL with the probe pack's counter and report after sampling."""
    ks = node_of(api, "KSampler")
    api["900"] = {"class_type": "CountModelCalls", "inputs": {"model": api[ks]["inputs"]["model"], "label": label}}
    api[ks]["inputs"]["model"] = ["900", 0]
    api["901"] = {"class_type": "ReportModelCalls", "inputs": {"samples": [ks, 0], "label": label}}
    return api


SAMPLERS = ("KSampler", "KSamplerAdvanced")


def add_call_counters(api, label):
    """add_call_counter for every sampler of the workflow (Wan 2.2 has two); returns the report nodes."""
    reports = []
    for i, (nid, node) in enumerate([(k, v) for k, v in api.items() if v["class_type"] in SAMPLERS]):
        count, rep_ = str(910 + 2 * i), str(911 + 2 * i)
        api[count] = {"class_type": "CountModelCalls", "inputs": {"model": node["inputs"]["model"], "label": f"{label}/{i}"}}
        node["inputs"]["model"] = [count, 0]
        api[rep_] = {"class_type": "ReportModelCalls", "inputs": {"samples": [nid, 0], "label": f"{label}/{i}"}}
        reports.append(rep_)
    return reports


def report(entry, node="901", key="model_calls"):
    return entry["outputs"][node][key][0]
