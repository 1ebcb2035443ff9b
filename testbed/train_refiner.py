"""Train the testbed's DICE refiner with this pack's own trainer (the Train DICE Refiner node's
run_training, in ComfyUI library mode, as the headless trainer calls it), on real training images of
the testbed (VAE-encoded, as in the paper) with their prompts, at w = 5. Held-out combinations are
never used.

    python -m testbed.train_refiner          -> weights/testbed/testbed-dice-w5.safetensors (float16)

The text encoder's identity layers are skipped while the captions are encoded (bit-identical result,
see testbed.textcache) - the only deviation from the node's path, and only for speed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from testbed import data, textenc  # noqa: E402
from testbed.model import REFINER_FILE, WEIGHTS_DIR  # noqa: E402


def skip_identity_layers(clip) -> None:
    """Drop the text encoder's zero-residual layers from a loaded CLIP (exact: they add 0.0)."""
    te = clip.cond_stage_model.clip_l.transformer.text_model.encoder
    for layer in te.layers[textenc.ACTIVE_LAYERS:]:
        for p in layer.parameters():
            if p.ndim == 2 and bool(p.any()):
                raise RuntimeError("the text encoder's upper layers are not zero: not the testbed encoder")
    te.layers = te.layers[:textenc.ACTIVE_LAYERS]


