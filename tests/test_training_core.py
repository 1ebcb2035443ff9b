"""The host-independent DICE loop (cfg_distill.training) on a toy frozen model, with real tensors.

The toy: a frozen random "text encoder" (vocabulary embeddings, start token, padding that carries
the prompt like CLIP's) and a frozen cross-attention "denoiser" on [B, 4, 8, 8] latents with
32-d tokens. teacher = its CFG at w = 5 (two passes); student = one pass with refined tokens.
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cfg_distill.refiner import refine
from cfg_distill.refiner_file import load_refiner, save_refiner
from cfg_distill.run import check_text
from cfg_distill.training import (Batch, TrainConfig, TrainingDiverged, TrainingStateError, cfg_target, check_ratio,
                                  distill_loss, evaluate_gap, load_training_state, new_refiner, train_refiner)

D, T, VOCAB, W = 32, 8, 48, 5.0
FAST = dict(inner_dim=64, heads=4, lr=2e-3)  # a small refiner keeps CPU tests quick


class ToyModel:
    """Frozen random text encoder + cross-attention denoiser; all weights from one seed."""

    def __init__(self, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)

        def r(*shape, scale=1.0):
            return torch.randn(*shape, generator=g) * scale

        self.vocab, self.bos, self.pad = r(VOCAB, D), r(D), r(D, scale=0.5)
        self.w_in, self.w_sigma = r(4, D, scale=0.5), r(D, scale=0.3)
        self.wq, self.wk, self.wv, self.w_mid = (r(D, D, scale=D ** -0.5) for _ in range(4))
        self.w_out = r(D, 4, scale=D ** -0.5)

    def encode(self, prompts: list[list[int]]) -> torch.Tensor:
        rows = []
        for ids in prompts:
            x = torch.stack([self.bos] + [self.vocab[i] for i in ids] + [self.pad] * (T - 1 - len(ids)))
            rows.append(x + 0.5 * torch.cumsum(x, 0) / torch.arange(1, T + 1)[:, None])  # causal mixing
        return torch.stack(rows)

    def eps(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = x.flatten(2).transpose(1, 2) @ self.w_in  # [B, 64, D]
        h = h * (1 + sigma.reshape(-1, 1, 1) * self.w_sigma)
        q, k, v = h @ self.wq, tokens @ self.wk, tokens @ self.wv
        h = h + torch.softmax(q @ k.transpose(1, 2) * D ** -0.5, -1) @ v
        h = h + torch.tanh(h @ self.w_mid)
        return (h @ self.w_out).transpose(1, 2).reshape(x.shape[0], 4, 8, 8)

    def teacher(self, batch: Batch) -> torch.Tensor:
        uc = batch.uc.expand(batch.c.shape[0], -1, -1)
        return cfg_target(self.eps(batch.x_t, batch.sigma, batch.c), self.eps(batch.x_t, batch.sigma, uc), W)

    def student(self, batch: Batch, refined_c: torch.Tensor) -> torch.Tensor:
        return self.eps(batch.x_t, batch.sigma, refined_c)


def random_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


TOY = ToyModel()
TRAIN_C = TOY.encode(random_prompts(64, seed=1))
HELD_OUT_C = TOY.encode(random_prompts(32, seed=2))  # prompts never seen in training
UC = TOY.encode([[]])  # the encoding of ""


def make_batch(c_pool: torch.Tensor, g: torch.Generator, size: int) -> Batch:
    idx = torch.randint(0, c_pool.shape[0], (size,), generator=g)
    sigma = torch.rand(size, generator=g) * 2
    x_t = torch.randn(size, 4, 8, 8, generator=g) * (1 + sigma.reshape(-1, 1, 1, 1))
    return Batch(x_t, sigma, c_pool[idx], UC)


def sampler(size: int):
    """Data from the loop's generator, plus a draw from the global RNG (both must resume exactly)."""
    def sample_batch(step: int, g: torch.Generator) -> Batch:
        batch = make_batch(TRAIN_C, g, size)
        batch.x_t = batch.x_t + 0.01 * torch.randn(batch.x_t.shape)  # global torch RNG
        return batch
    return sample_batch


def held_out_batches() -> list[Batch]:
    g = torch.Generator().manual_seed(99)
    return [make_batch(HELD_OUT_C, g, 16) for _ in range(4)]


