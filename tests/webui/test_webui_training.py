"""The DICE Training tab's training function on the real loaded model of A1111 and Forge, driven
through the extension's own API route POST /cfg-distill/train (the tab's Train button calls the
same run_training under the same queue lock)."""
from __future__ import annotations

import os

import pytest

from webui_server import image_array

pytestmark = pytest.mark.webui

TRAIN = ["a red circle on a blue background", "a green square on a white background",
         "a yellow triangle on a black background", "a blue circle on a red background",
         "a white square on a green background", "a black triangle on a yellow background"]
HELD_OUT = ["a red square on a green background", "a yellow circle on a white background"]


def test_training_lowers_the_held_out_gap_and_leaves_the_model_alone(webui):
    before, _ = webui.generate(None, seed=5)
    r = webui.post("/cfg-distill/train", {
        "prompts": TRAIN, "eval_prompts": HELD_OUT, "guidance_scale": 5.0, "steps": 40, "batch_size": 4,
        "lr": 1e-3, "loss": "l2", "resolution": 64, "seed": 0, "name": f"trained_{webui.name}",
        "save_every": 0}).json()
    assert r["ok"], r["message"]
    assert r["step"] == 40 and len(r["losses"]) == 40
    gap = r["gap"]
    print(f"\n[webui] {webui.name} training: held-out gap refined {gap['refined']:.4g} vs cfg 1 "
          f"{gap['baseline']:.4g} (ratio {gap['ratio']:.3f})")
    assert gap["ratio"] < 0.9, gap
    assert os.path.isfile(r["path"])
    # Generation's model is untouched: the same image as before, and the new refiner is usable.
    after, _ = webui.generate(None, seed=5)
    assert (image_array(after["images"][0]) == image_array(before["images"][0])).all()
    out, calls = webui.generate("DICE", refiner=f"trained_{webui.name}.safetensors")
    assert calls["rows"] == [1] * 4 and f"DICE refiner: trained_{webui.name}" in out["info_dict"]["infotexts"][0]


def test_training_with_negative_prompts_records_that_the_refiner_supports_them(webui):
    from cfg_distill import read_refiner_info

    r = webui.post("/cfg-distill/train", {
        "prompts": TRAIN[:2], "negative_prompts": ["blurry", "a red circle on a blue background"],
        "negative_share": 0.5, "steps": 4, "batch_size": 2, "resolution": 64, "seed": 0,
        "name": f"negs_{webui.name}", "save_every": 0}).json()
    assert r["ok"], r["message"]
    assert read_refiner_info(r["path"]).negatives
    out, calls = webui.generate("DICE", refiner=f"negs_{webui.name}.safetensors", negative_prompt="blurry")
    assert calls["rows"] == [1] * 4


def test_training_route_refuses_bad_fields(webui):
    r = webui.post("/cfg-distill/train", {"steps": 5, "colour": "red"}, ok=False)
    assert r.status_code == 400 and "colour" in r.text
    r = webui.post("/cfg-distill/train", {"steps": 5, "resolution": 100, "name": "x"}).json()
    assert not r["ok"] and "multiple of 8" in r["message"]