def training_set(per_combo: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    train, _held = data.split()
    images, _index, prompts = data.make_set(train, per_combo, seed)
    return torch.from_numpy(images), prompts


OPEN_TEMPLATES = {  # captions that leave one attribute open (still true of the image)
    "color": ("a {shape} on a {background} background, {position}", "{position}: {shape}, {background} background",
              "a {background} background with a {shape} in the {position}", "{shape} in the {position}, {background} backdrop"),
    "background": ("a {color} {shape}, {position}", "{position}: {color} {shape}",
                   "a {color} {shape} in the {position}", "{color} {shape} in the {position}"),
}


def open_captions(prompts: list[str], seed: int, share: float) -> list[str]:
    """Replace a share of the captions by one that leaves the shape colour or the background open, so
    that a negative naming a value of it has something to act on. Images whose open caption would
    also describe a held-out combination keep their full caption (no held-out prompt text in training)."""
    train, held = data.split()
    held_open = {(h.shape, h.background, h.position) for h in held} | {(h.color, h.shape, h.position) for h in held}
    images_per_pass = len(train)
    rng = np.random.default_rng(seed)
    out = list(prompts)
    for i in range(len(out)):
        if rng.random() >= share:
            continue
        c = train[i % images_per_pass]
        which = "color" if rng.random() < 0.5 else "background"
        key = (c.shape, c.background, c.position) if which == "color" else (c.color, c.shape, c.position)
        if key in held_open:
            continue
        t = OPEN_TEMPLATES[which]
        out[i] = t[int(rng.integers(len(t)))].format(**c.__dict__)
    return out


def training_negatives(seed: int, full_prompts: int = 200) -> list[str]:
    """Negative prompts a user might write, from training attributes only: single attribute values
    ("red", "circle", "blue background", "top left", "a red shape") and full training prompts, half
    of them colour-swapped (the attribute-binding error). Held-out combinations never appear."""
    out = []
    for col in data.COLORS:
        out += [col, f"a {col} shape", f"{col} background"]
    out += list(data.SHAPES) + list(data.POSITIONS)
    train, _held = data.split()
    rng = np.random.default_rng(seed)
    train_set = set(train)
    for i, k in enumerate(rng.choice(len(train), full_prompts, replace=False)):
        c = train[int(k)]
        swapped = data.Combo(c.background, c.shape, c.color, c.position)
        if i % 2 and swapped in train_set:
            c = swapped
        out.append(c.prompt(int(rng.integers(len(data.TEMPLATES)))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--loss", choices=["l1", "l2"], default="l2")
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--per-combo", type=int, default=2, help="training images per training combination")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(WEIGHTS_DIR, REFINER_FILE))
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "testbed", "refiner"))
    ap.add_argument("--ckpt-dir", default=os.path.join(ROOT, "out", "testbed"))
    ap.add_argument("--weights", default=WEIGHTS_DIR, help="folder with the testbed's unet / vae weights")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--percent-range", default="0,1",
                    help="train on this sampling-percent range only (start,end; 0 = first step): one range of a "
                         "K-range refiner (see testbed.combine_ranges)")
    ap.add_argument("--negative-share", type=float, default=0.0,
                    help="share of samples whose second input is a negative prompt (teacher: CFG with it)")
    ap.add_argument("--full-negatives", type=int, default=200,
                    help="full prompts among the negatives (the other 27 are single attribute values: fewer full "
                         "prompts make short negatives such as 'red' a larger share)")
    ap.add_argument("--open-captions", type=float, default=0.0,
                    help="share of captions that leave the shape colour or the background open")
    ap.add_argument("--init", default=None, help="start from this (single) refiner file instead of zero output")
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    ap.add_argument("--inner-dim", type=int, default=None,
                    help="refiner width when training from zero (default: the official 512); the loader reads any")
    ap.add_argument("--w-range", default=None, help="min,max: one refiner for every w in this range (w an input; "
                                                      "--guidance-scale is its reference w)")
    ap.add_argument("--w-input-scale", type=float, default=None,
                    help="with --w-range: how strongly the refiner's input moves with w, c + s (w - w_ref)(c - uc) "
                         "(default: the node's)")
    ap.add_argument("--trajectory-share", type=float, default=0.0,
                    help="share of each batch drawn from sampling trajectories (the bench's sampler, 20 steps) "
                         "instead of forward-noised images")
    ap.add_argument("--trajectories", type=int, default=256, help="how many trajectories to sample for that")
    ap.add_argument("--trajectory-schedule", default=None, metavar="SAMPLER/SCHEDULER/STEPS",
                    help="sample the trajectories with this instead of the bench's (e.g. euler/normal/25: steps "
                         "evenly spread over the noise levels, as forward noising draws them)")
    ap.add_argument("--trajectory-student", action="store_true",
                    help="half of those trajectories are the --init refiner's own at cfg 1 (else all are CFG's)")
    ap.add_argument("--one-level-per-batch", action="store_true",
                    help="one noise level per batch, as the official recipe draws one integer t per batch")
    ap.add_argument("--query-noise", type=float, default=0.0,
                    help="probe: Gaussian noise on the refiner's prompt input while training, as a share of each "
                         "token's RMS (the correction is still added to the clean tokens)")
    ap.add_argument("--hidden-dropout", type=float, default=0.0,
                    help="probe: dropout on the refiner's first layer while training")
    ap.add_argument("--splice-share", type=float, default=0.0,
                    help="probe: share of samples whose prompt tokens are spliced from two prompts of the batch "
                         "(first k tokens of one, the rest of another; teacher and student see the same tokens)")
    args = ap.parse_args(argv)
    percent_range = tuple(float(v) for v in args.percent_range.split(","))
    torch.set_num_threads(int(os.environ.get("TESTBED_THREADS", "2")))

    from testbed.assemble import assemble
    from testbed.bench import load_pack

    pack = load_pack()
    import comfy.sd
    import folder_paths

    comfy_host = sys.modules[pack.__name__ + ".nodes.comfy_host"]
    folders = sys.modules[pack.__name__ + ".nodes.folders"]
    TrainRequest = sys.modules[pack.__name__ + ".cfg_distill.request"].TrainRequest
    os.makedirs(args.work, exist_ok=True)
    folder_paths.add_model_folder_path(folders.FOLDER, args.work, is_default=True)
    ckpt = assemble(args.ckpt_dir, args.weights, force=args.weights != WEIGHTS_DIR)
    folder_paths.add_model_folder_path("checkpoints", os.path.dirname(ckpt), is_default=True)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt)[:3]
    skip_identity_layers(clip)
    images, prompts = training_set(args.per_combo, args.seed + 11)
    if args.open_captions:
        prompts = open_captions(prompts, args.seed + 31, args.open_captions)
    print(f"training a DICE refiner at w={args.guidance_scale:g} on {len(prompts)} training images / prompts; "
          f"{args.steps} steps x batch {args.batch_size}, lr {args.lr:g}, {args.loss}", flush=True)
    started = time.monotonic()

    def on_step(step, total, loss, elapsed, eta):
        if step % 25 == 0 or step == total:
            print(f"[{time.strftime('%H:%M:%S')}] step {step}/{total} loss {loss:.4g} eta {eta:.0f}s", flush=True)

    name = os.path.splitext(os.path.basename(args.out))[0]
    w_range = tuple(float(v) for v in args.w_range.split(",")) if args.w_range else (0.0, 0.0)
    request = TrainRequest(
        method="dice", name=name, prompts=prompts, guidance_scale=args.guidance_scale, steps=args.steps,
        batch_size=args.batch_size, grad_accum=1, lr=args.lr, loss=args.loss, width=data.SIZE, height=data.SIZE,
        seed=args.seed, save_every=100, resume=args.resume, images=images, lr_schedule=args.lr_schedule,
        negative_prompts=training_negatives(args.seed + 23, args.full_negatives), negative_share=args.negative_share,
        w_min=w_range[0], w_max=w_range[1], w_input_scale=args.w_input_scale, percent_range=percent_range,
        one_level_per_batch=args.one_level_per_batch, start_from=args.init or "", inner_dim=args.inner_dim or 512)
    out = comfy_host.train(request, model, clip, vae, checkpoint=os.path.basename(ckpt), on_step=on_step,
                           trajectories=_trajectories(pack, args), hooks=regularisers(args))
    loaded = out.refiner
    seconds = time.monotonic() - started
    src = os.path.join(args.work, f"{name}.safetensors")
    # Commit as float16 (half the size); the loader computes in float32 either way.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k).to(torch.float16) for k in f.keys()}
    meta["testbed_training"] = json.dumps(dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                               loss=args.loss, images=len(prompts), seconds=round(seconds),
                                               guidance_scale=args.guidance_scale,
                                               percent_range=list(percent_range),
                                               negative_share=args.negative_share,
                                               open_captions=args.open_captions, full_negatives=args.full_negatives,
                                               init=os.path.basename(args.init) if args.init else None,
                                               lr_schedule=args.lr_schedule, seed=args.seed,
                                               inner_dim=args.inner_dim, w_input_scale=args.w_input_scale,
                                               w_range=args.w_range, trajectory_share=args.trajectory_share,
                                               trajectories=args.trajectories,
                                               trajectory_schedule=args.trajectory_schedule,
                                               trajectory_student=args.trajectory_student,
                                               one_level_per_batch=args.one_level_per_batch,
                                               query_noise=args.query_noise, hidden_dropout=args.hidden_dropout,
                                               splice_share=args.splice_share))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out + ".tmp", metadata=meta)
    os.replace(args.out + ".tmp", args.out)
    print(f"refiner trained in {seconds:.0f}s ({loaded.info.summary()}); saved {args.out}")
    np.save(os.path.join(args.work, "losses.npy"), np.array(_losses_of(src)))
    return 0