def train(config: TrainConfig, **kw):
    return train_refiner(config, kw.pop("sample_batch", sampler(config.batch_size)), kw.pop("teacher", TOY.teacher),
                         kw.pop("student", TOY.student), token_dim=D, **kw)


def weights(refiner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in refiner.state_dict().items()}


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------


def test_cfg_target_and_loss_reduction():
    cond, uncond = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.allclose(cfg_target(cond, uncond, 5.0), uncond + 5 * (cond - uncond))
    assert torch.allclose(cfg_target(cond, uncond, 1.0), cond, atol=1e-6)
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    # sum over all elements / batch size (not a mean over elements)
    assert torch.allclose(distill_loss(pred, target, "l2"), ((pred - target) ** 2).sum() / 3)
    assert torch.allclose(distill_loss(pred, target, "l1"), (pred - target).abs().sum() / 3)
    # with this reduction, the mean over two half batches equals the full batch
    halves = (distill_loss(pred[:1], target[:1]) + 2 * distill_loss(pred[1:], target[1:])) / 3
    assert torch.allclose(halves, distill_loss(pred, target))
    with pytest.raises(ValueError, match="shape"):
        distill_loss(pred, target[:2])


def test_new_refiner_starts_as_identity_and_still_learns():
    refiner = new_refiner(D, 64, 4, seed=3)
    c = TRAIN_C[:4]
    assert torch.equal(refine(refiner, c, UC), c)  # plain cfg 1 before training
    refine(refiner, c, UC).square().sum().backward()
    assert refiner.fc2.weight.grad.abs().sum() > 0  # the zeroed layer still gets a gradient
    assert torch.equal(new_refiner(D, 64, 4, seed=3).fc1.weight, new_refiner(D, 64, 4, seed=3).fc1.weight)


def test_learns_to_close_the_cfg_gap_on_held_out_prompts(tmp_path):
    held_out = held_out_batches()
    untrained = evaluate_gap(new_refiner(D, 64, 4), held_out, TOY.teacher, TOY.student)
    assert untrained.refined == pytest.approx(untrained.baseline)  # the identity is the baseline

    progress = []
    config = TrainConfig(steps=200, batch_size=8, **{**FAST, "lr": 3e-3})
    result = train(config, state_path=str(tmp_path / "state.safetensors"),
                   on_step=lambda *a: progress.append(a))
    assert not result.cancelled and result.step == 200 and len(result.losses) == 200
    assert [p[0] for p in progress] == list(range(1, 201)) and all(p[1] == 200 for p in progress)
    assert progress[-1][4] == 0 and all(p[3] >= 0 and p[4] >= 0 for p in progress)

    gap = evaluate_gap(result.refiner, held_out, TOY.teacher, TOY.student)
    assert gap.baseline == pytest.approx(untrained.baseline)
    assert gap.ratio < 0.5, f"held-out loss {gap.refined:.1f} vs cfg-1 baseline {gap.baseline:.1f}"
    assert sum(result.losses[-50:]) < 0.5 * sum(result.losses[:50])

    # The trained refiner saves / loads as an ordinary refiner file with the run's description.
    path = str(tmp_path / "refiner.safetensors")
    save_refiner(path, result.refiner, result.info(base_family="other", base_checkpoint="toy"))
    loaded = load_refiner(path)
    assert loaded.info.guidance_scale == 5.0 and loaded.info.train_steps == 200
    assert evaluate_gap(loaded.module, held_out, TOY.teacher, TOY.student).refined == pytest.approx(gap.refined)


