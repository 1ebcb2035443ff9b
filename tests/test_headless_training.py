"""The headless trainer (train_dice_refiner.py) as users run it: a subprocess with the real ComfyUI in
library mode and a tiny generated SD1.5-architecture checkpoint (64x64 px, a few steps).

- a fresh run writes the same refiner file as the node, with full metadata;
- --resume continues the step count and lands on the same weights as an uninterrupted run;
- Ctrl-C (SIGINT) stops after the current step and saves both files;
- two processes under torchrun (CPU / gloo) write one file whose refiner closes part of the held-out
  CFG gap; one process at twice the batch, fed the samples the ranks drew, reproduces its losses
  and weights.
"""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cfg_distill.refiner_file import load_refiner, short_hash_of_file
from cfg_distill.training import load_training_state, new_refiner
from tools.comfy_env import COMFY_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_dice_refiner.py")
CKPT = "tiny-sd15.safetensors"
TRAIN_PROMPTS = ["a red fox standing in fresh snow", "a lighthouse on a cliff at dusk", "a bowl of ramen"]
HELD_OUT = ["a blue vintage car parked in a narrow street", "portrait of an elderly sailor, oil painting",
            "a field of sunflowers under a stormy sky", "a glass teapot on a wooden table"]
# One thread per process: on a small shared machine, OpenMP threads spinning against other loads make
# each step ~10x slower (measured); torchrun sets the same for its workers.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# lr: higher than the paper's 2e-4 so that a handful of steps visibly moves the refiner.
COMMON = ["--width", "64", "--height", "64", "--x0-steps", "1", "--lr", "2e-3", "--log-every", "1",
          "--save-every", "0", "--seed", "3", "--grad-accum", "1"]  # 1: the step counts below are micro-batches


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    if not os.path.isfile(os.path.join(COMFY_DIR, "main.py")):
        pytest.fail(f"ComfyUI is not installed at {COMFY_DIR}: run `bash tools/setup_env.sh`")
    from tools.tiny_models import write_tiny_sd15

    base = tmp_path_factory.mktemp("headless")
    (base / "ckpts").mkdir()
    write_tiny_sd15(str(base / "ckpts" / CKPT))
    (base / "prompts.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    # The checkpoint by name, as ComfyUI lists it, through an extra_model_paths.yaml
    (base / "extra_model_paths.yaml").write_text(f"headless_test:\n    base_path: {base}\n    checkpoints: ckpts\n")
    return base


def _cmd(work, out, *args, torchrun=0):
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
    return launcher + [SCRIPT, "--comfyui", COMFY_DIR, "--ckpt", str(work / "ckpts" / CKPT),
                       "--out-dir", str(out), "--prompts", str(work / "prompts.txt"), *COMMON, *args]


def run(work, out, *args, torchrun=0, expect=0, timeout=240):
    t0 = time.monotonic()
    proc = subprocess.run(_cmd(work, out, *args, torchrun=torchrun), cwd=str(work), capture_output=True,
                          text=True, timeout=timeout, env=ENV)
    text = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect}):\n{text[-6000:]}"
    print(f"[{time.monotonic() - t0:.1f}s] {' '.join(args)}")
    return text


def refiner_weights(path):
    return {k: v.clone() for k, v in load_refiner(str(path)).module.state_dict().items()}


_FULL = {}  # the uninterrupted 8-step run, shared by the first two tests


def full_run(work):
    if not _FULL:
        out = work / "full"
        _FULL["log"] = run(work, out, "--steps", "8", "--batch-size", "2", "--name", "full")
        _FULL["path"] = out / "full.safetensors"
    return _FULL


