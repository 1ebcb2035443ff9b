"""The testbed (issue 6): procedural data and split, the pixel judge, the regenerated text encoder,
the assembled checkpoint in ComfyUI's stock loader, and the quality regression (the quick table:
CFG must beat cfg 1 on held-out prompts, and the committed DICE refiner must recover most of it).

The ComfyUI parts run in subprocesses: library mode imports ComfyUI's `nodes.py`, which must not
meet this pack's `nodes` package in the test process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from testbed import data, judge, textenc
from testbed.model import REFINER_FILE, UNET_FILE, VAE_FILE, WEIGHTS_DIR, weights_present
from tools.comfy_env import COMFY_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_weights = pytest.mark.skipif(not weights_present(), reason="testbed weights not trained yet (python -m testbed.train)")
needs_comfy = pytest.mark.skipif(not os.path.isfile(os.path.join(COMFY_DIR, "main.py")),
                                 reason="ComfyUI not installed (bash tools/setup_env.sh)")

# Quality-regression margins for the quick table (12 held-out prompts x 2 seeds, fixed seeds). The
# measured values are in testbed/README.md; the margins leave room for other CPUs / torch builds.
MIN_GAP_QUICK = 20.0  # CFG w=5 minus cfg 1, alignment points (measured 34.4)
MIN_RECOVERY_QUICK = 0.85  # DICE's share of that gap (shipped refiner at w = 5: 0.91 here, 0.91 on the full bench; target 0.9 there)
# Negative prompts (issue 11 target: DICE + negative within 5 points of CFG + negative). Colour-swapped
# negative: measured DICE 70.8 vs CFG 63.5 on this subset. Avoidance (share of images still showing
# the colour named by the negative; lower is better): measured CFG 0.0, DICE 13.3 (2 of 15 images;
# full bench 6.6 vs 2.5, within the target). 25 fails at 4 of 15, where round 5's refiner was (26.7).
MIN_W_RECOVERY_QUICK = 0.75  # the same file at w = 3 and 7, each against CFG at that w (measured 0.97 / 0.80
# here, 0.85 / 0.88 on the full bench; target 0.85 there). One attribute of one image is 3.4% of the
# w = 3 gap on this subset, which is why the margin is wider than the full bench's shortfall.
MAX_NEG_SHORTFALL_QUICK = 5.0
MAX_AVOIDANCE_STILL_SHOWS_QUICK = 25.0
MAX_AVOIDANCE_CFG_QUICK = 10.0
MIN_TEE_RECOVERY_QUICK = 0.85  # TeEFusion student LoRA at w = 3 / 5 / 7, its share of CFG's gap at the same w
# (the committed file, one default run of `python -m cfg_distill train teefusion`: measured 1.07 / 1.09 / 1.00 on
# this subset, 0.98 / 0.97 / 0.95 on the full bench; issue target 0.95 there)


def _run(args, timeout):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def test_split_holds_out_combinations_but_every_pair_is_trained():
    train, held = data.split()
    assert len(train) == 540 and len(held) == data.HELD_OUT == 60
    assert not set(train) & set(held)
    seen = set()
    for c in train:
        t = c.as_tuple()
        seen |= {(i, j, t[i], t[j]) for i in range(4) for j in range(i + 1, 4)}
    for c in held:
        t = c.as_tuple()
        assert all((i, j, t[i], t[j]) in seen for i in range(4) for j in range(i + 1, 4)), c
    assert data.split() == (train, held)  # fixed


def test_rendering_is_deterministic_and_prompts_name_the_attributes():
    a, ia, pa = data.make_set(data.all_combos()[:5], 2, seed=3)
    b, ib, pb = data.make_set(data.all_combos()[:5], 2, seed=3)
    assert np.array_equal(a, b) and ia == ib and pa == pb
    assert a.shape == (10, data.SIZE, data.SIZE, 3) and a.min() >= 0 and a.max() <= 1
    c = data.Combo("red", "cross", "blue", "top left")
    for t in range(len(data.TEMPLATES)):
        p = c.prompt(t)
        assert all(w in p for w in ("red", "cross", "blue", "top left"))


def test_caption_noise_is_fixed_and_of_the_stated_share():
    index = np.repeat(np.arange(540), 8)
    a = data.noisy_caption_index(index, 540, seed=4)
    assert np.array_equal(a, data.noisy_caption_index(index, 540, seed=4))
    share = float(np.mean(a != index))
    assert abs(share - data.CAPTION_NOISE * (1 - 1 / 540)) < 0.03, share


def test_judge_is_perfect_on_real_images():
    combos = data.all_combos()
    images, index, _ = data.make_set(combos, 2, seed=2024)
    r = judge.score(images, [combos[i] for i in index])
    assert r["n"] == 1200
    assert r["per_attribute"] == {"color": 100.0, "shape": 100.0, "background": 100.0, "position": 100.0}, r["per_attribute"]


def test_judge_says_none_for_an_empty_image_and_frechet_is_zero_for_equal_sets():
    blank = np.full((data.SIZE, data.SIZE, 3), 0.5)
    v = judge.judge(blank)
    assert v.shape == "none" and v.color == "none" and v.position == "none"
    combos = data.all_combos()[:50]
    images, index, _ = data.make_set(combos, 2, seed=5)
    f = judge.score(images, [combos[i] for i in index])["features"]
    assert judge.frechet(f, f) == pytest.approx(0.0, abs=1e-3)


def test_text_encoder_stream_is_pcg64_and_hash_matches():
    # The raw PCG64 stream for (seed, stream 0): fixed by the algorithm, on every platform.
    first = np.random.PCG64([textenc.SEED, 0]).random_raw(2)
    assert first.dtype == np.uint64
    sd = textenc.clip_state_dict(check=False)
    assert textenc.tensors_sha256(sd) == textenc.CLIP_SHA256
    assert sum(v.numel() for v in sd.values()) == 123_060_480
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in sd)


def test_committed_weights_fit_the_budget():
    files = [f for f in os.listdir(WEIGHTS_DIR)] if os.path.isdir(WEIGHTS_DIR) else []
    total = sum(os.path.getsize(os.path.join(WEIGHTS_DIR, f)) for f in files)
    assert total <= 40_000_000, f"weights/testbed holds {total / 1e6:.1f} MB"


@needs_comfy
@needs_weights
def test_checkpoint_loads_as_sd15_and_text_encoding_is_bit_identical(tmp_path):
    code = f"""