def test_resume_after_cancel_or_error_equals_an_uninterrupted_run(tmp_path):
    config = TrainConfig(steps=24, batch_size=4, grad_accum=2, save_every=5, **FAST)
    full = train(config)

    # 1) cancelled at step 9, resumed
    path = str(tmp_path / "cancel.safetensors")
    done = []
    first = train(config, state_path=path, on_step=lambda s, *_: done.append(s), should_stop=lambda: len(done) >= 9)
    assert first.cancelled and first.step == 9 and load_training_state(path).step == 9
    resumed = train(config, state_path=path, resume=True)
    assert resumed.resumed_from == 9 and resumed.step == 24 and not resumed.cancelled
    for k, v in weights(full.refiner).items():
        assert torch.equal(v, resumed.refiner.state_dict()[k]), k
    assert resumed.losses == full.losses

    # 2) a host interrupt raised from a callback (ComfyUI style) in the middle of step 14's work
    class Interrupted(Exception):
        pass

    def interrupting_teacher(batch):
        if len(done) == 13:
            raise Interrupted()
        return TOY.teacher(batch)

    path = str(tmp_path / "error.safetensors")
    done.clear()
    with pytest.raises(Interrupted):
        train(config, state_path=path, teacher=interrupting_teacher, on_step=lambda s, *_: done.append(s))
    assert load_training_state(path).step == 13  # what was learned is kept
    resumed = train(config, state_path=path, resume=True)
    for k, v in weights(full.refiner).items():
        assert torch.equal(v, resumed.refiner.state_dict()[k]), k
    assert resumed.losses == full.losses

    # 3) an exception from on_step after a completed step keeps that step too
    path = str(tmp_path / "progress_error.safetensors")

    def failing_progress(step, *_):
        if step == 17:
            raise RuntimeError("progress bar broke")

    with pytest.raises(RuntimeError, match="progress bar"):
        train(config, state_path=path, on_step=failing_progress)
    assert load_training_state(path).step == 17
    resumed = train(config, state_path=path, resume=True)
    assert torch.equal(resumed.refiner.fc2.weight, full.refiner.fc2.weight) and resumed.losses == full.losses

    # a finished state resumes to itself without writing
    digest = file_digest(path)
    again = train(config, state_path=path, resume=True)
    assert again.step == 24 and file_digest(path) == digest


def test_progress_checks_fall_resume_and_change_nothing_else(tmp_path):
    """The held-out progress check: measured at the start, every check_every steps and at the end, on
    samples of its own stream; it falls as the refiner learns, is kept in the state file, continues
    after a resume, and leaves the trained weights and losses exactly as without it."""
    config = TrainConfig(steps=30, batch_size=4, grad_accum=2, save_every=7, **FAST)
    plain = train(config)
    seen = []
    checked = train(config, check_every=10, on_check=lambda step, total, checks: seen.append((step, total)))
    assert seen == [(0, 30), (10, 30), (20, 30), (30, 30)]
    assert [c.step for c in checked.checks] == [0, 10, 20, 30]
    assert checked.losses == plain.losses
    for k, v in weights(plain.refiner).items():
        assert torch.equal(v, checked.refiner.state_dict()[k]), k
    # a fresh refiner is the identity: the first check is cfg 1's gap on those samples
    assert check_ratio(checked.checks) < 0.8, checked.checks
    assert checked.checks[-1].loss < checked.checks[1].loss < checked.checks[0].loss
    text = check_text(checked.checks, 30)
    assert f"{100 * check_ratio(checked.checks):.0f}% of the start's gap left" in text and "since step 20" in text

    path = str(tmp_path / "state.safetensors")
    done = []
    first = train(config, state_path=path, check_every=10, on_step=lambda s, *_: done.append(s),
                  should_stop=lambda: len(done) >= 14)
    assert [c.step for c in first.checks] == [0, 10] and [c.step for c in load_training_state(path).checks] == [0, 10]
    resumed = train(config, state_path=path, resume=True, check_every=10)
    assert [c.step for c in resumed.checks] == [0, 10, 20, 30]
    assert [c.loss for c in resumed.checks] == pytest.approx([c.loss for c in checked.checks], rel=1e-6)
    assert resumed.losses == plain.losses
    assert [c.step for c in load_training_state(path).checks] == [0, 10, 20, 30]


def test_cancel_saves_and_reports(tmp_path):
    path = str(tmp_path / "state.safetensors")
    calls = []
    result = train(TrainConfig(steps=50, batch_size=4, **FAST), state_path=path,
                   should_stop=lambda: calls.append(1) or len(calls) > 7)
    assert result.cancelled and result.step == 7 and len(result.losses) == 7 and result.state_path == path
    state = load_training_state(path)
    assert state.step == 7 and state.losses == result.losses
    for k, v in result.refiner.state_dict().items():
        assert torch.equal(state.refiner[k], v)
    # the state file doubles as a refiner file
    assert load_refiner(path).info.train_steps == 7


