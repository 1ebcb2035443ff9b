"""Our nodes on the real ComfyUI server with a tiny generated SD1.5-architecture checkpoint."""
import os

import pytest

from tools.comfy_server import PromptRejected, execution_error, succeeded
from tools.workflow_api import to_api

from comfy_fixtures import (CKPT, EXAMPLE_FILES, SAMPLERS, add_call_counter, add_call_counters, load_workflow,
                            node_of, report, shrink_for_tests, stand_in_text_encoders)

pytestmark = pytest.mark.server
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG_PROMPT = ", ".join(["a very detailed watercolor painting of a quiet harbour town at dawn"] * 9)


def test_nodes_registered_with_types(object_info):
    loader, apply_, fusion = (object_info[k] for k in ("DiceRefinerLoader", "DiceRefinerApply", "TeEFusionConditioning"))
    assert loader["output"] == ["DICE_REFINER"]
    assert "sd15-random.safetensors" in loader["input"]["required"]["refiner_name"][1]["options"]
    assert "pickled.safetensors" in loader["input"]["required"]["refiner_name"][1]["options"]
    req = apply_["input"]["required"]
    assert [req[k][0] for k in ("positive", "negative", "refiner", "strength")] == \
        ["CONDITIONING", "CONDITIONING", "DICE_REFINER", "FLOAT"]
    assert apply_["output"] == ["CONDITIONING"] and fusion["output"] == ["CONDITIONING"]
    assert fusion["input"]["required"]["w"][0] == "FLOAT"
    for node in (apply_, fusion):
        assert node["category"] == "conditioning/cfg-distill"
        assert "cfg to exactly 1.0" in node["description"] and "cfg_pp" in node["description"]


EXAMPLES = sorted(n for n in os.listdir(os.path.join(ROOT, "example_workflows")) if n.endswith(".json"))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_workflow_runs(server, object_info, family_models, name):
    """Every example workflow, converted as saved, on tiny models that the stock loaders detect:
    SD1.5 / SD3.5 checkpoints (CheckpointLoaderSimple), Wan 2.1 T2V, Wan 2.2 A14B's two experts and
    Qwen-Image diffusion models (UNETLoader) with a Wan-2.1-format VAE (VAELoader). The one non-stock
    node: the Wan and Qwen-Image workflows' CLIPLoader is swapped for a test-only stand-in
    (tests/stand_in_nodes), because UMT5-XXL and Qwen2.5-VL 7B have hard-coded multi-billion-parameter
    configs that cannot run on this CPU; it returns a real comfy CLIP whose conditioning has the real
    encoder's shapes and keys. At cfg 1 the stock samplers make exactly one model call per step, on
    the positive only (Wan 2.2: the two KSamplerAdvanced split the 3 steps)."""
    api = shrink_for_tests(to_api(load_workflow(name), object_info), example=name)
    expect_stand_in = EXAMPLE_FILES.get(name, {}).get("stand_in", False)
    assert stand_in_text_encoders(api) == (1 if expect_stand_in else 0)
    samplers = [v["inputs"] for v in api.values() if v["class_type"] in SAMPLERS]
    assert samplers and all(ks["cfg"] == 1.0 for ks in samplers)
    reports = add_call_counters(api, name)
    entry = server.run(api)
    assert succeeded(entry), execution_error(entry)
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images and all(os.path.isfile(os.path.join(server.base_dir, "output", i["subfolder"], i["filename"]))
                          for i in images)
    runs = [report(entry, node) for node in reports]  # per sampler (Wan 2.2: the two experts split the steps)
    assert sum(r["calls"] for r in runs) == 3 and all(r["calls"] > 0 and r["latent_finite"] for r in runs)
    assert all(b == 1 for r in runs for b in r["batches"])
    assert all(c == [0] for r in runs for c in r["cond_or_uncond"])


