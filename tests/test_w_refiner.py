"""One DICE refiner for a range of guidance scales (issue 11, item 3): w is an input of the refiner
(c + s (w - w_ref)(c - uc) is what it reads), recorded in the file (format 3), applied with w in
ComfyUI and the webui, refused outside the trained range, and trained with w drawn per sample
against CFG at each sample's w."""
import json
import os
import sys

import pytest
import torch

from cfg_distill.request import TrainRequest
from safetensors import safe_open

from cfg_distill import (ConditioningError, DiceRefiner, LoadedRefiner, RefinerFileError, RefinerInfo,
                         load_refiner, refine, refine_tokens, save_refiner)
from cfg_distill.refiner import w_input_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W_INPUT = {"range": [3.0, 7.0], "ref": 5.0, "scale": 0.1}


def _refiner(seed=0, dim=32):
    torch.manual_seed(seed)
    m = DiceRefiner(dim, 64, 4)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def _tokens(seed, t=77, dim=32, b=2):
    return torch.randn(b, t, dim, generator=torch.Generator().manual_seed(seed))


def test_w_input_is_the_scaled_fusion_and_zero_at_the_reference():
    r, c, uc = _refiner(), _tokens(1), _tokens(2, b=1)
    assert torch.equal(w_input_tokens(c, uc, 0.0), c)
    assert torch.allclose(w_input_tokens(c, uc, 0.3), c + 0.3 * (c - uc))
    assert torch.equal(refine(r, c, uc, w_amount=0.0), refine(r, c, uc))
    per_row = refine(r, c, uc, w_amount=torch.tensor([-0.2, 0.2]))
    assert torch.allclose(per_row[0], refine(r, c[:1], uc, w_amount=-0.2)[0], atol=1e-6)
    assert torch.allclose(per_row[1], refine(r, c[1:], uc, w_amount=0.2)[0], atol=1e-6)
    assert not torch.allclose(per_row[0], per_row[1])
    assert torch.equal(refine(r, c, uc, w_amount=0.2)[:, 0], c[:, 0])  # start token kept
    # A negative of another length is tiled to the prompt's (154 tokens: two chunks).
    long_c = _tokens(3, t=154)
    assert torch.allclose(w_input_tokens(long_c, uc, 0.5), long_c + 0.5 * (long_c - uc.repeat(1, 2, 1)))


def test_file_records_the_w_range_and_older_formats_stay(tmp_path):
    r = _refiner()
    path = str(tmp_path / "w.safetensors")
    save_refiner(path, r, RefinerInfo(32, 64, 4, base_family="other", guidance_scale=5.0, w_input=W_INPUT))
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["cfg_distill"])
    assert meta["format_version"] == 3 and meta["w_input"] == W_INPUT
    loaded = load_refiner(path)
    assert loaded.info.w_input == W_INPUT and "one refiner for w 3-7" in loaded.info.summary()
    assert loaded.info.w_amount(3.0) == pytest.approx(-0.2) and loaded.info.w_amount(7.0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="trained for w from 3 to 7; got w = 9"):
        loaded.info.w_amount(9.0)
    single = str(tmp_path / "single.safetensors")
    save_refiner(single, r, RefinerInfo(32, 64, 4, base_family="other", guidance_scale=5.0))
    with safe_open(single, framework="pt") as f:
        meta = json.loads(f.metadata()["cfg_distill"])
    assert meta["format_version"] == 1 and "w_input" not in meta  # the official K = 1 format, unchanged
    assert load_refiner(single).info.w_amount(3.0) is None

    from safetensors.torch import save_file
    bad = dict(meta, format_version=3, w_input={"range": [7, 3], "ref": 5, "scale": 0.1})
    save_file(r.state_dict(), str(tmp_path / "bad.safetensors"), metadata={"cfg_distill": json.dumps(bad)})
    with pytest.raises(RefinerFileError, match="corrupt w input"):
        load_refiner(str(tmp_path / "bad.safetensors"))


