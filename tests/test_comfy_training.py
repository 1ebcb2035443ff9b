"""The Train DICE Refiner node through the real ComfyUI server on the tiny SD1.5 checkpoint."""
import re

import pytest
import torch

from cfg_distill import load_refiner, load_training_state
from tools.comfy_server import execution_error, succeeded

from comfy_fixtures import CKPT

pytestmark = pytest.mark.server
TRAIN = "a red fox in the snow\na blue car on a bridge\na bowl of fruit\na castle at night\na cat on a sofa\n" \
        "a lighthouse in a storm"
HELD_OUT = "a green boat on a lake\na dog in a park\na tower in the fog"


def _graph(**train):
    settings = dict(prompts=TRAIN, guidance_scale=5.0, steps=40, batch_size=2, learning_rate=1e-3, loss="l2",
                    width=64, height=64, seed=0, refiner_name="t", save_every=0, resume=False, x0_steps=4,
                    lr_schedule="constant")  # these tests were tuned under a constant rate; the default is below
    settings.update(train)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "10": {"class_type": "TrainDiceRefiner", "inputs": {"model": ["1", 0], "clip": ["1", 1], **settings}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 1]}},
    }


def _evaluate(graph, refiner_src):
    graph["21"] = {"class_type": "EvaluateDiceRefiner",
                   "inputs": {"model": ["1", 0], "clip": ["1", 1], "refiner": refiner_src, "prompts": HELD_OUT,
                              "guidance_scale": 5.0, "batches": 3, "batch_size": 2, "width": 64, "height": 64,
                              "seed": 99}}
    return graph


def _gap(entry, node="21"):
    return entry["outputs"][node]["gap"][0]


def _sample_graph():
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house by a river", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "900": {"class_type": "CountModelCalls", "inputs": {"model": ["1", 0], "label": "same-model"}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["900", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 3, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "901": {"class_type": "ReportModelCalls", "inputs": {"samples": ["5", 0], "label": "same-model"}},
    }


def test_training_learns_cfg_direction_on_held_out_data_and_leaves_model_untouched(server, comfy_base):
    before = server.run(_sample_graph())
    assert succeeded(before), execution_error(before)

    entry = server.run(_evaluate(_graph(refiner_name="learned"), ["10", 0]))
    assert succeeded(entry), execution_error(entry)
    trained = _gap(entry)
    assert trained["refined"] < 0.7 * trained["baseline"], trained  # clearly closer to CFG than cfg 1
    assert entry["outputs"]["11"]["images"]  # the loss curve image

    path = comfy_base / "models" / "dice_refiners" / "learned.safetensors"
    info = load_refiner(str(path)).info
    assert (info.base_family, info.train_steps, info.guidance_scale) == ("sd15", 40, 5.0)
    assert info.base_checkpoint == CKPT and len(info.base_hash) == 10

    # The saved file, through the loader node, reproduces the same gap reduction.
    reload = _evaluate({"1": _graph()["1"], "20": {"class_type": "DiceRefinerLoader",
                                                     "inputs": {"refiner_name": "learned.safetensors"}}}, ["20", 0])
    again = server.run(reload)
    assert succeeded(again), execution_error(again)
    assert abs(_gap(again)["refined"] - trained["refined"]) <= 1e-4 * trained["baseline"]

    after = server.run(_sample_graph())
    assert succeeded(after), execution_error(after)
    sha = lambda e: e["outputs"]["901"]["model_calls"][0]["latent_sha256"]  # noqa: E731
    assert sha(after) == sha(before), "the shared MODEL changed after training"