import sys, torch
sys.path.insert(0, {ROOT!r})
from testbed.assemble import assemble
from testbed.model import comfy_library
comfy_library()
import comfy.sd, nodes
from testbed.textcache import FastEncoder
path = assemble({str(tmp_path)!r})
model, clip, vae = comfy.sd.load_checkpoint_guess_config(path)[:3]
assert type(model.model.model_config).__name__ == "SD15", type(model.model.model_config)
fast, full = FastEncoder(), FastEncoder(skip_identity_layers=False)
for p in ["", "a red cross on a blue background, top left", "center: white circle, black background"]:
    stock = nodes.CLIPTextEncode().encode(clip, p)[0][0][0]
    assert torch.equal(stock, fast.encode([p])), p
    assert torch.equal(stock, full.encode([p])), p
lat = {{"samples": torch.zeros(1, 4, 4, 4)}}
pos = nodes.CLIPTextEncode().encode(clip, "a red circle on a blue background, center")[0]
neg = nodes.CLIPTextEncode().encode(clip, "")[0]
out = nodes.KSampler().sample(model, 3, 12, 5.0, "dpmpp_2m", "karras", pos, neg, lat)[0]
img = nodes.VAEDecode().decode(vae, out)[0]
assert img.shape == (1, 32, 32, 3) and torch.isfinite(img).all()
print("OK")
"""
    assert "OK" in _run(["-c", code], timeout=600)


@needs_comfy
@needs_weights
@pytest.mark.skipif(not os.path.isfile(os.path.join(WEIGHTS_DIR, REFINER_FILE)), reason="no committed testbed refiner")
def test_quality_regression_quick_table(tmp_path):
    """Fixed seeds: on held-out prompts CFG w=5 beats cfg 1 clearly, and DICE at cfg 1 (half the model
    evaluations) recovers most of that gain. Margins are generous; see the README for measured values."""
    # The shipped refiner also as a 2-range file with the same refiner in both ranges: ComfyUI must
    # evaluate exactly one entry per step (start/end percent), giving the very same images.
    from cfg_distill import load_refiner
    from cfg_distill.refiner_file import save_range_refiner

    shipped = load_refiner(os.path.join(WEIGHTS_DIR, REFINER_FILE))
    k2 = str(tmp_path / "k2same.safetensors")
    # (The shipped refiner takes w; at its reference w its input is the prompt itself, so the same
    # weights without the w input give the bench's DICE row exactly.)
    assert shipped.info.w_input and shipped.info.w_input["ref"] == shipped.info.guidance_scale == 5.0
    info = shipped.info.__class__(**{**shipped.info.__dict__, "ranges": [[0, 0.5], [0.5, 1]], "w_input": None})
    save_range_refiner(k2, [shipped.module, shipped.module], info)
    _run(["-m", "testbed.bench", "--quick", "--out", str(tmp_path), "--ckpt-dir", str(tmp_path / "ckpt"),
          "--extra-refiner", f"k2same={k2}"], timeout=900)
    with open(tmp_path / "table.json") as f:
        out = json.load(f)
    r, s, a = out["results"], out["summary"], out["avoidance"]
    steps = out["steps"]
    assert r["cfg5"]["nfe"] == 2 * steps and r["cfg1"]["nfe"] == steps and r["dice"]["nfe"] == steps
    assert r["dice_neg"]["nfe"] == steps and r["dice:k2same"]["nfe"] == steps
    assert r["dice:k2same"]["alignment"] == r["dice"]["alignment"] and r["dice:k2same"]["d_cfg5"] == r["dice"]["d_cfg5"]
    assert s["gap_cfg5_minus_cfg1"] >= MIN_GAP_QUICK, s
    assert s["recovery_dice"] >= MIN_RECOVERY_QUICK, s
    # The same file at w = 3 and 7 (one refiner for every w): against CFG at the same w.
    for w in (3, 7):
        assert r[f"dice_w{w}"]["nfe"] == steps, r
        assert s[f"recovery_same_w_dice_w{w}"] >= MIN_W_RECOVERY_QUICK, (w, s)
    assert r["dice_neg"]["alignment"] >= r["cfg5_neg"]["alignment"] - MAX_NEG_SHORTFALL_QUICK, r
    assert a["cfg5"]["still_shows"] <= MAX_AVOIDANCE_CFG_QUICK, a
    assert a["dice"]["still_shows"] <= MAX_AVOIDANCE_STILL_SHOWS_QUICK, a
    # The committed TeEFusion student LoRA, one file for every w: one pass at cfg 1 with the prompt fused at w.
    for w in (3, 5, 7):
        assert r[f"tee_lora{w}"]["nfe"] == steps and r[f"cfg{w}"]["nfe"] == 2 * steps
        assert s[f"recovery_tee_lora{w}"] >= MIN_TEE_RECOVERY_QUICK, (w, s)
    assert (tmp_path / "grid.png").stat().st_size > 0


# A short run of the default recipe (issue 24): the product's own command line on the testbed with its
# defaults (the model's own 32 px, batch 4 x grad_accum 4, lr 5e-4 cosine, 8 teacher steps per prompt,
# "" only) except the length and the prompt count, so that it fits CI. It must close the gap to CFG
# both on its own held-out check samples and on held-out prompts it never saw. A guard against a
# trainer that stops learning (ratio 1), not a quality target: 60 of the default 2,000 steps.
SHORT_RUN_PROMPTS, SHORT_RUN_STEPS = 96, 60
MAX_SHORT_RUN_CHECK_RATIO = 0.93  # the last held-out check's share of the first's (measured 0.87)
MAX_SHORT_RUN_HELD_OUT_RATIO = 0.95  # refined vs cfg 1 loss on 16 held-out prompts, Evaluate DICE Refiner's
# measure (measured 8.23 vs 9.42: 0.87)

_HELD_OUT_GAP = """
import json, sys
sys.path.insert(0, {root!r})
from testbed.bench import load_pack
pack = load_pack()
import comfy.sd, importlib
ev = importlib.import_module(pack.__name__ + ".nodes.evaluate_node")
core = importlib.import_module(pack.__name__ + ".cfg_distill")
model, clip = comfy.sd.load_checkpoint_guess_config({ckpt!r})[:2]
refiner = core.load_refiner({refiner!r})
gap = ev.measure_gap(model, clip, refiner, {prompts!r}, 5.0, batches=8, batch_size=4, width=32, height=32,
                     seed=4321, x0_steps=8)
