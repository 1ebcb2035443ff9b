"""Train the testbed model from nothing, on this CPU, reproducibly:

    python -m testbed.train                     (writes weights/testbed/unet.safetensors, vae.safetensors)

Stages (each cached in --work, so an interrupted run continues where it stopped):
 1. data     render the training images (540 combinations x PER_COMBO variants; 60 held out) and
             their latents: the latent space is fixed by design (testbed.data.latents_of: 8x8-cell
             mean colour in channels 1-3, shape coverage x shape code in channel 4)
 2. text     encode all 2,160 training prompts (540 combinations x 4 phrasings) and "" with
             ComfyUI's own CLIP code on the regenerated frozen text encoder
 3. unet     train the UNet inside ComfyUI's SD1.5 model object (EPS prediction, ComfyUI's
             scaled-linear 1000-step schedule, the timestep conversion ComfyUI samples with), with
             noisy captions (data.CAPTION_NOISE: like web alt-text, 40% of the images carry another
             combination's caption), prompt dropout (the real "" encoding as the null), min-SNR-5
             loss weighting, AdamW, EMA
 4. vae      train the TAESD-format decoder to render those latents (with latent noise, so that it
             tolerates imperfect samples) and the encoder to produce them (for VAEEncode), from an
             init that already is a colour-thumbnail codec (testbed.model.build_taesd)
 5. save     float16 UNet (EMA) and VAE into --out

The UNet does not depend on the VAE (both learn the same designed latents), so the two stages can
also run as two processes (--stages). Seeds fix everything; torch's CPU kernels are deterministic
for a given thread count.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from testbed import data  # noqa: E402
from testbed.model import (UNET_FILE, VAE_FILE, WEIGHTS_DIR, build_sd15_model, build_taesd,  # noqa: E402
                           comfy_library)

PER_COMBO = 8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
def stage_data(work: str, seed: int) -> dict:
    path = os.path.join(work, "data.npz")
    if not os.path.exists(path):
        train, _held = data.split()
        images, index, _, latents = data.make_set(train, PER_COMBO, seed=seed, with_latents=True)
        np.savez(path, images=(images * 255).round().astype(np.uint8), index=np.array(index), latents=latents)
    z = np.load(path)
    return {"images": z["images"], "index": z["index"], "latents": torch.from_numpy(z["latents"])}


def train_vae(images_u8: np.ndarray, latents: torch.Tensor, steps: int, batch: int, seed: int, lr: float = 5e-4,
              noise: float = 0.1, enc_weight: float = 0.1, log_every: int = 25):
    """Decoder: latents (+ noise) -> images (MSE). Encoder: images -> latents (MSE). One optimizer."""
    vae = build_taesd(seed)
    log(f"vae init (thumbnail codec) ready; training {steps} steps x batch {batch}")
    vae = vae.to(memory_format=torch.channels_last)
    params = list(vae.taesd_encoder.parameters()) + list(vae.taesd_decoder.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps))))
    X = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(255)
    g = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    recs, encs = [], []
    for step in range(steps):
        i = torch.randint(len(X), (batch,), generator=g)
        x = X[i].contiguous(memory_format=torch.channels_last)
        lat = latents[i]
        y = vae.taesd_decoder((lat + noise * torch.randn(lat.shape, generator=g)).contiguous(
            memory_format=torch.channels_last))
        rec = (y - x).square().mean()
        enc = (vae.taesd_encoder(x) - lat).square().mean()
        loss = rec + enc_weight * enc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recs.append(rec.item())
        encs.append(enc.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            el = time.monotonic() - started
            log(f"vae step {step + 1}/{steps} decoder mse {np.mean(recs[-log_every:]):.5f} encoder mse "
                f"{np.mean(encs[-log_every:]):.4f}  {el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s")
    vae = vae.to(memory_format=torch.contiguous_format).eval()
    return vae


@torch.no_grad()
def encode_images(vae, images_u8: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Model-space latents: what ComfyUI's VAEEncode gives, times the SD1.5 scale factor."""
    out = []
    for i in range(0, len(images_u8), batch):
        x = torch.from_numpy(images_u8[i:i + batch]).permute(0, 3, 1, 2).float().div(255)
        raw = vae.encode(x * 2 - 1)  # ComfyUI: pixels*2-1 in; TAESD maps back to [0, 1]
        out.append(raw * 0.18215)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """[N, 4, h, w] model-space -> [N, H, W, 3] in [0, 1], as VAEDecode."""
    x = vae.decode(latents / 0.18215)
    return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