def test_resume_continues_and_matches_uninterrupted(server, comfy_base):
    folder = comfy_base / "models" / "dice_refiners"
    full = server.run(_graph(refiner_name="full", steps=8))
    assert succeeded(full), execution_error(full)
    first = server.run(_graph(refiner_name="split", steps=4))
    assert succeeded(first), execution_error(first)
    assert load_training_state(str(folder / "split.dice-train-state")).step == 4
    second = server.run(_graph(refiner_name="split", steps=8, resume=True))
    assert succeeded(second), execution_error(second)
    a, b = load_refiner(str(folder / "full.safetensors")), load_refiner(str(folder / "split.safetensors"))
    assert b.info.train_steps == 8
    for k, v in a.module.state_dict().items():
        assert (v - b.module.state_dict()[k]).abs().max() <= 1e-6, k

    # The cosine schedule, the node's default (the input left out, as an API prompt may), reaches the
    # loop: recorded in the state, and a different refiner.
    cos_graph = _graph(refiner_name="cosine", steps=8)
    del cos_graph["10"]["inputs"]["lr_schedule"]
    cos = server.run(cos_graph)
    assert succeeded(cos), execution_error(cos)
    assert load_training_state(str(folder / "cosine.dice-train-state")).config["lr_schedule"] == "cosine"
    c = load_refiner(str(folder / "cosine.safetensors")).module.state_dict()
    assert max((v - c[k]).abs().max() for k, v in a.module.state_dict().items()) > 1e-6

    # w_min / w_max: one refiner for a range of w, recorded in its file.
    wr = server.run(_graph(refiner_name="w-range", steps=2, w_min=3.0, w_max=7.0))
    assert succeeded(wr), execution_error(wr)
    assert load_refiner(str(folder / "w-range.safetensors")).info.w_input["range"] == [3.0, 7.0]
    assert not load_refiner(str(folder / "w-range.safetensors")).info.negatives

    # negative_prompts: trained with them (the default share 0.5 left out, as an API prompt may), recorded
    # in the file so that the Apply node and `info` say the refiner supports negatives.
    neg_graph = _graph(refiner_name="with-negs", steps=2, negative_prompts="blurry\nred\na blue car at night")
    neg = server.run(neg_graph)
    assert succeeded(neg), execution_error(neg)
    assert load_refiner(str(folder / "with-negs.safetensors")).info.negatives
    bad = server.run(_graph(refiner_name="w-bad", steps=2, w_min=6.0, w_max=8.0))
    assert not succeeded(bad) and "w range must satisfy" in execution_error(bad)["exception_message"]


def test_cancel_stops_saves_and_reports(server, comfy_base):
    folder = comfy_base / "models" / "dice_refiners"
    state = folder / "cancelled.dice-train-state"
    prompt_id = server.queue(_graph(refiner_name="cancelled", steps=500, save_every=1))
    server.until(state.exists, "the first training step's state file")  # fails on a hang, not on load
    server.post("/interrupt", {})
    entry = server.wait(prompt_id)
    assert not succeeded(entry)
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    saved = load_refiner(str(folder / "cancelled.safetensors"))
    assert 1 <= saved.info.train_steps < 500
    assert saved.info.train_steps == load_training_state(str(state)).step
    assert "cancelled" in server.log_tail(20000)
    assert server.run(_graph(refiner_name="after-cancel", steps=2))["status"]["status_str"] == "success"


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_state(server, comfy_base):
    g = _graph(refiner_name="diverges", steps=50, save_every=1)
    # x0 preparation uses 6 prompts x 4 steps; a few training steps later the model turns NaN.
    g["30"] = {"class_type": "PoisonModelAfter", "inputs": {"model": ["1", 0], "calls": 40}}
    g["10"]["inputs"]["model"] = ["30", 0]
    entry = server.run(g)
    assert not succeeded(entry)
    msg = execution_error(entry)["exception_message"]
    assert "diverged" in msg and "lower the learning rate" in msg
    step = int(re.search(r"diverged at step (\d+)", msg).group(1))
    folder = comfy_base / "models" / "dice_refiners"
    state = load_training_state(str(folder / "diverges.dice-train-state"))
    assert state.step == step - 1
    assert all(torch.isfinite(v).all() for v in state.refiner.values())
    assert not (folder / "diverges.safetensors").exists()