def test_a_k_range_refiner_can_take_w(tmp_path):
    """Noise-level ranges and a w input together: every range's refiner reads the same w input."""
    from cfg_distill import refine_ranges
    from cfg_distill.refiner_file import save_range_refiner

    mods = [_refiner(1), _refiner(2)]
    path = str(tmp_path / "k2w.safetensors")
    save_range_refiner(path, mods, RefinerInfo(32, 64, 4, base_family="other", guidance_scale=5.0,
                                               ranges=[[0, 0.5], [0.5, 1]], w_input=W_INPUT))
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["cfg_distill"])["format_version"] == 3  # older packs say "update"
    loaded = load_refiner(path)
    assert loaded.info.ranges == [[0, 0.5], [0.5, 1]] and loaded.info.w_input == W_INPUT
    c, uc = _tokens(1), _tokens(2, b=1)
    for w in (3.0, 6.5):
        for (_a, _b, got), m in zip(refine_ranges(loaded, c, uc, w=w), mods):
            assert torch.allclose(got, refine(m, c, uc, w_amount=0.1 * (w - 5.0)), atol=1e-5)
    with pytest.raises(ConditioningError, match="give w"):
        refine_ranges(loaded, c, uc)


def test_apply_needs_w_in_range_and_single_w_refiners_ignore_it():
    r, c, uc = _refiner(), _tokens(1), _tokens(2, b=1)
    w_ref = LoadedRefiner(r, RefinerInfo(32, 64, 4, guidance_scale=5.0, w_input=W_INPUT), "w.safetensors")
    at3 = refine_tokens(w_ref, c, uc, w=3.0)
    assert torch.allclose(at3, refine(r, c, uc, w_amount=-0.2), atol=1e-6)
    assert not torch.allclose(at3, refine_tokens(w_ref, c, uc, w=7.0))
    with pytest.raises(ConditioningError, match="give w"):
        refine_tokens(w_ref, c, uc)
    with pytest.raises(ConditioningError, match="w.safetensors: this refiner was trained for w from 3 to 7"):
        refine_tokens(w_ref, c, uc, w=2.0)
    single = LoadedRefiner(r, RefinerInfo(32, 64, 4, guidance_scale=5.0), "s.safetensors")
    assert torch.equal(refine_tokens(single, c, uc, w=3.0), refine_tokens(single, c, uc, w=7.0))


def test_webui_dice_mode_passes_w_and_records_it():
    from sdwebui import logic

    r, c, uc = _refiner(dim=768), _tokens(1, dim=768, b=1), _tokens(2, dim=768, b=1)
    loaded = LoadedRefiner(r, RefinerInfo(768, 64, 4, base_family="sd15", guidance_scale=5.0, w_input=W_INPUT), "w")
    settings = logic.Settings.from_ui(logic.MODE_DICE, "w", 1.0, False, 6.5)
    out = logic.CondTransform(settings, loaded)(c, [uc], [0])
    assert torch.allclose(out, refine(r, c, uc, w_amount=0.1 * (6.5 - 5.0)), atol=1e-6)
    assert logic.infotext_params(settings, "abc", refiner_takes_w=True)[logic.INFO_W] == 6.5
    assert logic.INFO_W not in logic.infotext_params(settings, "abc")


# -- training, in ComfyUI library mode on the tiny SD1.5 checkpoint ---------------------------------------
PACK = "cfg_distill_pack"


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    from tools.comfy_env import load_pack, use_comfy_library

    use_comfy_library()
    import nodes  # noqa: F401  ComfyUI's nodes.py first

    load_pack()
    import comfy.sd
    import folder_paths
    from tools.tiny_models import write_tiny_sd15

    base = tmp_path_factory.mktemp("wref")
    ckpt = write_tiny_sd15(str(base / "tiny-sd15.safetensors"))
    folder_paths.add_model_folder_path("dice_refiners", str(base / "refiners"), is_default=True)
    os.makedirs(base / "refiners", exist_ok=True)
    model, clip = comfy.sd.load_checkpoint_guess_config(ckpt)[:2]
    torch.set_num_threads(1)
    return dict(model=model, clip=clip, dir=base / "refiners")