print(json.dumps(dict(refined=gap.refined, baseline=gap.baseline)))
"""


@needs_weights
@needs_comfy
def test_a_short_default_run_closes_the_held_out_gap(tmp_path):
    from cfg_distill.refiner_file import read_refiner_info
    from testbed.assemble import assemble

    ckpt = assemble()
    train, held_out = data.split()
    prompts = tmp_path / "prompts.txt"
    pool = data.all_prompts(train)
    prompts.write_text("\n".join(pool[::len(pool) // SHORT_RUN_PROMPTS][:SHORT_RUN_PROMPTS]) + "\n")
    _run(["-m", "cfg_distill", "train", "dice", "--ckpt", ckpt, "--comfyui", COMFY_DIR, "--prompts", str(prompts),
          "--steps", str(SHORT_RUN_STEPS), "--out-dir", str(tmp_path), "--name", "short", "--no-progress"], timeout=1200)
    info = read_refiner_info(str(tmp_path / "short.safetensors"))
    assert info.extra["command"].startswith("python -m cfg_distill train dice")
    assert info.extra["teacher_samples"] == SHORT_RUN_STEPS * 4 * 4
    checks = info.extra["checks"]
    assert [s for s, _ in checks] == list(range(0, SHORT_RUN_STEPS + 1, SHORT_RUN_STEPS // 10))
    first, last = checks[0][1], checks[-1][1]
    assert last < MAX_SHORT_RUN_CHECK_RATIO * first, checks
    assert last < checks[len(checks) // 2][1] < first, checks  # still falling in the second half
    held_pool = data.all_prompts(held_out)
    held = held_pool[::len(held_pool) // 16][:16]
    out = _run(["-c", _HELD_OUT_GAP.format(root=ROOT, ckpt=ckpt, refiner=str(tmp_path / "short.safetensors"),
                                           prompts=held)], timeout=600)
    gap = json.loads(out.strip().splitlines()[-1])
    print(f"short default run: checks {first:.4g} -> {last:.4g}; held-out prompts refined {gap['refined']:.4g} "
          f"vs cfg 1 {gap['baseline']:.4g}")
    assert gap["refined"] < MAX_SHORT_RUN_HELD_OUT_RATIO * gap["baseline"], gap