def test_divergence_keeps_the_last_good_state_and_raises(tmp_path):
    config = TrainConfig(steps=20, batch_size=4, save_every=5, **FAST)
    clean = train(TrainConfig(**{**config.__dict__, "steps": 5}))

    def poisoned_teacher(batch):
        target = TOY.teacher(batch)
        return target * float("nan") if batch.extra.get("step") == 7 else target  # 8th step

    def sample_batch(step, g):
        batch = sampler(4)(step, g)
        batch.extra["step"] = step
        return batch

    path = str(tmp_path / "state.safetensors")
    seen = []
    with pytest.raises(TrainingDiverged, match="step 8") as err:
        train(config, state_path=path, sample_batch=sample_batch, teacher=poisoned_teacher,
              on_step=lambda s, total, loss, *_: seen.append(loss))
    assert isinstance(err.value, ValueError) and err.value.step == 8
    assert "learning rate" in str(err.value) and "last saved" in str(err.value)
    assert len(seen) == 7 and all(math.isfinite(x) for x in seen)
    state = load_training_state(path)
    assert state.step == 5  # not overwritten by the diverged run
    for k, v in weights(clean.refiner).items():
        assert torch.equal(state.refiner[k], v)


@pytest.mark.parametrize("setting, value, words", [
    ("steps", 0, "steps must be an integer >= 1"),
    ("steps", -3, "steps"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("lr", -1e-4, "lr"),
    ("lr", float("nan"), "lr"),
    ("loss", "huber", "loss must be 'l1' or 'l2'"),
    ("grad_accum", 0, "grad_accum"),
    ("autocast", "fp8", "autocast must be None, 'bf16' or 'fp16'"),
    ("save_every", -1, "save_every"),
    ("betas", (0.9, 1.5), "betas"),
    ("weight_decay", -0.1, "weight_decay"),
    ("inner_dim", 30, "inner_dim"),
    ("lr_schedule", "linear", "lr_schedule must be one of constant, cosine"),
])
def test_bad_settings_raise_clear_errors(setting, value, words):
    called = []
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        train(TrainConfig(**{setting: value}), sample_batch=lambda *a: called.append(1))
    assert not called  # rejected before any work


def test_cosine_schedule_reaches_the_optimizer_and_resumes_exactly(tmp_path):
    from cfg_distill.training import lr_at

    config = TrainConfig(steps=12, batch_size=4, lr_schedule="cosine", save_every=4, **FAST)
    assert lr_at(config, 0) == config.lr and lr_at(config, 12) == 0.0
    assert lr_at(config, 6) == pytest.approx(config.lr / 2)
    assert lr_at(TrainConfig(**FAST), 7) == FAST["lr"]
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        full = train(config)
    finally:
        torch.optim.AdamW.step = real_step
    assert seen == pytest.approx([lr_at(config, s) for s in range(12)])
    assert train(TrainConfig(steps=12, batch_size=4, **FAST)).losses != full.losses  # the schedule matters

    path = str(tmp_path / "cosine.safetensors")
    done = []
    first = train(config, state_path=path, should_stop=lambda: len(done) >= 5, on_step=lambda s, *_: done.append(s))
    assert first.cancelled and first.step == 5
    resumed = train(config, state_path=path, resume=True)
    assert resumed.losses == full.losses
    for k, v in weights(full.refiner).items():
        assert torch.equal(v, resumed.refiner.state_dict()[k]), k


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="token_dim"):
        train_refiner(TrainConfig(steps=1), sampler(2), TOY.teacher, TOY.student, token_dim=0)
    with pytest.raises(ValueError, match="prompt tokens are 32-d but the refiner is 768-d"):
        train_refiner(TrainConfig(steps=1, batch_size=2, **FAST), sampler(2), TOY.teacher, TOY.student, token_dim=768)
    # resuming needs a training state of the same shape; a plain refiner file is refused clearly
    path = str(tmp_path / "state.safetensors")
    train(TrainConfig(steps=2, batch_size=2, **FAST), state_path=path)
    with pytest.raises(TrainingStateError, match="heads"):
        train(TrainConfig(steps=3, batch_size=2, inner_dim=32, heads=4), state_path=path, resume=True)
    plain = str(tmp_path / "refiner.safetensors")
    save_refiner(plain, new_refiner(D, 64, 4), new_refiner_info())
    with pytest.raises(TrainingStateError, match="plain refiner"):
        train(TrainConfig(steps=3, batch_size=2, **FAST), state_path=plain, resume=True)
    with pytest.warns(UserWarning, match="CUDA only"):  # CPU hosts fall back to fp32
        assert train(TrainConfig(steps=1, batch_size=2, autocast="bf16", **FAST)).step == 1