def test_trains_and_writes_the_node_s_file_with_metadata(work):
    full = full_run(work)
    assert sorted(os.listdir(full["path"].parent)) == ["full.dice-train-state", "full.safetensors"]
    loaded = load_refiner(str(full["path"]))
    info = loaded.info
    assert (info.base_family, info.token_dim, info.train_steps, info.guidance_scale) == ("sd15", 768, 8, 5.0)
    assert info.base_checkpoint == CKPT
    assert info.base_hash == short_hash_of_file(str(work / "ckpts" / CKPT))
    assert info.keep_first_token
    # What made it, so it can be re-run, and what it cost: 8 steps x batch 2 (x grad_accum 1)
    assert info.extra["teacher_samples"] == 8 * 2
    assert info.extra["command"].startswith("python -m cfg_distill train dice ")
    assert "--steps 8 --batch-size 2 --name full" in info.extra["command"]
    assert load_training_state(str(full["path"].parent / "full.dice-train-state")).config["lr_schedule"] == "cosine"
    assert re.search(r"step 8/8 loss [0-9.]+", full["log"])
    assert "done after 8 steps" in full["log"]
    # The held-out progress check, at the start and every step of this short run: in the log while
    # training, in the summary and in the file (the series a user can plot)
    assert [s for s, _ in info.extra["checks"]] == list(range(9))
    assert re.search(r"held-out check at step 4/8: \d+% of the start's gap left \((down|up) [0-9.]+ points since "
                     r"step 3\)", full["log"]), full["log"][-3000:]
    assert "Held-out check: " in full["log"] and "(9 checks, steps 0-8)" in full["log"]
    # It learned something: the output layer starts at zero.
    assert loaded.module.fc2.weight.abs().sum() > 0
    state = load_training_state(str(full["path"].parent / "full.dice-train-state"))
    assert state.step == 8 and len(state.losses) == 8 and all(np.isfinite(state.losses))


def test_without_a_size_it_trains_at_the_checkpoint_s_own(work):
    """No --width / --height: the size the checkpoint's modelspec.resolution names, said in the log."""
    from tools.tiny_models import write_tiny_sd15

    ckpt = write_tiny_sd15(str(work / "ckpts" / "sized.safetensors"), metadata={"modelspec.resolution": "48x48"})
    out = work / "sized"
    common = [a for i, a in enumerate(COMMON) if a not in ("--width", "--height")
              and COMMON[i - 1] not in ("--width", "--height")]
    proc = subprocess.run([sys.executable, SCRIPT, "--comfyui", COMFY_DIR, "--ckpt", ckpt, "--out-dir", str(out),
                           "--prompts", str(work / "prompts.txt"), *common, "--steps", "1", "--batch-size", "1",
                           "--name", "sized"], cwd=str(work), capture_output=True, text=True, timeout=240, env=ENV)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "the model's own size" in text  # the settings line, before the model is known
    assert "training at 48x48 px (the checkpoint's modelspec.resolution)" in text


def test_negative_prompts_file_trains_a_refiner_that_supports_negatives(work):
    assert not load_refiner(str(full_run(work)["path"])).info.negatives  # "" only by default
    (work / "negatives.txt").write_text("blurry\nred\n\na blue car at night\n", encoding="utf-8")
    out = work / "negs"
    run(work, out, "--steps", "2", "--batch-size", "2", "--name", "negs",
        "--negative-prompts", str(work / "negatives.txt"))
    assert load_refiner(str(out / "negs.safetensors")).info.negatives
    (work / "empty.txt").write_text("\n", encoding="utf-8")
    text = run(work, work / "bad", "--steps", "2", "--name", "bad", "--negative-prompts", str(work / "empty.txt"),
               expect=2)  # a bad request exits 2, as argparse's own errors do
    assert "has no negative prompts (one per line)" in text


def test_resume_continues_and_equals_an_uninterrupted_run(work):
    # A run extended to more steps continues exactly under a constant rate (a cosine falls to 0 over
    # each run's own --steps, so its extension is a new schedule).
    const = ("--lr-schedule", "constant")
    straight_out = work / "straight"
    run(work, straight_out, "--steps", "8", "--batch-size", "2", "--name", "straight", *const)
    out = work / "resume"
    run(work, out, "--steps", "4", "--batch-size", "2", "--name", "part", *const,
        "--ckpt", CKPT, "--extra-model-paths-config", str(work / "extra_model_paths.yaml"))  # by name
    info = load_refiner(str(out / "part.safetensors")).info
    assert info.train_steps == 4 and info.base_checkpoint == CKPT
    assert info.base_hash == short_hash_of_file(str(work / "ckpts" / CKPT))
    # Starting again without --resume would silently throw the saved run away: refused.
    refused = run(work, out, "--steps", "8", "--batch-size", "2", "--name", "part", *const, expect=2)
    assert "holds a saved run" in refused and "--resume" in refused
    log = run(work, out, "--steps", "8", "--batch-size", "2", "--name", "part", *const, "--resume")
    assert re.search(r"resuming .*part\.dice-train-state at step 4 of 8", log)
    assert "step 5/8" in log and "step 4/8" not in log
    info = load_refiner(str(out / "part.safetensors")).info
    assert info.train_steps == 8 and info.base_checkpoint == CKPT
    resumed, straight = refiner_weights(out / "part.safetensors"), refiner_weights(straight_out / "straight.safetensors")
    worst = max(float((resumed[k] - straight[k]).abs().max()) for k in straight)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"
    assert load_training_state(str(out / "part.dice-train-state")).losses == \
        load_training_state(str(straight_out / "straight.dice-train-state")).losses


