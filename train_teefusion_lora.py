#!/usr/bin/env python
"""Headless TeEFusion student training: the "Train TeEFusion" node without the UI, for long runs.

    python custom_nodes/ComfyUI-cfg-distill/train_teefusion_lora.py --ckpt v1-5-pruned-emaonly.safetensors \
        --w-min 2 --w-max 8 --steps 4000 --batch-size 8 --name sd15_teefusion

The same flags, Ctrl-C / --resume behaviour and torchrun support as train_dice_refiner.py (shared code).
It calls the node's own training function, so the result is the same file: a standard LoRA
models/loras/<name>.safetensors (metadata: method, w range, fusion, base model) and
<name>.teefusion-train-state next to it (--out-dir puts both in another folder). Use the LoRA with
LoraLoaderModelOnly, fuse the prompt at w (TeEFusion Conditioning; SD3: TeEFusion Model Patch), cfg 1.

    torchrun --standalone --nproc_per_node 4 train_teefusion_lora.py --ckpt ... --batch-size 8
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if PACK_DIR not in sys.path:
    sys.path.insert(0, PACK_DIR)
import train_dice_refiner as dice  # noqa: E402  (shared: Dist, ComfyUI import, Ctrl-C, progress)

log = logging.getLogger("cfg_distill.headless")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_teefusion_lora.py",
        description="Train a TeEFusion student LoRA for a checkpoint without the ComfyUI interface (same training "
                    "and output file as the 'Train TeEFusion' node). Multi-GPU: launch with torchrun.")
    p.add_argument("--ckpt", required=True, help="checkpoint: a name in ComfyUI's checkpoints folder(s) or a path")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_DIR, else two levels up)")
    p.add_argument("--extra-model-paths-config", action="append", default=[], metavar="YAML")
    p.add_argument("--name", default=None, help="LoRA file name in models/loras, no extension "
                                                "(default: <checkpoint>-teefusion-w<min>-<max>)")
    p.add_argument("--out-dir", default=None, help="save the LoRA and its training state here instead of models/loras")
    p.add_argument("--prompts", default=None, metavar="FILE", help="text file, one prompt per line")
    p.add_argument("--w-min", type=float, default=2.0, help="smallest guidance scale drawn (default %(default)s)")
    p.add_argument("--w-max", type=float, default=8.0, help="largest guidance scale drawn (default %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default %(default)s)")
    p.add_argument("--steps", type=int, default=2000, help="total optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="per process (default %(default)s)")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=1e-4,
                   help="AdamW learning rate (LoRA scale alpha / rank = 1; default %(default)g)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: the learning rate falls to 0 over --steps (default %(default)s)")
    p.add_argument("--init-lora", default=None, metavar="FILE",
                   help="continue from a student LoRA made by this pack for the same checkpoint and rank")
    p.add_argument("--loss", choices=["l2", "l1"], default="l2")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--x0-steps", type=int, default=8)
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-every", type=int, default=200)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the saved run of this name")
    group.add_argument("--overwrite", action="store_true", help="start afresh even if a saved run exists")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.x0_steps < 1 or args.save_every < 0 or args.log_every < 0 \
            or args.rank < 1:
        p.error("--steps, --batch-size, --x0-steps and --rank must be >= 1; --save-every and --log-every >= 0")
    if not 0 <= args.w_min <= args.w_max:
        p.error(f"need 0 <= --w-min <= --w-max (got {args.w_min:g} and {args.w_max:g})")
    if args.width % 8 or args.height % 8 or min(args.width, args.height) < 64:
        p.error(f"--width and --height must be multiples of 8 and at least 64 (got {args.width}x{args.height})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    d = dice.Dist()
    logging.basicConfig(level=logging.INFO if d.rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if not d.enabled
                        else f"%(asctime)s [rank {d.rank}] %(levelname)s %(name)s: %(message)s")
    comfy_dir = dice.find_comfyui(args.comfyui)
    import torch

    use_cpu = args.cpu or not torch.cuda.is_available()
    d.start(use_cuda=not use_cpu)
    try:
        return _run(args, d, comfy_dir, use_cpu)
    except KeyboardInterrupt:
        return dice.EXIT_CANCELLED
    finally:
        d.stop()


def _run(args, d, comfy_dir: str, use_cpu: bool) -> int:
    stop = dice.StopFlag(d.rank)
    stop.install()
    dice.import_comfy(comfy_dir, use_cpu, args.extra_model_paths_config)
    import comfy.model_management
    import comfy.sd
    import folder_paths

    pack = dice.import_pack()
    tt = sys.modules[pack.__name__ + ".nodes.teefusion_training"]
    training = sys.modules[pack.__name__ + ".cfg_distill.training"]
    if args.out_dir:
        out_dir = os.path.abspath(os.path.expanduser(args.out_dir))
        os.makedirs(out_dir, exist_ok=True)
        folder_paths.add_model_folder_path(tt.LORA_FOLDER, out_dir, is_default=True)
    ckpt_path, ckpt_name = dice.resolve_checkpoint(args.ckpt)
    stem = dice.default_name(ckpt_name, 0).rsplit("-dice-", 1)[0]
    name = args.name or f"{stem}-teefusion-w{args.w_min:g}-{args.w_max:g}"
    prompts = ""
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = f.read()
    state_path = tt.state_path_for(name)
    if os.path.exists(state_path) and not (args.resume or args.overwrite):
        saved = training.load_training_state(state_path)
        raise SystemExit(f"error: {state_path} holds a saved run of {name!r} at step {saved.step}. Pass --resume "
                         "to continue it, --overwrite to start afresh, or another --name.")
    model, clip = comfy.sd.load_checkpoint_guess_config(
        ckpt_path, output_vae=False, output_clip=True,
        embedding_directory=folder_paths.get_folder_paths("embeddings"))[:2]
    if clip is None:
        raise SystemExit(f"error: {ckpt_name} has no text encoder; training needs the prompt encodings")
    progress = dice.Progress(d.rank == 0 and not args.no_progress, args.steps, 0)
    started = time.monotonic()
    try:
        with dice._tqdm_logging(progress):
            _model, file_name, _curve = tt.run_teefusion_training(
                model, clip, prompts, args.w_min, args.w_max, args.steps, args.batch_size, args.lr, args.rank,
                args.loss, args.width, args.height, args.seed, name, args.save_every, args.resume, args.x0_steps,
                args.autocast, base_checkpoint=ckpt_name, should_stop=stop, log_every=args.log_every,
                on_step=progress, gradient_checkpointing=args.gradient_checkpointing, lr_schedule=args.lr_schedule,
                init_lora=os.path.abspath(os.path.expanduser(args.init_lora)) if args.init_lora else None)
    except comfy.model_management.InterruptProcessingException:
        log.warning("cancelled while preparing the training latents: nothing was trained or saved")
        return dice.EXIT_CANCELLED
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        progress.close()
    d.barrier()
    steps = training.load_training_state(state_path).step if os.path.exists(state_path) else 0
    if d.rank == 0:
        log.info("%s after %d steps in %.0f s: %s", "cancelled; saved" if steps < args.steps else "done", steps,
                 time.monotonic() - started, os.path.join(tt.lora_dir(), file_name))
    return dice.EXIT_CANCELLED if steps < args.steps else 0


if __name__ == "__main__":
    sys.exit(main())