def train_unet(latents: torch.Tensor, prompt_of: np.ndarray, text: torch.Tensor, null: torch.Tensor, steps: int,
               batch: int, seed: int, lr: float = 3e-4, dropout: float = 0.15, ema_decay: float = 0.998,
               min_snr: float = 5.0, log_every: int = 25, state_path: str | None = None, save_every: int = 100,
               snapshot_every: int = 0):
    """latents [N,4,8,8]; prompt_of [N, P] indices into text (the phrasings of each image's combination)."""
    model = build_sd15_model()
    unet, ms = model.diffusion_model, model.model_sampling
    unet.train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps))))
    g = torch.Generator().manual_seed(seed)
    sigmas = ms.sigmas.float()
    start = 0
    if state_path and os.path.exists(state_path):
        st = torch.load(state_path, weights_only=True)
        unet.load_state_dict(st["unet"])
        ema = st["ema"]
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        g.set_state(st["gen"])
        start = int(st["step"])
        log(f"unet: resuming at step {start}")
    started = time.monotonic()
    losses = []
    for step in range(start, steps):
        idx = torch.randint(len(latents), (batch,), generator=g)
        which = torch.randint(prompt_of.shape[1], (batch,), generator=g)
        pidx = torch.as_tensor(prompt_of[idx.numpy(), which.numpy()])
        ctx = text[pidx]
        drop = torch.rand(batch, generator=g) < dropout
        ctx = torch.where(drop[:, None, None], null.expand_as(ctx), ctx)
        t = torch.randint(0, len(sigmas), (batch,), generator=g)
        sigma = sigmas[t]
        eps = torch.randn(latents[idx].shape, generator=g)
        x_t = latents[idx] + eps * sigma[:, None, None, None]
        x_in = x_t / (sigma[:, None, None, None] ** 2 + 1) ** 0.5  # ComfyUI EPS calculate_input
        pred = unet(x_in, t.float(), context=ctx)
        snr = 1.0 / sigma ** 2
        weight = torch.clamp(snr, max=min_snr) / snr
        loss = (weight * (pred - eps).square().mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    ema[k].copy_(v)
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            el = time.monotonic() - started
            log(f"unet step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{el:.0f}s, eta {el / (step + 1 - start) * (steps - step - 1):.0f}s")
        if state_path and snapshot_every and (step + 1) % snapshot_every == 0:
            torch.save(ema, os.path.join(os.path.dirname(state_path), f"unet_ema_step{step + 1}.pt"))
        if state_path and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            tmp = state_path + ".tmp"
            torch.save({"unet": unet.state_dict(), "ema": ema, "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": g.get_state(), "step": step + 1}, tmp)
            os.replace(tmp, state_path)
    return ema, losses


def save_fp16(sd: dict, path: str, meta: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    out = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(out, path + ".tmp", metadata={"testbed": json.dumps(meta, sort_keys=True)})
    os.replace(path + ".tmp", path)


STAGES = ("data", "text", "unet", "vae", "save")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train the cfg-distill testbed model (CPU, < 60 min).")
    ap.add_argument("--out", default=WEIGHTS_DIR)
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "testbed", "train"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--unet-lr", type=float, default=3e-4)
    ap.add_argument("--unet-ema", type=float, default=0.999)
    ap.add_argument("--snapshot-every", type=int, default=0, help="also keep the UNet's EMA every N steps (analysis)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--parallel", action="store_true",
                    help="after data and text, train the UNet and the VAE in two processes of --threads each "
                         "(use --threads 1 on a 2-core CPU); the result equals a sequential run with those threads")
    args = ap.parse_args(argv)
    stages = args.stages.split(",")
    if args.parallel:
        import subprocess

        base = [sys.executable, "-m", "testbed.train", "--out", args.out, "--work", args.work, "--seed", str(args.seed),
                "--vae-steps", str(args.vae_steps), "--vae-batch", str(args.vae_batch), "--unet-steps",
                str(args.unet_steps), "--unet-batch", str(args.unet_batch), "--unet-lr", str(args.unet_lr),
                "--threads", str(args.threads), "--unet-ema", str(args.unet_ema),
                "--snapshot-every", str(args.snapshot_every)]
        t0 = time.monotonic()
        subprocess.run(base + ["--stages", "data,text"], check=True, cwd=ROOT)
        procs = [subprocess.Popen(base + ["--stages", st], cwd=ROOT) for st in ("unet", "vae")]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"a training process failed: {codes}")
        subprocess.run(base + ["--stages", "save"], check=True, cwd=ROOT)
        log(f"wall clock {time.monotonic() - t0:.0f}s")
        return 0
    torch.set_num_threads(args.threads)
    comfy_library()
    os.makedirs(args.work, exist_ok=True)
    times = {}
    t_all = time.monotonic()
    def done(stage, t0):  # one file per stage: stages may run in parallel processes
        times[stage] = round(time.monotonic() - t0, 1)
        with open(os.path.join(args.work, f"seconds-{stage}.json"), "w") as f:
            json.dump(times[stage], f)

    t0 = time.monotonic()
    d = stage_data(args.work, args.seed + 1)
    if "data" in stages:
        done("data", t0)
    log(f"data: {len(d['images'])} images, latents {tuple(d['latents'].shape)} ({time.monotonic() - t0:.0f}s)")

    train_combos, _held = data.split()
    prompts = data.all_prompts(train_combos)  # combo i, phrasing t -> i * len(TEMPLATES) + t
    text_path = os.path.join(args.work, "text.pt")
    if "text" in stages or "unet" in stages:
        t0 = time.monotonic()
        if os.path.exists(text_path):
            enc = torch.load(text_path, weights_only=True)
            text, null = enc["text"], enc["null"]
        else:
            from testbed.textcache import FastEncoder

            fe = FastEncoder()
            null = fe.encode([""])
            text = fe.encode(prompts)
            torch.save({"text": text, "null": null}, text_path)
            done("text", t0)
        log(f"text encodings {tuple(text.shape)} ({time.monotonic() - t0:.0f}s)")

    ema_path = os.path.join(args.work, "unet_ema.pt")
    if "unet" in stages and not os.path.exists(ema_path):
        nt = len(data.TEMPLATES)
        captioned = data.noisy_caption_index(d["index"], len(train_combos), args.seed + 4)
        prompt_of = np.stack([captioned * nt + k for k in range(nt)], axis=1)
        t0 = time.monotonic()
        ema, losses = train_unet(d["latents"], prompt_of, text, null, args.unet_steps, args.unet_batch,
                                 args.seed + 3, lr=args.unet_lr, ema_decay=args.unet_ema,
                                 state_path=os.path.join(args.work, "unet_state.pt"), snapshot_every=args.snapshot_every)
        torch.save(ema, ema_path)
        with open(os.path.join(args.work, "unet_losses.json"), "w") as f:
            json.dump(losses, f)
        done("unet", t0)
        log(f"unet trained ({times['unet']:.0f}s)")

    vae_path = os.path.join(args.work, "vae.pt")
    if "vae" in stages and not os.path.exists(vae_path):
        t0 = time.monotonic()
        vae = train_vae(d["images"], d["latents"], args.vae_steps, args.vae_batch, args.seed + 2)
        torch.save(vae.state_dict(), vae_path)
        done("vae", t0)
        log(f"vae trained ({times['vae']:.0f}s)")

    if "save" in stages:
        for st in STAGES:
            path = os.path.join(args.work, f"seconds-{st}.json")
            if os.path.exists(path):
                with open(path) as f:
                    times[st] = json.load(f)
        meta = dict(seed=args.seed, vae_steps=args.vae_steps, vae_batch=args.vae_batch, unet_steps=args.unet_steps,
                    unet_batch=args.unet_batch, unet_lr=args.unet_lr, unet_ema=args.unet_ema, threads=args.threads,
                    per_combo=PER_COMBO, caption_noise=data.CAPTION_NOISE,
                    seconds=times)
        save_fp16(torch.load(ema_path, weights_only=True), os.path.join(args.out, UNET_FILE), meta)
        save_fp16(torch.load(vae_path, weights_only=True), os.path.join(args.out, VAE_FILE), meta)
        log(f"saved to {args.out}; this run {time.monotonic() - t_all:.0f}s; stage seconds {times} "
            f"(total {sum(times.values()):.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
