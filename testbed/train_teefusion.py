"""Train the testbed's TeEFusion student LoRA with this pack's own trainer (the Train TeEFusion node's
run_teefusion_training, in ComfyUI library mode), on real training images of the testbed (VAE-encoded)
with their prompts, w drawn per sample from [w_min, w_max]. Held-out combinations are never used.

    python -m testbed.train_teefusion        -> weights/testbed/testbed-teefusion-lora.safetensors (float16)

As in testbed.train_refiner, the text encoder's identity layers are skipped (bit-identical encodings).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from testbed import data  # noqa: E402
from testbed.model import WEIGHTS_DIR  # noqa: E402

LORA_FILE = "testbed-teefusion-lora.safetensors"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--loss", choices=["l1", "l2"], default="l2")
    ap.add_argument("--w-min", type=float, default=2.0)
    ap.add_argument("--w-max", type=float, default=8.0)
    ap.add_argument("--per-combo", type=int, default=2, help="training images per training combination")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(WEIGHTS_DIR, LORA_FILE))
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "testbed", "teefusion"))
    ap.add_argument("--ckpt-dir", default=os.path.join(ROOT, "out", "testbed"))
    ap.add_argument("--weights", default=WEIGHTS_DIR, help="folder with the testbed's unet / vae weights")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    ap.add_argument("--init", default=None, help="continue from this student LoRA (e.g. the committed one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("TESTBED_THREADS", "2")))

    from testbed.assemble import assemble
    from testbed.bench import load_pack
    from testbed.train_refiner import skip_identity_layers, training_set

    pack = load_pack()
    import comfy.sd
    import folder_paths

    comfy_host = sys.modules[pack.__name__ + ".nodes.comfy_host"]
    TrainRequest = sys.modules[pack.__name__ + ".cfg_distill.request"].TrainRequest
    os.makedirs(args.work, exist_ok=True)
    folder_paths.add_model_folder_path(comfy_host.LORA_FOLDER, args.work, is_default=True)
    ckpt = assemble(args.ckpt_dir, args.weights, force=args.weights != WEIGHTS_DIR)
    folder_paths.add_model_folder_path("checkpoints", os.path.dirname(ckpt), is_default=True)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt)[:3]
    skip_identity_layers(clip)
    images, prompts = training_set(args.per_combo, args.seed + 11)
    print(f"training a TeEFusion LoRA (rank {args.rank}) for w in [{args.w_min:g}, {args.w_max:g}] on {len(prompts)} "
          f"training images; {args.steps} steps x batch {args.batch_size}, lr {args.lr:g}, {args.loss}", flush=True)
    started = time.monotonic()

    def on_step(step, total, loss, elapsed, eta):
        if step % 25 == 0 or step == total:
            print(f"[{time.strftime('%H:%M:%S')}] step {step}/{total} loss {loss:.4g} eta {eta:.0f}s", flush=True)

    name = os.path.splitext(os.path.basename(args.out))[0]
    request = TrainRequest(method="teefusion", name=name, prompts=prompts, w_min=args.w_min, w_max=args.w_max,
                           steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank, loss=args.loss,
                           width=data.SIZE, height=data.SIZE, seed=args.seed, save_every=100, resume=args.resume,
                           images=images, lr_schedule=args.lr_schedule, start_from=args.init or "")
    out = comfy_host.train(request, model, clip, vae, checkpoint=os.path.basename(ckpt), on_step=on_step)
    file_name = os.path.basename(out.path)
    seconds = time.monotonic() - started
    src = os.path.join(args.work, file_name)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["testbed_training"] = json.dumps(dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank,
                                               loss=args.loss, images=len(prompts), seconds=round(seconds),
                                               w_min=args.w_min, w_max=args.w_max, lr_schedule=args.lr_schedule,
                                               init=os.path.basename(args.init) if args.init else None))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out + ".tmp", metadata=meta)
    os.replace(args.out + ".tmp", args.out)
    size = os.path.getsize(args.out)
    print(f"LoRA trained in {seconds:.0f}s; saved {args.out} ({size / 1e6:.2f} MB, {len(tensors)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