def test_ctrl_c_stops_after_the_step_and_saves(work):
    out = work / "cancel"
    proc = subprocess.Popen(_cmd(work, out, "--steps", "200", "--batch-size", "2", "--name", "cancel"),
                            cwd=str(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "step 1/200" in line:
                proc.send_signal(signal.SIGINT)
                break
        lines += proc.stdout.readlines()
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    assert rc == 130, log[-4000:]
    assert "stopping after the current step" in log and "cancelled; saved" in log
    state = load_training_state(str(out / "cancel.dice-train-state"))
    assert 1 <= state.step <= 3  # the step in progress when the signal came is finished, no more
    info = load_refiner(str(out / "cancel.safetensors")).info
    assert info.train_steps == state.step and info.base_family == "sd15"
    assert "Traceback" not in log


@pytest.fixture(scope="module")
def comfy_model(work):
    """The checkpoint and the pack loaded in this process (library mode), for measure_gap."""
    from tools.comfy_env import load_pack, use_comfy_library

    use_comfy_library()
    
    name = "cfg_distill_pack"
    load_pack()
    import comfy.sd

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, clip = comfy.sd.load_checkpoint_guess_config(str(work / "ckpts" / CKPT), output_vae=False)[:2]
    yield sys.modules[name + ".nodes.evaluate_node"], model, clip
    torch.set_num_threads(threads)


def _same_data_single_process(pack, model, clip, steps, batch_per_rank, world, seed):
    """One process, batch world x batch_per_rank, fed exactly the samples the ranks drew.

    Built like run_training (same prompts, null encoding, x0 pool, refiner init, settings). Rank r's
    generator is seeded with seed + r by the core; here rank 0's is the loop's own generator and the
    others are extra generators, advanced in step. Sum-over-batch losses divided by the batch, averaged
    over equal-sized ranks, equal the loss of the concatenated batch, and so do the gradients."""
    from cfg_distill.training import Batch, TrainConfig, train_refiner

    ct = sys.modules[pack + ".nodes.comfy_training"]
    ch = sys.modules[pack + ".nodes.comfy_host"]
    from cfg_distill.request import TrainRequest
    from cfg_distill.run import Reporter

    lr = float(COMMON[COMMON.index("--lr") + 1])
    x0_steps = int(COMMON[COMMON.index("--x0-steps") + 1])
    with torch.inference_mode(False), torch.enable_grad():
        encoded, null = ct.encode_prompts(clip, TRAIN_PROMPTS), ct.encode_prompts(clip, [""])[0]
        host = ct.ComfyDistillHost(model, encoded, null, 5.0, batch_per_rank)
        host.load()
        try:
            request = TrainRequest(method="dice", prompts=TRAIN_PROMPTS, x0_steps=x0_steps, seed=seed, width=64,
                                   height=64).validate()
            ch.ComfyTrainingHost(model, clip)._fill_pool(host, request, encoded, Reporter())
            others = [torch.Generator().manual_seed(seed + r) for r in range(1, world)]

            def sample_batch(step, g):
                parts = [host.sample_batch(step, g)] + [host.sample_batch(step, o) for o in others]
                return Batch(x_t=torch.cat([b.x_t for b in parts]), sigma=torch.cat([b.sigma for b in parts]),
                             c=torch.cat([b.c for b in parts]), uc=parts[0].uc,
                             extra={"prompts": [p for b in parts for p in b.extra["prompts"]]})

            config = TrainConfig(guidance_scale=5.0, steps=steps, batch_size=world * batch_per_rank, lr=lr,
                                 loss="l2", seed=seed, save_every=0, lr_schedule="cosine")  # the CLI's default
            return train_refiner(config, sample_batch, host.teacher, host.student, token_dim=768, device="cpu")
        finally:
            host.cleanup()


def test_torchrun_two_cpu_processes(work, comfy_model):
    evaluate_node, model, clip = comfy_model
    steps, batch, seed = 8, 2, int(COMMON[COMMON.index("--seed") + 1])
    ddp_out = work / "ddp"
    log = run(work, ddp_out, "--steps", str(steps), "--batch-size", str(batch), "--name", "ddp", "--cpu",
              torchrun=2)
    assert sorted(os.listdir(ddp_out)) == ["ddp.dice-train-state", "ddp.safetensors"]  # rank 0 only
    assert "2 process(es) (gloo)" in log
    assert log.count("DICE refiner saved after") == 1 and log.count(f"step {steps}/{steps} loss") == 1
    # the held-out progress check runs on rank 0 only: one line per check, the last at the end
    assert log.count(f"held-out check at step {steps}/{steps}") == 1 and "[rank 1]" not in \
        "".join(line for line in log.splitlines() if "held-out check" in line)
    ddp_state = load_training_state(str(ddp_out / "ddp.dice-train-state"))
    assert ddp_state.world_size == 2 and ddp_state.step == steps and sorted(ddp_state.rng) == [0, 1]

    refiner = load_refiner(str(ddp_out / "ddp.safetensors"))
    assert refiner.info.train_steps == steps and refiner.info.base_family == "sd15"
    assert refiner.info.extra["teacher_samples"] == steps * batch * 2  # x 2 processes
    t0 = time.monotonic()
    gap = evaluate_node.measure_gap(model, clip, refiner, HELD_OUT, 5.0, batches=4, batch_size=2, width=64,
                                    height=64, seed=4321, x0_steps=1)
    print(f"[{time.monotonic() - t0:.1f}s] measure_gap")
    print(f"held-out gap, 2 ranks x batch {batch}: refined {gap.refined:.4g} vs cfg 1 {gap.baseline:.4g} "
          f"(ratio {gap.ratio:.3f})")
    assert gap.refined < 0.9 * gap.baseline

    # Versus one process at twice the batch. A plain `--batch-size 4` run would draw all 4 samples per
    # step from the generator seeded with `seed`, whereas rank r draws its 2 from seed + r: different
    # samples, and this loss is heavy-tailed (it is dominated by the few samples at large sigma; per
    # sample its standard deviation is about 1.7x its mean here), so two such 8-step curves differ by
    # up to ~50% in their mean by chance alone. Fed the ranks' own samples, the single process must
    # reproduce the distributed run up to float rounding (batch 4 vs 2 per forward, 2 vs 1 threads).
    t0 = time.monotonic()
    single = _same_data_single_process(evaluate_node.__name__.rsplit(".", 2)[0], model, clip, steps, batch, 2, seed)
    print(f"[{time.monotonic() - t0:.1f}s] same-data single process")
    print("losses, 2 ranks x 2:", np.round(ddp_state.losses, 4).tolist())
    print("losses, 1 process x 4 (same samples):", np.round(single.losses, 4).tolist())
    assert single.losses == pytest.approx(ddp_state.losses, rel=1e-4)
    # Weights: AdamW divides each gradient by its running RMS (+ eps 1e-8), so where a gradient is
    # itself ~1e-8 (attention / fc1 entries in the first steps: the output layer starts at zero)
    # rounding-level differences become visible. Hence a bound relative to how far training moved.
    init = new_refiner(768, seed=seed).state_dict()
    ddp_w = refiner.module.state_dict()
    for k, v in single.refiner.state_dict().items():
        moved = float((ddp_w[k] - init[k]).norm())
        diff = float((v - ddp_w[k]).norm())
        print(f"{k}: |moved| {moved:.3g}, |single - ddp| {diff:.2e}")
        assert diff <= 1e-3 * moved + 1e-6, k