def test_training_draws_w_and_the_teacher_is_cfg_at_each_samples_w(lib):
    ct = sys.modules[PACK + ".nodes.comfy_training"]
    tn = sys.modules[PACK + ".nodes.training_node"]
    enc = ct.encode_prompts(lib["clip"], ["a red fox", "a blue car"])
    null = ct.encode_prompts(lib["clip"], [""])[0]
    w_input = w_input_for((3.0, 7.0), 5.0)
    host = ct.ComfyDistillHost(lib["model"], enc, null, 5.0, 2, w_input=w_input)
    host.load()
    try:
        for i in range(2):
            host.add_x0_from_teacher(i, (8, 8), 2, 10 + i)
        batch = host.sample_batch(0, torch.Generator().manual_seed(3))
        w = batch.extra["w"]
        assert w.shape == (2,) and bool(((w >= 3) & (w <= 7)).all()) and w[0] != w[1]
        assert torch.allclose(batch.extra["w_amount"], 0.25 * (w - 5.0))  # reach 0.5 at 3 and 7
        with torch.no_grad():
            mixed = host.teacher(batch)
            for row in range(2):  # the same as the stock CFG at that row's w
                one = type(batch)(x_t=batch.x_t[row:row + 1], sigma=batch.sigma[row:row + 1], c=batch.c[row:row + 1],
                                  uc=batch.uc, extra={"prompts": batch.extra["prompts"][row:row + 1]})
                host.w = float(w[row])
                assert torch.allclose(mixed[row:row + 1], host.teacher(one), atol=1e-4, rtol=1e-4), row
    finally:
        host.cleanup()
    with pytest.raises(ValueError, match="w range must satisfy"):
        w_input_for((6.0, 8.0), 5.0)
    # The scale follows the range: the farther end moves the query halfway to the negative, never to it.
    assert w_input_for((2.0, 6.0), 5.0)["scale"] == pytest.approx(0.5 / 3, abs=1e-6)
    assert w_input_for((4.0, 12.0), 5.0)["scale"] == pytest.approx(0.5 / 7, abs=1e-6)


def w_input_for(w_range, w):
    """The w input a request for that range around w trains (cfg_distill.request)."""
    return TrainRequest(method="dice", guidance_scale=w, w_min=w_range[0], w_max=w_range[1]).validate().w_input()


def test_train_and_apply_a_refiner_for_a_range_of_w(lib):
    tn = sys.modules[PACK + ".nodes.training_node"]
    rn = sys.modules[PACK + ".nodes.refiner_nodes"]
    import nodes

    tn.train_in_comfyui(TrainRequest(method="dice", prompts="a red fox\na blue car\na castle", guidance_scale=5.0,
                                     steps=4, batch_size=2, lr=1e-3, loss="l2", width=64, height=64, seed=0,
                                     name="w-range", save_every=0, x0_steps=2, w_min=3.0, w_max=7.0,
                                     lr_schedule="cosine", grad_accum=1), lib["model"], lib["clip"])
    saved = load_refiner(str(lib["dir"] / "w-range.safetensors"))
    assert saved.info.w_input == {"range": [3.0, 7.0], "ref": 5.0, "scale": 0.25}
    saved.name = "w-range.safetensors"
    pos = nodes.CLIPTextEncode().encode(lib["clip"], "a dog in a park")[0]
    neg = nodes.CLIPTextEncode().encode(lib["clip"], "")[0]
    at = {w: rn.ApplyDiceRefiner.execute(pos, neg, saved, 1.0, w).result[0][0][0] for w in (3.0, 7.0)}
    assert not torch.allclose(at[3.0], at[7.0])
    with pytest.raises(ValueError, match="trained for w from 3 to 7"):
        rn.ApplyDiceRefiner.execute(pos, neg, saved, 1.0, 9.0)