def new_refiner_info():
    from cfg_distill.refiner_file import RefinerInfo
    return RefinerInfo(token_dim=D, inner_dim=64, heads=4)


def test_state_file_is_plain_safetensors(tmp_path):
    path = str(tmp_path / "state.safetensors")
    result = train(TrainConfig(steps=3, batch_size=2, **FAST), state_path=path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))  # a JSON header, then raw tensor bytes: nothing to unpickle
    assert all(set(v) == {"dtype", "shape", "data_offsets"} for k, v in header.items() if k != "__metadata__")
    with safe_open(path, framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    state_meta = json.loads(meta["cfg_distill_training"])
    assert state_meta["step"] == 3 and state_meta["config"]["lr"] == 2e-3
    assert {"fc1.weight", "fc2.bias", "optim.fc2.weight.exp_avg", "optim.fc2.weight.exp_avg_sq",
            "optim.fc2.weight.step", "rng.rank0.torch_cpu", "rng.rank0.generator", "losses"} <= keys
    assert load_file(path)["losses"].tolist() == result.losses
    # and the module itself never uses pickle / torch.save
    import cfg_distill.training as module
    source = open(module.__file__).read()
    assert "torch.save" not in source and "import pickle" not in source and "torch.load" not in source


# ---------------------------------------------------------------------------------------------
# Gradient accumulation and data parallel: both must equal one big batch.

POOL_BATCH = 4  # per rank / micro-batch; the global batch is 8


def pool_sampler(shards: int):
    """Step-determined global batch of 8 from a shared pool; shard s of `shards` goes to rank or micro s."""
    calls = {}

    def sample_batch(step: int, g: torch.Generator) -> Batch:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        micro = calls[step] = calls.get(step, -1) + 1
        shard = rank if world > 1 else micro
        full = make_batch(TRAIN_C, torch.Generator().manual_seed(1000 + step), 2 * POOL_BATCH)
        size = 2 * POOL_BATCH // shards
        take = slice(shard * size, (shard + 1) * size)
        return Batch(full.x_t[take], full.sigma[take], full.c[take], UC)
    return sample_batch


def test_grad_accum_equals_one_big_batch():
    config = TrainConfig(steps=8, batch_size=2 * POOL_BATCH, **FAST)
    big = train(config, sample_batch=pool_sampler(1))
    accum = train(TrainConfig(**{**config.__dict__, "batch_size": POOL_BATCH, "grad_accum": 2}),
                  sample_batch=pool_sampler(2))
    assert accum.losses == pytest.approx(big.losses, rel=1e-5)
    for k, v in weights(big.refiner).items():
        assert torch.allclose(accum.refiner.state_dict()[k], v, atol=1e-5), k


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = TrainConfig(steps=12, batch_size=POOL_BATCH, **FAST)
        done = []
        # only rank 1 asks to stop: all ranks must stop together after 10 steps
        result = train(config, sample_batch=pool_sampler(world),
                       state_path=os.path.join(out_dir, f"state_rank{rank}.safetensors"),
                       on_step=lambda s, *_: done.append(s), should_stop=lambda: rank == 1 and len(done) >= 10)
        tensors = {k: v.contiguous() for k, v in result.refiner.state_dict().items()}
        tensors["losses"] = torch.tensor(result.losses, dtype=torch.float64)
        tensors["step"] = torch.tensor([result.step, int(result.cancelled)])
        save_file(tensors, os.path.join(out_dir, f"result_rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = train(TrainConfig(steps=10, batch_size=2 * POOL_BATCH, **FAST), sample_batch=pool_sampler(1))
    r0, r1 = (load_file(str(tmp_path / f"result_rank{r}.safetensors")) for r in (0, 1))
    assert r0["step"].tolist() == r1["step"].tolist() == [10, 1]  # both cancelled at 10
    assert not (tmp_path / "state_rank1.safetensors").exists()  # only rank 0 writes
    state = load_training_state(str(tmp_path / "state_rank0.safetensors"))
    assert state.step == 10 and state.world_size == 2 and set(state.rng) == {0, 1}
    assert r0["losses"].tolist() == pytest.approx(single.losses, rel=1e-5)
    for k, v in weights(single.refiner).items():
        assert torch.equal(r0[k], r1[k]), k  # ranks stay in sync
        assert torch.allclose(r0[k], v, atol=1e-5), k
        assert torch.equal(state.refiner[k], r0[k])
