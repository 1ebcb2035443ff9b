"""Where the training points x_t come from (issue 11, item 1's candidates): sampling trajectories
besides forward-noised data - a share of each batch taken from the states the stock sampler visits,
the CFG teacher's runs and, given a refiner, the student's own runs at cfg 1 - and the official
recipe's one noise level per batch. In ComfyUI library mode on the tiny SD1.5 checkpoint."""
import os
import sys

import pytest
import torch

from cfg_distill import LoadedRefiner, RefinerInfo
from cfg_distill.training import new_refiner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "cfg_distill_pack"
PROMPTS = ["a red fox", "a blue car", "a green house", "a castle at night"]


@pytest.fixture(scope="module")
def lib():
    from tools.comfy_env import load_pack, use_comfy_library

    use_comfy_library()
    import nodes  # noqa: F401  ComfyUI's nodes.py first

    load_pack()
    import comfy.sd
    import tempfile
    from tools.tiny_models import write_tiny_sd15

    base = tempfile.mkdtemp(prefix="traj")
    model, clip = comfy.sd.load_checkpoint_guess_config(write_tiny_sd15(os.path.join(base, "tiny.safetensors")))[:2]
    torch.set_num_threads(1)
    ct = sys.modules[PACK + ".nodes.comfy_training"]
    return dict(model=model, ct=ct, enc=ct.encode_prompts(clip, PROMPTS), null=ct.encode_prompts(clip, [""])[0])


def _host(lib, trajectories=None, percent_range=(0.0, 1.0), model=None, **kw):
    ct = lib["ct"]
    host = ct.ComfyDistillHost(model or lib["model"], lib["enc"], lib["null"], 5.0, 2, percent_range=percent_range,
                               trajectories=trajectories, **kw)
    host.load()
    for i in range(len(PROMPTS)):
        host.add_x0_from_teacher(i, (8, 8), 2, 20 + i)
    return host


def _counting(model):
    """A clone of model that counts the rows of every model evaluation (cond and uncond rows alike)."""
    rows = [0]
    m = model.clone()

    def wrapper(apply_model, args):
        rows[0] += int(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(wrapper)
    return m, rows


def test_without_a_share_the_batches_are_unchanged(lib):
    ct = lib["ct"]
    plain = _host(lib)
    off = _host(lib, ct.TrajectoryPoints(share=0.0, count=4, steps=3))
    off.add_trajectory_points((8, 8), 1)
    assert off.traj == []  # nothing sampled when no sample would use it
    for step in range(3):
        a = plain.sample_batch(step, torch.Generator().manual_seed(step))
        b = off.sample_batch(step, torch.Generator().manual_seed(step))
        assert torch.equal(a.x_t, b.x_t) and torch.equal(a.sigma, b.sigma) and torch.equal(a.c, b.c)
    plain.cleanup()
    off.cleanup()


def test_the_states_are_the_samplers_and_batches_draw_them_with_their_prompts(lib):
    ct = lib["ct"]
    model, rows = _counting(lib["model"])
    spec = ct.TrajectoryPoints(share=1.0, count=4, steps=3, sampler="euler", scheduler="normal")
    host = _host(lib, spec, model=model)
    rows[0] = 0
    host.add_trajectory_points((8, 8), 5)
    assert rows[0] == 4 * 2 * 3  # 4 trajectories, CFG (cond + uncond rows), 3 steps
    import comfy.samplers

    schedule = comfy.samplers.calculate_sigmas(host.ms, "normal", 3).tolist()[:-1]
    assert len(host.traj) == 4 * 3
    assert sorted({s for _x, s, _p in host.traj}) == pytest.approx(sorted(schedule))
    first = torch.cat([x for x, s, _p in host.traj if s == pytest.approx(schedule[0])])
    assert abs(float(first.std()) / schedule[0] - 1) < 0.35  # the starting noise, at sigma_max
    batch = host.sample_batch(0, torch.Generator().manual_seed(0))
    for i in range(2):
        match = [p for x, s, p in host.traj if torch.equal(x, batch.x_t[i:i + 1].cpu()) and s == float(batch.sigma[i])]
        assert match, "a batch sample that is not a recorded trajectory state"
        assert batch.extra["prompts"][i] is host.prompts[match[0]]
        assert torch.equal(batch.c[i], host.prompts[match[0]].tokens[0])
    host.cleanup()


def test_student_trajectories_run_at_cfg_1_and_the_percent_range_filters(lib):
    ct = lib["ct"]
    token_dim = lib["null"].tokens.shape[-1]
    refiner = LoadedRefiner(new_refiner(token_dim, 64, 4).eval(), RefinerInfo(token_dim, 64, 4), "r.safetensors")
    model, rows = _counting(lib["model"])
    spec = ct.TrajectoryPoints(share=0.5, count=4, steps=4, sampler="euler", scheduler="normal", student=refiner)
    host = _host(lib, spec, percent_range=(0.5, 1.0), model=model)
    rows[0] = 0
    host.add_trajectory_points((8, 8), 5)
    assert rows[0] == 2 * 2 * 4 + 2 * 1 * 4  # one batch of 2 with CFG, one with the refiner at cfg 1
    top = float(host.ms.percent_to_sigma(0.5))
    assert host.traj and all(s <= top for _x, s, _p in host.traj)
    assert len(host.traj) < 4 * 4  # the high-noise half of the schedule is left out
    host.cleanup()
    with pytest.raises(ValueError, match="trajectory share must be in"):
        ct.ComfyDistillHost(lib["model"], lib["enc"], lib["null"], 5.0, 2, trajectories=ct.TrajectoryPoints(share=2.0))


def test_one_noise_level_per_batch(lib):
    per_sample, per_batch = _host(lib), _host(lib, one_level_per_batch=True)
    a = per_sample.sample_batch(0, torch.Generator().manual_seed(4))
    b = per_batch.sample_batch(0, torch.Generator().manual_seed(4))
    assert a.sigma[0] != a.sigma[1]
    assert b.sigma[0] == b.sigma[1] and b.sigma[0] == a.sigma[0]  # the first draw, shared by the batch
    per_sample.cleanup()
    per_batch.cleanup()
