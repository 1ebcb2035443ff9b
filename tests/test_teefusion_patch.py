"""TeEFusion Model Patch on a tiny SD3 built from ComfyUI's own MMDiT class (library mode).

- ComfyUI's sinusoidal timestep embedding is the one the formula uses (cos first, same frequencies),
  bit for bit, including the 1000 w inputs;
- the patched model's output equals a reference written from the formula
  c = t_emb(t) + y_emb(p_c) + t_emb(1000 w) y_emb(p_c - p_null) / 256 (max abs diff <= 1e-5, fp32);
- LoRA keys on the pooled embedder still resolve (LoRA before or after the patch);
- a stock KSampler at cfg 1 runs one model pass per step; the unpatched model is left untouched;
- clear errors for models without the embedder (SD1.5) and for a null conditioning without pooled_output.
"""
import os
import sys

import pytest
import torch

from cfg_distill.teefusion import GUIDANCE_DIVISOR, fused_pooled_embedding, sinusoidal_embedding, teefusion_vector
from tools.comfy_env import load_pack, use_comfy_library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "cfg_distill_pack"
TOL = 1e-5


def _pack():
    use_comfy_library()
    import nodes  # noqa: F401  ComfyUI's nodes.py first, as in the server

    load_pack()
    return sys.modules[PACK]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pack():
    return _pack()


@pytest.fixture(scope="module")
def sd3():
    from tools.tiny_models import build_tiny_sd3

    return build_tiny_sd3(seed=3)


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 8, 8, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    ctx = torch.randn(batch, 12, 4096, generator=g)
    p_c = torch.randn(batch, 2048, generator=g)
    p_null = torch.randn(1, 2048, generator=g)
    return x, t, ctx, p_c, p_null


def _reference_forward(dm, x, t, ctx, p_c, p_null, w):
    """MMDiT forward with c from the formula, our own sinusoid and the model's MLPs (no patch)."""
    t_embed = lambda tt: dm.t_embedder.mlp(sinusoidal_embedding(tt, dm.t_embedder.frequency_embedding_size))  # noqa: E731
    c = teefusion_vector(t_embed, dm.y_embedder.mlp, t, p_c, p_null, w)
    hw = x.shape[-2:]
    h = dm.x_embedder(x) + dm.cropped_pos_embed(hw, device=x.device).to(x)
    h = dm.forward_core_with_concat(h, c, dm.context_embedder(ctx), None, {})
    return dm.unpatchify(h, hw=hw)[:, :, :hw[-2], :hw[-1]], c


def _patched_forward(mp, x, t, ctx, y):
    import comfy.model_management

    comfy.model_management.load_models_gpu([mp])
    dm = mp.model.diffusion_model
    c = dm.t_embedder(t, dtype=x.dtype) + dm.y_embedder(y)
    return dm(x, t, context=ctx, y=y), c


def test_comfy_sinusoid_is_the_formulas():
    use_comfy_library()
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    t = torch.tensor([0.0, 1.0, 37.5, 999.0, 1000.0 * 2, 1000.0 * 5, 1000.0 * 7.5, 30000.0])
    for dim in (256, 255):
        ours, comfys = sinusoidal_embedding(t, dim), timestep_embedding(t, dim)
        assert torch.equal(ours, comfys)
    e = sinusoidal_embedding(torch.tensor([0.0]), 256)
    assert torch.equal(e[0, :128], torch.ones(128)) and torch.equal(e[0, 128:], torch.zeros(128))  # cos first