# What the real encoders give (comfy/text_encoders/wan.py: UMT5 padded with zeros to 512 tokens, no
# start token; qwen_image.py: Qwen2.5-VL tokens with the chat template cut off), no pooled vector.
@pytest.mark.parametrize("clip_type,refiner,shape", [
    ("wan", "wan-random.safetensors", [1, 512, 4096]),
    ("qwen_image", "qwen-image-random.safetensors", [1, 5, 3584]),
])
def test_stand_in_text_encoder_gives_the_real_encoders_conditioning(server, family_models, clip_type, refiner, shape):
    """The stand-in CLIP (tests/stand_in_nodes) behind the stock CLIPTextEncode gives the real
    encoder's shapes and keys, and the family's refiner (no start token) rewrites every token."""
    g = {
        "1": {"class_type": "StandInTextEncoderLoader", "inputs": {"clip_name": "x.safetensors", "type": clip_type}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in snow", "clip": ["1", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 0]}},
        "4": {"class_type": "DiceRefinerLoader", "inputs": {"refiner_name": refiner}},
        "5": {"class_type": "DiceRefinerApply", "inputs": {"positive": ["2", 0], "negative": ["3", 0],
                                                           "refiner": ["4", 0], "strength": 1.0}},
        "6": {"class_type": "ConditioningProbe", "inputs": {"conditioning": ["5", 0], "reference": ["2", 0]}},
        "7": {"class_type": "ConditioningProbe", "inputs": {"conditioning": ["2", 0]}},
    }
    entry = server.run(g)
    assert succeeded(entry), execution_error(entry)
    (plain,) = entry["outputs"]["7"]["conditioning"]
    (refined,) = entry["outputs"]["6"]["conditioning"]
    assert plain["shape"] == refined["shape"] == shape and plain["keys"] == ["pooled_output"]
    assert "pooled_shape" not in plain and refined["finite"]
    assert refined["first_token_diff"] > 1e-4 and refined["unchanged_positions"] == []


def _count(server, object_info, workflow, cfg, label, steps=4, batch=1, strip_refiner=False):
    api = shrink_for_tests(to_api(load_workflow(workflow), object_info), steps=steps)
    ks = node_of(api, "KSampler")
    api[ks]["inputs"]["cfg"] = cfg
    api[node_of(api, "EmptyLatentImage")]["inputs"]["batch_size"] = batch
    if strip_refiner:  # plain CFG baseline: the prompt goes straight to the sampler
        apply_ = node_of(api, "DiceRefinerApply")
        api[ks]["inputs"]["positive"] = api[apply_]["inputs"]["positive"]
    entry = server.run(add_call_counter(api, label))
    assert succeeded(entry), execution_error(entry)
    return report(entry)


def test_dice_at_cfg1_is_one_pass_per_step_batch_1(server, object_info):
    r = _count(server, object_info, "dice_sd15.json", 1.0, "dice")
    assert r["calls"] == 4 and r["batches"] == [1] * 4
    assert all(c == [0] for c in r["cond_or_uncond"])  # only the (refined) positive is evaluated
    assert r["latent_finite"]


def test_teefusion_at_cfg1_is_one_pass_per_step(server, object_info):
    r = _count(server, object_info, "teefusion_sd15.json", 1.0, "tee")
    assert r["calls"] == 4 and r["batches"] == [1] * 4


def test_cfg5_baseline_evaluates_both_conds_every_step(server, object_info):
    r = _count(server, object_info, "dice_sd15.json", 5.0, "cfg", strip_refiner=True)
    rows = sum(r["batches"])
    assert rows == 2 * 4  # two passes' worth of rows per step (batched or not)
    assert sorted(x for c in r["cond_or_uncond"] for x in c) == [0] * 4 + [1] * 4


def test_batch_of_two_images_stays_one_pass(server, object_info):
    r = _count(server, object_info, "dice_sd15.json", 1.0, "batch", batch=2)
    assert r["calls"] == 4 and r["batches"] == [2] * 4


def _probe_graph(positive_text, negative_text="", refiner="sd15-random.safetensors", extra_area=False):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive_text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative_text, "clip": ["1", 1]}},
        "4": {"class_type": "DiceRefinerLoader", "inputs": {"refiner_name": refiner}},
        "5": {"class_type": "DiceRefinerApply", "inputs": {"positive": ["2", 0], "negative": ["3", 0],
                                                           "refiner": ["4", 0], "strength": 1.0}},
        "6": {"class_type": "ConditioningProbe", "inputs": {"conditioning": ["5", 0], "reference": ["2", 0]}},
    }
    if extra_area:
        g["7"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["2", 0], "width": 64, "height": 64,
                                                                  "x": 0, "y": 0, "strength": 0.7}}
        g["8"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["7", 0]}}
        g["5"]["inputs"]["positive"] = ["8", 0]
        g["6"]["inputs"]["reference"] = ["8", 0]
    return g


