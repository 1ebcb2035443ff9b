"""DICE training through ComfyUI's own sampling calls (ComfyDistillHost + train_refiner) in library
mode, beyond SD1.5 with CLIP:

- a tiny SDXL-architecture model with synthetic prompt encodings (2048-d tokens, 1280-d pooled vector
  and SDXL's size keys; a real SDXL text encoder is far too big for a CPU test): the held-out gap
  shrinks, the model's outputs are bit-identical before and after, and the pooled vector reaches the
  model's `y` unchanged in every student pass;
- the tiny SD1.5 UNet as EPS, v-prediction and flow model (via ComfyUI's stock model-sampling
  patches on the MODEL): training reduces the held-out gap for each parameterisation.

Synthetic encodings are built like CLIP's: a start token, word vectors from a fixed vocabulary,
padding, and a causal running mean (so every later token, padding included, carries the prompt).
Training and held-out prompts are different word sequences from the same vocabulary.
"""
import os
import sys

import pytest
import torch

from cfg_distill.training import Batch, TrainConfig, evaluate_gap, train_refiner
from tools.comfy_env import load_pack, use_comfy_library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "cfg_distill_pack"
W = 5.0
SDXL_KEYS = {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024}


@pytest.fixture(scope="module")
def ct():
    """nodes.comfy_training of the pack, imported as ComfyUI imports it (a package)."""
    use_comfy_library()
    load_pack()
    return sys.modules[PACK + ".nodes.comfy_training"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a small shared CPU, one thread is several times faster than OpenMP threads fighting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SyntheticEncoder:
    """CLIP-like token sequences [1, 77, dim] and a pooled vector [1, pooled_dim] from word ids."""

    def __init__(self, dim: int, pooled_dim: int | None, extras: dict, seed: int = 7, vocab: int = 48):
        g = torch.Generator().manual_seed(seed)
        self.words = torch.randn(vocab, dim, generator=g)
        self.bos, self.eos = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
        self.pool = torch.randn(dim, pooled_dim, generator=g) / dim ** 0.5 if pooled_dim else None
        self.extras, self.vocab = extras, vocab

    def encode(self, ids: list[int]):
        rows = [self.bos] + [self.words[i] for i in ids] + [self.eos] * (77 - 1 - len(ids))
        x = torch.stack(rows)
        x = 0.5 * x + 0.5 * torch.cumsum(x, 0) / torch.arange(1, 78)[:, None]  # causal mixing
        extras = dict(self.extras)
        if self.pool is not None:  # pooled: a projection of the last token, as CLIP-G's
            extras["pooled_output"] = (x[len(ids) + 1] @ self.pool)[None].contiguous()
        return x[None].contiguous(), extras

    def prompts(self, ct, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            ids = torch.randint(0, self.vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            out.append(ct.EncodedPrompt(*self.encode(ids)))
        return out

    def null(self, ct):
        return ct.EncodedPrompt(*self.encode([]))


def make_host(ct, model, prompts, null, batch_size, x0_seed, latent_hw=(8, 8), x0_steps=2):
    host = ct.ComfyDistillHost(model, prompts, null, W, batch_size)
    host.load()
    for i in range(len(prompts)):
        host.add_x0_from_teacher(i, latent_hw, x0_steps, x0_seed + i)
    return host


def held_out_gap(ct, model, refiner, enc, batches=8, batch_size=4):
    host = make_host(ct, model, enc.prompts(ct, 6, seed=202), enc.null(ct), batch_size, x0_seed=5000)
    try:
        g = torch.Generator().manual_seed(99)
        data = [host.sample_batch(k, g) for k in range(batches)]
        return evaluate_gap(refiner, data, host.teacher, host.student, loss="l2")
    finally:
        host.cleanup()


def train(ct, model, enc, steps, lr, batch_size=4, student_hook=None, n_prompts=8):
    host = make_host(ct, model, enc.prompts(ct, n_prompts, seed=101), enc.null(ct), batch_size, x0_seed=1000)
    student = host.student
    if student_hook is not None:
        def student(batch: Batch, refined_c: torch.Tensor):
            with student_hook(host, batch):
                return host.student(batch, refined_c)
    try:
        config = TrainConfig(guidance_scale=W, steps=steps, batch_size=batch_size, lr=lr, loss="l2", seed=0)
        return train_refiner(config, host.sample_batch, host.teacher, student,
                             token_dim=enc.words.shape[1], device=host.device)
    finally:
        host.cleanup()


# ---------------------------------------------------------------------------------------------
# SDXL


def test_sdxl_training_closes_the_gap_keeps_the_model_and_passes_pooled_through(ct):
    import comfy.sample

    from tools.tiny_models import build_tiny_sdxl

    sdxl = build_tiny_sdxl()
    enc = SyntheticEncoder(2048, 1280, SDXL_KEYS)

    # Reference outputs of the very ModelPatcher the trainer will use: a CFG sampling run and a
    # direct model call with SDXL's y (pooled + size embeddings).
    (tokens, extras), (neg_tokens, neg_extras) = enc.encode([3, 1, 4, 1, 5]), enc.encode([])
    pos, neg = [[tokens, extras]], [[neg_tokens, neg_extras]]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))

    def outputs():
        with torch.no_grad():
            sampled = comfy.sample.sample(sdxl, noise, 3, W, "euler", "normal", pos, neg, torch.zeros(1, 4, 8, 8),
                                          seed=11, disable_pbar=True)
            y = sdxl.model.encode_adm(pooled_output=extras["pooled_output"], **SDXL_KEYS)
            direct = sdxl.model.apply_model(noise * 3.0, torch.tensor([3.0]), c_crossattn=tokens, y=y)
        return sampled, direct, y

    sampled_before, direct_before, y_ref = outputs()
    assert y_ref.shape == (1, 2816) and torch.equal(y_ref[:, :1280], extras["pooled_output"])

    # Every student pass: the model's y starts with the batch's pooled vectors, bit for bit.
    seen = {"student_calls": 0, "rows": 0}

    class CheckPooled:
        def __init__(self, host, batch):
            self.host = host
            self.expected = torch.cat([p.extras["pooled_output"] for p in batch.extra["prompts"]])

        def __enter__(self):
            expected = self.expected

            def wrapper(apply_model, args):
                y = args["c"]["y"]
                assert args["cond_or_uncond"] == [0] and y.shape == (expected.shape[0], 2816)
                assert torch.equal(y[:, :1280], expected.to(y)), "pooled vector changed on its way to y"
                seen["student_calls"] += 1
                seen["rows"] += y.shape[0]
                return apply_model(args["input"], args["timestep"], **args["c"])

            self.host.mp.set_model_unet_function_wrapper(wrapper)

        def __exit__(self, *exc):
            self.host.mp.model_options.pop("model_function_wrapper", None)
            return False

    steps = 30
    result = train(ct, sdxl, enc, steps=steps, lr=1e-3, student_hook=CheckPooled)
    assert seen == {"student_calls": steps, "rows": steps * 4}
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    rep = held_out_gap(ct, sdxl, result.refiner, enc)
    print(f"SDXL: train loss {first:.4g} -> {last:.4g}; held-out refined {rep.refined:.4g} vs cfg 1 "
          f"{rep.baseline:.4g} (ratio {rep.ratio:.3f}, {rep.samples} samples)")
    assert rep.refined < 0.8 * rep.baseline

    sampled_after, direct_after, _ = outputs()
    assert torch.equal(sampled_after, sampled_before), "sampling with the MODEL changed after training"
    assert torch.equal(direct_after, direct_before), "the model's output changed after training"
    assert not sdxl.model_options.get("model_function_wrapper")  # nothing left on the shared patcher
    assert not sdxl.weight_wrapper_patches  # the identity wrappers lived on the trainer's clone only


# ---------------------------------------------------------------------------------------------
# EPS, v-prediction and flow: ComfyUI's stock model-sampling patches on a tiny SD1.5 UNet


def tiny_sd15_patcher():
    import comfy.model_patcher
    import comfy.supported_models

    from tools.tiny_models import _init_

    unet_config = {
        "model_channels": 320, "use_linear_in_transformer": False, "transformer_depth": [1],
        "transformer_depth_output": [1, 1], "transformer_depth_middle": -2, "context_dim": 768,
        "adm_in_channels": None, "use_temporal_attention": False, "in_channels": 4, "out_channels": 4,
        "num_res_blocks": [1], "channel_mult": [1], "image_size": 32, "use_spatial_transformer": True,
        "legacy": False,
    }
    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    _init_(model.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def sd15(ct):
    return tiny_sd15_patcher()


@pytest.mark.parametrize("parameterisation", ["eps", "v_prediction", "flow"])
def test_eps_v_and_flow_models_all_learn(ct, sd15, parameterisation):
    import comfy.model_sampling
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingSD3

    if parameterisation == "eps":
        model = sd15
        kind = comfy.model_sampling.EPS
    elif parameterisation == "v_prediction":
        model = ModelSamplingDiscrete().patch(sd15, "v_prediction", False)[0]
        kind = comfy.model_sampling.V_PREDICTION
    else:
        model = ModelSamplingSD3().patch(sd15, 3.0)[0]
        kind = comfy.model_sampling.CONST
    assert isinstance(model.get_model_object("model_sampling"), kind)

    enc = SyntheticEncoder(768, None, {}, seed=8)
    result = train(ct, model, enc, steps=30, lr=1e-3, n_prompts=16)
    rep = held_out_gap(ct, model, result.refiner, enc)
    print(f"{parameterisation}: held-out refined {rep.refined:.4g} vs cfg 1 {rep.baseline:.4g} (ratio {rep.ratio:.3f})")
    assert rep.refined < 0.85 * rep.baseline


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing of the frozen model (per block, scoped to the student call)


def test_gradient_checkpointing_gives_the_same_gradients_and_leaves_the_model_as_it_was(ct, sd15):
    from cfg_distill.checkpointing import checkpoint_segments
    from cfg_distill.refiner import refine
    from cfg_distill.training import distill_loss, new_refiner

    enc = SyntheticEncoder(768, None, {}, seed=3)
    unet = sd15.model.diffusion_model
    segments = checkpoint_segments(unet)
    names = sorted({type(s).__name__ for s in segments})
    assert names == ["ResBlock", "SpatialTransformer"], names
    grads, losses = [], []
    for checkpointing in (False, True):
        host = ct.ComfyDistillHost(sd15, enc.prompts(ct, 4, seed=11), enc.null(ct), W, 2, checkpointing)
        host.load()
        try:
            for i in range(4):
                host.add_x0_from_teacher(i, (8, 8), 2, 300 + i)
            batch = host.sample_batch(0, torch.Generator().manual_seed(5))
            torch.manual_seed(0)
            refiner = new_refiner(768)
            torch.nn.init.normal_(refiner.fc2.weight, std=0.02)  # not the identity: a real gradient path
            with torch.no_grad():
                target = host.teacher(batch)
            seen = []
            # the last block is downstream of the conditioning (blocks before the first cross-attention
            # carry no gradient and are never recomputed); hooks of the block itself miss the recompute
            inner = next(segments[-1].children())
            hook = inner.register_forward_hook(lambda *a: seen.append(1))
            try:
                loss = distill_loss(host.student(batch, refine(refiner, batch.c, batch.uc, 1.0, True)), target)
                loss.backward()
            finally:
                hook.remove()
            # checkpointed: the block's inside runs twice (forward without storing, recompute in backward)
            assert len(seen) == (2 if checkpointing else 1), seen
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.reshape(-1) for p in refiner.parameters()]))
        finally:
            host.cleanup()
        assert not any("forward" in s.__dict__ for s in segments), "a block kept its patched forward"
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7), (grads[0] - grads[1]).abs().max()


def test_gradient_checkpointing_is_removed_even_when_the_call_fails():
    from cfg_distill.checkpointing import checkpointed_blocks

    class Block(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    net = torch.nn.Sequential(Block(), Block())
    with pytest.raises(RuntimeError, match="boom"):
        with checkpointed_blocks(net) as n:
            assert n == 2
            net(torch.ones(1, requires_grad=True))
    assert all("forward" not in b.__dict__ for b in net)