def _trajectories(pack, args):
    if not args.trajectory_share:
        return None
    from testbed.bench import SAMPLER, SCHEDULER

    host = sys.modules[pack.__name__ + ".nodes.comfy_training"]
    student = None
    if args.trajectory_student:
        if not args.init:
            raise SystemExit("--trajectory-student samples with the --init refiner: give --init")
        student = sys.modules[pack.__name__ + ".cfg_distill"].load_refiner(args.init)
    sampler, scheduler, steps = (args.trajectory_schedule or f"{SAMPLER}/{SCHEDULER}/20").split("/")
    return host.TrajectoryPoints(share=args.trajectory_share, count=args.trajectories, steps=int(steps),
                                 sampler=sampler, scheduler=scheduler, student=student)


def regularisers(args):
    """Probes for how the refiner generalises to unseen combinations (RESULTS_dice round 8), as the
    engine's hooks (cfg_distill.training.TrainingHooks): training-only forward hooks on the refiner the
    run trains, and spliced prompt tokens in its batches. None when no probe is asked for."""
    if not (args.query_noise or args.hidden_dropout or args.splice_share):
        return None
    from cfg_distill.training import TrainingHooks  # the engine calls its two fields, nothing else

    hooks = TrainingHooks()
    if args.query_noise or args.hidden_dropout:
        hooks.on_refiner = lambda refiner: _hook(refiner, args)
    if args.splice_share:
        def spliced(batch, g):
            n = batch.c.shape[0]
            pick = (torch.rand(n, generator=g) < args.splice_share).tolist()
            other = torch.randint(n, (n,), generator=g).tolist()
            cut = torch.randint(1, 17, (n,), generator=g).tolist()
            c = batch.c.clone()
            for i in range(n):
                if pick[i] and other[i] != i:
                    c[i, cut[i]:] = batch.c[other[i], cut[i]:]
            batch.c = c
            return batch

        hooks.on_batch = spliced
    return hooks


def _hook(refiner, args) -> None:
    if args.query_noise:
        def noisy_query(module, inputs):
            c, uc = inputs
            if not module.training:
                return None
            rms = c.pow(2).mean(-1, keepdim=True).sqrt()
            return c + args.query_noise * rms * torch.randn_like(c), uc
        refiner.register_forward_pre_hook(noisy_query)
    if args.hidden_dropout:
        refiner.fc1.register_forward_hook(
            lambda m, _i, out: torch.nn.functional.dropout(out, args.hidden_dropout, m.training))


def _losses_of(path: str) -> list[float]:
    state = os.path.splitext(path)[0] + ".dice-train-state"
    if not os.path.exists(state):
        return []
    from safetensors import safe_open

    with safe_open(state, framework="pt") as f:
        return f.get_tensor("losses").tolist()


if __name__ == "__main__":
    sys.exit(main())