@pytest.mark.parametrize("w", [0.0, 2.0, 5.0, 7.5])
def test_patch_matches_the_formula(pack, sd3, w):
    import comfy.model_management

    patch = sys.modules[PACK + ".nodes.teefusion_patch"]
    x, t, ctx, p_c, p_null = _inputs()
    dm = sd3.model.diffusion_model
    with torch.no_grad():
        ref, c_ref = _reference_forward(dm, x, t, ctx, p_c, p_null, w)
        patched = patch.apply_teefusion_patch(sd3, p_null, w)
        out, c = _patched_forward(patched, x, t, ctx, p_c)
        diff = (out - ref).abs().max().item()
        assert (c - c_ref).abs().max().item() <= TOL
        assert diff <= TOL, f"max abs diff {diff}"
        # The term is really there: the stock model's output differs.
        comfy.model_management.load_models_gpu([sd3])
        stock = dm(x, t, context=ctx, y=p_c)
    assert (stock - ref).abs().max().item() > 100 * TOL
    # The stock ModelPatcher is untouched: its y_embedder is ComfyUI's VectorEmbedder again.
    assert type(sd3.model.diffusion_model.y_embedder).__name__ == "VectorEmbedder"
    assert not sd3.object_patches


def test_term_by_hand(sd3):
    """The term itself, written out once more without cfg_distill's helpers."""
    import math

    dm = sd3.model.diffusion_model
    _, _, _, p_c, p_null = _inputs(batch=1)
    w = 4.0
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    arg = 1000.0 * w * freqs
    t_w = dm.t_embedder.mlp(torch.cat([torch.cos(arg), torch.sin(arg)])[None])
    with torch.no_grad():
        want = dm.y_embedder.mlp(p_c) + t_w * dm.y_embedder.mlp(p_c - p_null) / 256.0
        got = fused_pooled_embedding(dm.y_embedder.mlp, lambda t: dm.t_embedder(t, dtype=torch.float32),
                                     p_c, p_null, w)
    assert GUIDANCE_DIVISOR == 256.0
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_keys_still_resolve(pack, sd3, lora_first):
    import comfy.sd

    patch = sys.modules[PACK + ".nodes.teefusion_patch"]
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(128, 4, generator=g) * 0.1, torch.randn(4, 2048, generator=g) * 0.1
    lora = {"diffusion_model.y_embedder.mlp.0.lora_up.weight": up,
            "diffusion_model.y_embedder.mlp.0.lora_down.weight": down}
    w = 5.0
    x, t, ctx, p_c, p_null = _inputs(seed=1)
    if lora_first:
        with_lora = comfy.sd.load_lora_for_models(sd3, None, lora, 1.0, 0)[0]
        mp = patch.apply_teefusion_patch(with_lora, p_null, w)
    else:
        mp = comfy.sd.load_lora_for_models(patch.apply_teefusion_patch(sd3, p_null, w), None, lora, 1.0, 0)[0]
    assert "diffusion_model.y_embedder.mlp.0.weight" in mp.patches
    with torch.no_grad():
        out, _ = _patched_forward(mp, x, t, ctx, p_c)
        mp.unpatch_model()
        dm = sd3.model.diffusion_model
        lin = dm.y_embedder.mlp[0]
        w0 = lin.weight.detach().clone()
        try:
            lin.weight.data += up @ down
            ref, _ = _reference_forward(dm, x, t, ctx, p_c, p_null, w)
        finally:
            lin.weight.data.copy_(w0)
    assert (out - ref).abs().max().item() <= TOL