@pytest.mark.parametrize("settings, fragment", [
    ({"prompts": "   \n  ", "steps": 0}, "steps must be an integer >= 1"),
    ({"refiner_name": "../escape"}, "not a plain file name"),
    ({"width": 100}, "multiples of 8"),
])
def test_bad_settings_are_clear(server, settings, fragment):
    entry = None
    try:
        entry = server.run(_graph(**settings))
    except Exception as e:  # rejected at validation (e.g. steps below the input's minimum)
        assert "steps" in str(e) or fragment in str(e)
        return
    assert not succeeded(entry)
    assert fragment in execution_error(entry)["exception_message"]


def _teefusion_graph(lora_name, train_model=("1", 0), **train):
    """Train TeEFusion, then its output MODEL samples at cfg 1 with the prompt fused at w = 5."""
    settings = dict(prompts=TRAIN, w_min=2.0, w_max=8.0, steps=6, batch_size=2, learning_rate=3e-4, rank=4,
                    loss="l2", width=64, height=64, seed=0, lora_name=lora_name, save_every=0, resume=False,
                    x0_steps=3, lr_schedule="cosine")
    settings.update(train)
    g = _sample_graph()
    g["10"] = {"class_type": "TrainTeEFusion", "inputs": {"model": list(train_model), "clip": ["1", 1], **settings}}
    g["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 2]}}
    g["6"] = {"class_type": "TeEFusionConditioning", "inputs": {"positive": ["2", 0], "negative": ["3", 0], "w": 5.0,
                                                                "fuse_tokens": True, "fuse_pooled": True}}
    g["900"]["inputs"]["model"] = ["10", 0]
    g["5"]["inputs"].update(positive=["6", 0], cfg=1.0)
    return g


def test_train_teefusion_through_the_server(server, comfy_base):
    """Train TeEFusion as users queue it: the LoRA and its state land in models/loras with the
    student's metadata, the node's output MODEL samples one pass per step at cfg 1 with the fused
    prompt, and the stock LoraLoaderModelOnly reproduces that MODEL exactly; continue_from starts a
    second run from the saved LoRA."""
    from safetensors import safe_open

    entry = server.run(_teefusion_graph("server-tee"))
    assert succeeded(entry), execution_error(entry)
    loras = comfy_base / "models" / "loras"
    assert (loras / "server-tee.safetensors").exists() and (loras / "server-tee.teefusion-train-state").exists()
    with safe_open(str(loras / "server-tee.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["cfg_distill.method"] == "teefusion" and meta["cfg_distill.w_range"] == "2-8"
    assert meta["cfg_distill.base_checkpoint"] == CKPT
    assert load_training_state(str(loras / "server-tee.teefusion-train-state")).step == 6
    assert entry["outputs"]["11"]["images"]  # the loss curve
    calls = entry["outputs"]["901"]["model_calls"][0]
    assert calls["calls"] == 3 and calls["batches"] == [1, 1, 1]  # cfg 1: one pass of one row per step

    stock = _teefusion_graph("unused")
    del stock["10"], stock["11"]
    stock["12"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name":
                                                                   "server-tee.safetensors", "strength_model": 1.0}}
    stock["900"]["inputs"]["model"] = ["12", 0]
    again = server.run(stock)
    assert succeeded(again), execution_error(again)
    sha = lambda e: e["outputs"]["901"]["model_calls"][0]["latent_sha256"]  # noqa: E731
    assert sha(again) == sha(entry)
    base = server.run(_sample_graph())
    assert succeeded(base), execution_error(base)
    assert sha(base) != sha(entry)

    cont = server.run(_teefusion_graph("server-tee-2", steps=2, continue_from="server-tee.safetensors"))
    assert succeeded(cont), execution_error(cont)
    with safe_open(str(loras / "server-tee-2.safetensors"), framework="pt") as f:
        assert "server-tee.safetensors (6 steps)" in f.metadata()["cfg_distill_teefusion"]