def test_refined_differs_pooled_unchanged_first_token_kept(server):
    entry = server.run(_probe_graph("a red fox in the snow"))
    assert succeeded(entry), execution_error(entry)
    (e,) = entry["outputs"]["6"]["conditioning"]
    assert e["shape"] == [1, 77, 768] and e["finite"]
    assert e["max_abs_diff"] > 1e-3 and e["first_token_diff"] == 0.0
    assert e["pooled_equal"] is True and "pooled_output" in e["keys"]


def test_long_prompt_and_area_entries_keep_their_keys(server):
    entry = server.run(_probe_graph(LONG_PROMPT, extra_area=True))
    assert succeeded(entry), execution_error(entry)
    plain, area = entry["outputs"]["6"]["conditioning"]
    assert plain["shape"] == [1, 154, 768] and plain["max_abs_diff"] > 1e-3
    assert {"area", "strength", "set_area_to_bounds", "pooled_output"} <= set(area["keys"])
    assert area["pooled_equal"] is True


def _expect_error(server, graph, *fragments):
    entry = server.run(graph)
    assert not succeeded(entry)
    err = execution_error(entry)
    for frag in fragments:
        assert frag in err["exception_message"], err["exception_message"]
    return err


def test_sdxl_refiner_on_sd15_conditioning_names_both(server):
    _expect_error(server, _probe_graph("a cat", refiner="sdxl-random.safetensors"),
                  "2048-d (SDXL)", "768-d (SD1.5)", "family sdxl", "Load a refiner trained for this base model")


def test_truncated_and_non_safetensors_files(server):
    _expect_error(server, _probe_graph("a cat", refiner="truncated.safetensors"), "truncated")
    _expect_error(server, _probe_graph("a cat", refiner="pickled.safetensors"), "not a .safetensors", "import-official")


def _queue_expecting_missing(server, graph, name):
    """A missing refiner is refused at validation or, failing that, by the loader at execution."""
    try:
        entry = server.run(graph)
    except PromptRejected as e:
        assert name in str(e)
        return
    assert not succeeded(entry)
    msg = execution_error(entry)["exception_message"]
    assert name in msg and "dice_refiners" in msg and "Put .safetensors refiners there" in msg


def test_missing_file_and_file_deleted_after_listing(server, comfy_base):
    _queue_expecting_missing(server, _probe_graph("a cat", refiner="does-not-exist.safetensors"),
                             "does-not-exist.safetensors")
    folder = comfy_base / "models" / "dice_refiners"
    gone = folder / "gone.safetensors"
    gone.write_bytes((folder / "sd15-random.safetensors").read_bytes())
    assert "gone.safetensors" in str(server.get("/object_info/DiceRefinerLoader"))  # the UI lists it
    gone.unlink()
    _queue_expecting_missing(server, _probe_graph("a cat", refiner="gone.safetensors"), "gone.safetensors")


def test_nan_conditioning_gives_clear_error(server):
    g = _probe_graph("a cat")
    g["9"] = {"class_type": "PoisonConditioning", "inputs": {"conditioning": ["2", 0]}}
    g["5"]["inputs"]["positive"] = ["9", 0]
    _expect_error(server, g, "positive conditioning contains NaN")


def test_server_stays_up_after_errors(server, object_info):
    entry = server.run(shrink_for_tests(to_api(load_workflow("dice_sd15.json"), object_info)))
    assert succeeded(entry) and server.alive()
