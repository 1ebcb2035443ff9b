"""A tiny SDXL-architecture model in ComfyUI library mode: 2048-d tokens refined, pooled untouched,
and sampling at cfg 1 runs one pass per step with the SDXL `y` vector built from pooled."""
import os
import sys

import pytest
import torch

from cfg_distill import DiceRefiner, LoadedRefiner, RefinerInfo, fuse, refine_tokens
from tools.comfy_env import load_pack, use_comfy_library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pack():
    use_comfy_library()
    name = "cfg_distill_pack"
    load_pack()
    return sys.modules[name]


@pytest.fixture(scope="module")
def sdxl():
    from tools.tiny_models import build_tiny_sdxl
    return build_tiny_sdxl()


def sdxl_conditioning(seed, length=77):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, 2048, generator=g),
             {"pooled_output": torch.randn(1, 1280, generator=g), "width": 1024, "height": 1024,
              "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024}]]


def _nodes(pack):
    return (sys.modules[pack.__name__ + ".nodes.refiner_nodes"], sys.modules[pack.__name__ + ".nodes.fusion_nodes"])


def test_sdxl_dice(pack, sdxl):
    import comfy.sample

    refiner_nodes, _ = _nodes(pack)
    torch.manual_seed(3)
    loaded = LoadedRefiner(DiceRefiner(2048).eval(), RefinerInfo(2048, 512, base_family="sdxl"), "sdxl.safetensors")
    pos, neg = sdxl_conditioning(1, length=154), sdxl_conditioning(2)
    pos_before = pos[0][0].clone()
    out = refiner_nodes.ApplyDiceRefiner.execute(positive=pos, negative=neg, refiner=loaded, strength=1.0).result[0]
    tokens, extras = out[0]
    assert tokens.shape == (1, 154, 2048)
    assert torch.equal(pos[0][0], pos_before), "input conditioning was mutated"
    assert extras["pooled_output"] is pos[0][1]["pooled_output"]  # pooled passed through untouched
    assert {k: v for k, v in extras.items() if k != "pooled_output"} == \
        {k: v for k, v in pos[0][1].items() if k != "pooled_output"}
    assert torch.equal(tokens, refine_tokens(loaded, pos[0][0], neg[0][0], 1.0))

    calls = []
    m = sdxl.clone()

    def wrapper(apply_model, args):
        calls.append((args["input"].shape[0], tuple(args["c"]["y"].shape), tuple(args["c"]["c_crossattn"].shape)))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(wrapper)
    latent = torch.zeros(1, 4, 16, 16)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    samples = comfy.sample.sample(m, noise, 3, 1.0, "euler", "normal", out, neg, latent, seed=0)
    assert torch.isfinite(samples).all()
    assert calls == [(1, (1, 2816), (1, 154, 2048))] * 3


def test_sdxl_teefusion_fuses_tokens_and_pooled(pack):
    _, fusion_nodes = _nodes(pack)
    pos, neg = sdxl_conditioning(4), sdxl_conditioning(5)
    out = fusion_nodes.TeEFusionConditioning.execute(positive=pos, negative=neg, w=2.0, fuse_tokens=True,
                                                     fuse_pooled=True).result[0]
    tokens, extras = out[0]
    assert torch.allclose(tokens, fuse(pos[0][0], neg[0][0], 2.0))
    assert torch.allclose(extras["pooled_output"], pos[0][1]["pooled_output"] * 3 - 2 * neg[0][1]["pooled_output"],
                          atol=1e-5)
    assert extras["width"] == 1024 and pos[0][1]["pooled_output"] is not extras["pooled_output"]
    only_tokens = fusion_nodes.TeEFusionConditioning.execute(positive=pos, negative=neg, w=2.0, fuse_tokens=True,
                                                             fuse_pooled=False).result[0]
    assert only_tokens[0][1]["pooled_output"] is pos[0][1]["pooled_output"]