def test_one_pass_per_step_at_cfg1(pack, sd3):
    import nodes

    patch = sys.modules[PACK + ".nodes.teefusion_patch"]
    _, _, ctx, p_c, p_null = _inputs(batch=1)
    steps, rows = 4, [0]
    mp = patch.apply_teefusion_patch(sd3, p_null, 5.0)

    def count(apply_model, args):
        rows[0] += int(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    mp.set_model_unet_function_wrapper(count)
    pos = [[ctx[:, :12], {"pooled_output": p_c}]]
    neg = [[torch.zeros_like(ctx[:, :12]), {"pooled_output": p_null}]]
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    with torch.inference_mode():
        a = nodes.common_ksampler(mp, 1, steps, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]
        b = nodes.common_ksampler(sd3, 1, steps, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    assert rows[0] == steps  # one pass of batch 1 per step
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4


def test_node_and_errors(pack):
    import comfy.model_patcher
    import comfy.supported_models

    fusion_nodes = sys.modules[PACK + ".nodes.fusion_nodes"]
    from tools.tiny_models import build_tiny_sd3

    sd3 = build_tiny_sd3(seed=4)
    null = [[torch.zeros(1, 77, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
    out = fusion_nodes.TeEFusionModelPatch.execute(sd3, 5.0, null).result[0]
    assert out is not sd3 and "diffusion_model.y_embedder" in out.object_patches and not sd3.object_patches
    again = fusion_nodes.TeEFusionModelPatch.execute(out, 3.0, null).result[0]  # re-patch replaces w
    assert again.object_patches["diffusion_model.y_embedder"].w == 3.0
    assert again.object_patches["diffusion_model.y_embedder"].original is sd3.model.diffusion_model.y_embedder

    with pytest.raises(ValueError, match="pooled_output"):
        fusion_nodes.TeEFusionModelPatch.execute(sd3, 5.0, [[torch.zeros(1, 77, 4096), {}]])
    with pytest.raises(ValueError, match="2048-d"):
        fusion_nodes.TeEFusionModelPatch.execute(sd3, 5.0, [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]])

    unet_config = {"model_channels": 320, "use_linear_in_transformer": False, "context_dim": 768,
                   "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
                   "transformer_depth_output": [1, 1], "transformer_depth_middle": -2, "in_channels": 4,
                   "out_channels": 4, "num_heads": 8, "use_spatial_transformer": True, "legacy": False,
                   "adm_in_channels": None, "use_temporal_attention": False, "num_head_channels": -1,
                   "image_size": 32}
    cfg = comfy.supported_models.SD15(unet_config)
    cfg.set_inference_dtype(torch.float32, None)
    sd15 = comfy.model_patcher.ModelPatcher(cfg.get_model({}), load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"needs an MMDiT model \(SD3 / SD3.5\).*BaseModel.*TeEFusion Conditioning"):
        fusion_nodes.TeEFusionModelPatch.execute(sd15, 5.0, [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]])


def test_example_workflow_uses_stock_sd3_loaders():
    import json

    with open(os.path.join(ROOT, "example_workflows", "teefusion_sd3_patch.json")) as f:
        wf = json.load(f)
    by_id = {n["id"]: n for n in wf["nodes"]}
    types = {n["type"] for n in wf["nodes"]}
    assert {"UNETLoader", "CheckpointLoaderSimple", "TeEFusionModelPatch", "KSampler", "EmptySD3LatentImage"} <= types
    links = {l[0]: l for l in wf["links"]}

    def source(node, name):
        inp = next(i for i in node["inputs"] if i["name"] == name)
        return by_id[links[inp["link"]][1]]

    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    assert ks["widgets_values"][3] == 1.0  # cfg 1
    patch = source(ks, "model")
    assert patch["type"] == "TeEFusionModelPatch"
    assert source(patch, "model")["type"] == "UNETLoader"
    assert source(patch, "null_conditioning")["widgets_values"] == [""]
    assert source(ks, "positive")["type"] == "CLIPTextEncode"  # unfused tokens
    note = next(n for n in wf["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "CC-BY-NC-4.0" in note and "nothing is downloaded" in note


@pytest.mark.server
def test_nodes_are_registered_in_the_real_server(object_info):
    patch, train = object_info["TeEFusionModelPatch"], object_info["TrainTeEFusion"]
    assert patch["category"] == train["category"] == "conditioning/cfg-distill"
    req = patch["input"]["required"]
    assert [req[k][0] for k in ("model", "w", "null_conditioning")] == ["MODEL", "FLOAT", "CONDITIONING"]
    assert patch["output"] == ["MODEL"] and "cfg to exactly 1.0" in patch["description"]
    assert train["output"] == ["MODEL", "STRING", "IMAGE"]
    assert {"w_min", "w_max", "rank", "lora_name", "resume"} <= set(train["input"]["required"])
