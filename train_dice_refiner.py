#!/usr/bin/env python
"""Headless DICE refiner training: the "Train DICE Refiner" node without the UI, for long runs.

Run it with ComfyUI's own python (the pack installed in ComfyUI/custom_nodes/):

    python custom_nodes/ComfyUI-cfg-distill/train_dice_refiner.py --ckpt v1-5-pruned-emaonly.safetensors \
        --steps 4000 --batch-size 8 --name sd15_w5

or from anywhere with --comfyui DIR (or the COMFYUI_DIR environment variable). --ckpt is a name in
ComfyUI's checkpoints folder(s) or a path to a file. It calls the very same training function as the
node, so the result is the same file, models/dice_refiners/<name>.safetensors, with the same metadata
(base family, checkpoint name and short hash, w, steps), and the same <name>.dice-train-state next to
it (--out-dir puts both in another folder).

Ctrl-C (or SIGTERM) cancels: the current step finishes, the training state and the refiner are saved,
and the exit status is 130; --resume continues later (--steps is the total, not the extra). A second
Ctrl-C at least 2 s after the first aborts at once (the last checkpoint is kept).

Several GPUs (or CPU processes) with torchrun; the batch size is per process:

    torchrun --standalone --nproc_per_node 4 train_dice_refiner.py --ckpt ... --batch-size 8

Each rank runs on its own device (cuda:LOCAL_RANK, or the CPU with --cpu / no GPU), gradients are
averaged across ranks every step, each rank draws its own noise, timesteps and prompts (its data
generator is seeded with seed + rank), and only rank 0 writes files and logs. torchrun forwards
Ctrl-C to the workers and gives them 30 s to finish the step and save before killing them.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import time

PACK_DIR = os.path.dirname(os.path.abspath(__file__))
PACK_MODULE = "cfg_distill_headless_pack"
EXIT_CANCELLED = 130
log = logging.getLogger("cfg_distill.headless")


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_dice_refiner.py",
        description="Train a DICE refiner for a checkpoint without the ComfyUI interface (same training "
                    "and output file as the 'Train DICE Refiner' node). Multi-GPU: launch with torchrun.")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint: a name in ComfyUI's checkpoints folder(s) or a path to the file")
    p.add_argument("--comfyui", default=None,
                   help="ComfyUI folder (default: $COMFYUI_DIR, else the folder two levels above this pack "
                        "when it is installed in ComfyUI/custom_nodes/)")
    p.add_argument("--extra-model-paths-config", action="append", default=[], metavar="YAML",
                   help="extra_model_paths.yaml to load, as ComfyUI's flag of that name (ComfyUI's own "
                        "extra_model_paths.yaml is always read when present)")
    p.add_argument("--name", default=None,
                   help="refiner file name in the dice_refiners folder, no extension "
                        "(default: <checkpoint>-dice-w<guidance scale>)")
    p.add_argument("--out-dir", default=None,
                   help="save the refiner and its training state here instead of models/dice_refiners")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="text file, one prompt per line (default: the bundled list of varied prompts)")
    p.add_argument("--guidance-scale", "-w", type=float, default=5.0,
                   help="the CFG scale w the refiner reproduces at cfg 1 (default and paper: 5)")
    p.add_argument("--steps", type=int, default=2000,
                   help="total optimizer steps (with --resume: the target, not the extra; default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="per process (torchrun: per rank; default %(default)s)")
    p.add_argument("--grad-accum", type=int, default=4,
                   help="micro-batches per optimizer step: effective batch = batch size x this, memory of one "
                        "micro-batch (default %(default)s; see the README's training table)")
    p.add_argument("--w-range", default=None, metavar="MIN,MAX",
                   help="one refiner for every w in MIN..MAX (w an input when applied); --guidance-scale is its "
                        "reference w and must lie inside")
    p.add_argument("--negative-prompts", default=None, metavar="FILE",
                   help="text file, one negative prompt per line, to train with (teacher: CFG with that "
                        "negative) so the refiner works with negative prompts; mix short ones ('blurry', 'red') "
                        "and full prompts (default: \"\" only)")
    p.add_argument("--negative-share", type=float, default=0.5,
                   help="with --negative-prompts: share of samples that get one (default %(default)s)")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                   help="cosine: the learning rate falls to 0 over --steps; constant: the same rate throughout, so "
                        "a run extended with --resume and more --steps continues exactly (default %(default)s)")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=5e-4,
                   help="AdamW learning rate (default %(default)g; the paper's 2e-4 is for batch 128)")
    p.add_argument("--loss", choices=["l2", "l1"], default="l2",
                   help="default l2; paper: l1 for SD1.5, l2 for SDXL (both summed per sample)")
    p.add_argument("--width", type=int, default=512, help="training image width in pixels (default %(default)s)")
    p.add_argument("--height", type=int, default=512, help="training image height in pixels (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default %(default)s)")
    p.add_argument("--x0-steps", type=int, default=8,
                   help="teacher CFG sampling steps per prompt that make the training latents (default %(default)s)")
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                   help="mixed precision on CUDA GPUs (ignored on the CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the frozen model's blocks in backward instead of storing them (less memory, "
                        "more time per step)")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (0: only at the end; default %(default)s)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the saved run of this name")
    group.add_argument("--overwrite", action="store_true",
                       help="start afresh even if a saved run of this name exists (it is replaced)")
    p.add_argument("--log-every", type=int, default=50, help="log the loss every N steps (0: never; default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off when not a terminal)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.x0_steps < 1 or args.save_every < 0 or args.log_every < 0:
        p.error("--steps, --batch-size and --x0-steps must be >= 1; --save-every and --log-every >= 0")
    if args.width % 8 or args.height % 8 or min(args.width, args.height) < 64:
        p.error(f"--width and --height must be multiples of 8 and at least 64 (got {args.width}x{args.height})")
    return args


def find_comfyui(flag: str | None) -> str:
    candidates = []
    if flag:
        candidates.append(("--comfyui", flag))
    elif os.environ.get("COMFYUI_DIR"):
        candidates.append(("COMFYUI_DIR", os.environ["COMFYUI_DIR"]))
    else:
        candidates.append(("the folder two levels above this pack", os.path.dirname(os.path.dirname(PACK_DIR))))
    source, path = candidates[0]
    path = os.path.abspath(os.path.expanduser(path))
    if not (os.path.isfile(os.path.join(path, "main.py")) and os.path.isdir(os.path.join(path, "comfy"))):
        raise SystemExit(f"error: no ComfyUI at {path} (from {source}). Install this pack in "
                         "ComfyUI/custom_nodes/, or pass --comfyui /path/to/ComfyUI (or set COMFYUI_DIR).")
    return path


# ---------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR / MASTER_PORT)


class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.backend = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def start(self, use_cuda: bool) -> None:
        """Before ComfyUI is imported: ComfyUI picks torch.cuda.current_device() as its device."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        if use_cuda:
            torch.cuda.set_device(self.local_rank)
        self.backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=self.backend)
        if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
            raise RuntimeError("torch.distributed disagrees with WORLD_SIZE / RANK")

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()

    def stop(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# ComfyUI in library mode and the pack as a package


def import_comfy(comfy_dir: str, cpu: bool, extra_configs: list[str]) -> None:
    # This pack's folder has a `nodes` package, ComfyUI a `nodes.py`: ComfyUI's must win.
    sys.path[:] = [comfy_dir] + [p for p in sys.path
                                 if os.path.abspath(p or os.getcwd()) not in (PACK_DIR, comfy_dir)]
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu  # must precede the first import of comfy.model_management
    own = os.path.join(comfy_dir, "extra_model_paths.yaml")
    yamls = ([own] if os.path.isfile(own) else []) + list(extra_configs)
    if yamls:
        from utils.extra_config import load_extra_path_config

        for yaml_path in yamls:
            load_extra_path_config(yaml_path)
    import comfy.model_management  # noqa: F401  (device selection happens here)


def import_pack():
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, os.path.join(PACK_DIR, "__init__.py"),
                                                  submodule_search_locations=[PACK_DIR])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


def resolve_checkpoint(ckpt: str) -> tuple[str, str]:
    """(full path, name as the checkpoint loader node would list it)."""
    import folder_paths

    path = os.path.abspath(os.path.expanduser(ckpt))
    if os.path.isfile(path):
        # Listed first among the checkpoint folders, so the node code finds (and hashes) this very file.
        folder_paths.add_model_folder_path("checkpoints", os.path.dirname(path), is_default=True)
        return path, os.path.basename(path)
    found = folder_paths.get_full_path("checkpoints", ckpt)
    if found:
        return found, ckpt
    names = folder_paths.get_filename_list("checkpoints")
    hint = f" Known checkpoints: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}." if names else \
        f" No checkpoints found in {', '.join(folder_paths.get_folder_paths('checkpoints'))}."
    raise SystemExit(f"error: checkpoint {ckpt!r} is neither a file nor a name in ComfyUI's checkpoints folders.{hint}")


def default_name(ckpt_name: str, w: float) -> str:
    stem = os.path.splitext(os.path.basename(ckpt_name))[0]
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in stem).strip("._-") or "refiner"
    return f"{stem[:100]}-dice-w{w:g}"


# ---------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM: stop after the current step and save


class StopFlag:
    ABORT_AFTER_S = 2.0

    def __init__(self, rank: int):
        self.rank, self.requested_at = rank, None

    def __call__(self) -> bool:
        return self.requested_at is not None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
            if self.rank == 0:
                log.warning("%s: stopping after the current step and saving (before the first step: nothing is "
                            "saved). Ctrl-C again after %gs aborts at once", signal.Signals(signum).name,
                            self.ABORT_AFTER_S)
        elif now - self.requested_at >= self.ABORT_AFTER_S:
            raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------


class Progress:
    """tqdm bar on rank 0 (when a terminal shows it); logging goes through tqdm so both stay readable."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=None,
                            desc="DICE")

    def __call__(self, step, total, loss, elapsed, eta) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    d = Dist()
    logging.basicConfig(level=logging.INFO if d.rank == 0 else logging.WARNING,
                        format=("%(asctime)s %(levelname)s %(name)s: %(message)s" if not d.enabled
                                else f"%(asctime)s [rank {d.rank}] %(levelname)s %(name)s: %(message)s"))
    comfy_dir = find_comfyui(args.comfyui)
    import torch

    has_gpu = torch.cuda.is_available()
    other_accel = (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()) or \
        (hasattr(torch, "xpu") and torch.xpu.is_available())
    use_cpu = args.cpu or not (has_gpu or other_accel)
    if d.enabled and not use_cpu and not has_gpu:
        raise SystemExit("error: multi-process training runs on CUDA GPUs or, with --cpu, on the CPU")
    if d.enabled and not use_cpu and d.local_rank >= torch.cuda.device_count():
        raise SystemExit(f"error: LOCAL_RANK {d.local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
    d.start(use_cuda=not use_cpu)
    try:
        return _run(args, d, comfy_dir, use_cpu)
    except KeyboardInterrupt:  # a second Ctrl-C before training began
        if d.rank == 0:
            log.warning("aborted")
        return EXIT_CANCELLED
    finally:
        d.stop()


def _run(args, d: Dist, comfy_dir: str, use_cpu: bool) -> int:
    import torch

    stop = StopFlag(d.rank)
    stop.install()
    import_comfy(comfy_dir, use_cpu, args.extra_model_paths_config)
    import comfy.model_management
    import comfy.sd
    import folder_paths

    pack = import_pack()
    training_node = sys.modules[pack.__name__ + ".nodes.training_node"]
    folders = sys.modules[pack.__name__ + ".nodes.folders"]
    training = sys.modules[pack.__name__ + ".cfg_distill.training"]

    if args.out_dir:
        out_dir = os.path.abspath(os.path.expanduser(args.out_dir))
        os.makedirs(out_dir, exist_ok=True)
        folder_paths.add_model_folder_path(folders.FOLDER, out_dir, is_default=True)
    ckpt_path, ckpt_name = resolve_checkpoint(args.ckpt)
    name = args.name or default_name(ckpt_name, args.guidance_scale)
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not training_node._NAME.match(name):
        raise SystemExit(f"error: --name {name!r} is not a plain file name (letters, digits, '.', '_', '-', spaces)")
    prompts = ""
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = f.read()
        if not prompts.strip():
            raise SystemExit(f"error: {args.prompts} has no prompts (one per line)")
    negatives = ""
    if args.negative_prompts:
        with open(args.negative_prompts, encoding="utf-8") as f:
            negatives = f.read()
        if not negatives.strip():
            raise SystemExit(f"error: {args.negative_prompts} has no negative prompts (one per line)")
    if not 0.0 <= args.negative_share <= 1.0:
        raise SystemExit(f"error: --negative-share must be between 0 and 1 (got {args.negative_share:g})")
    try:
        training.TrainConfig(guidance_scale=args.guidance_scale, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, loss=args.loss, seed=args.seed, save_every=args.save_every,
                             autocast=None if args.autocast == "none" else args.autocast).validate()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    state_path = training_node.state_path_for(name)
    start = 0
    if os.path.exists(state_path):
        try:
            saved = training.load_training_state(state_path)
        except training.TrainingStateError as e:
            raise SystemExit(f"error: {e}. Move it away, or pass another --name.") from None
        if args.resume:
            start = min(saved.step, args.steps)
            if saved.step >= args.steps:
                log.warning("the saved run is already at step %d (target %d): nothing to train; raise --steps to "
                            "continue", saved.step, args.steps)
            log.info("resuming %s at step %d of %d (saved by %d process(es))", state_path, saved.step, args.steps,
                     saved.world_size)
        elif not args.overwrite:
            raise SystemExit(f"error: {state_path} holds a saved run of {name!r} at step {saved.step}. Pass --resume "
                             "to continue it, --overwrite to start afresh, or another --name.")
    elif args.resume:
        log.warning("no saved run at %s: starting afresh", state_path)

    if d.rank == 0:
        log.info("ComfyUI %s; device %s; %d process(es)%s", comfy_dir,
                 comfy.model_management.get_torch_device(), d.world,
                 f" ({d.backend})" if d.enabled else "")
        log.info("loading %s", ckpt_path)
    model, clip = comfy.sd.load_checkpoint_guess_config(
        ckpt_path, output_vae=False, output_clip=True,
        embedding_directory=folder_paths.get_folder_paths("embeddings"))[:2]
    if clip is None:
        raise SystemExit(f"error: {ckpt_name} has no text encoder; DICE training needs the prompt encodings")

    progress = Progress(d.rank == 0 and not args.no_progress, args.steps, start)
    if d.rank == 0:
        log.info("training %r: w %g, %d steps, batch %d x %d process(es), lr %g, %s loss, %dx%d px, seed %d",
                 name, args.guidance_scale, args.steps, args.batch_size, d.world, args.lr, args.loss,
                 args.width, args.height, args.seed)
    started = time.monotonic()
    try:
        with _tqdm_logging(progress):
            loaded, _curve = training_node.run_training(
                model, clip, prompts, args.guidance_scale, args.steps, args.batch_size, args.lr, args.loss,
                args.width, args.height, args.seed, name, args.save_every, args.resume, args.x0_steps,
                args.autocast, base_checkpoint=ckpt_name, should_stop=stop, log_every=args.log_every,
                on_step=progress, gradient_checkpointing=args.gradient_checkpointing, grad_accum=args.grad_accum,
                lr_schedule=args.lr_schedule,
                w_range=tuple(float(v) for v in args.w_range.split(",")) if args.w_range else None,
                negative_prompts=negatives, negative_share=args.negative_share if negatives else 0.0)
    except comfy.model_management.InterruptProcessingException:
        if d.rank == 0:
            log.warning("cancelled while preparing the training latents: nothing was trained or saved")
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        if d.rank == 0:
            log.warning("aborted: the last checkpoint (%s) is kept; continue with --resume", state_path)
        return EXIT_CANCELLED
    finally:
        progress.close()
    d.barrier()  # rank 0 has written the file before anyone leaves
    info = loaded.info
    cancelled = info.train_steps < args.steps
    if d.rank == 0:
        path = os.path.join(folders.default_dir(), loaded.name)
        log.info("%s after %d steps in %.0f s: %s (%s)", "cancelled; saved" if cancelled else "done",
                 info.train_steps, time.monotonic() - started, path, info.summary())
        if cancelled:
            log.info("continue with the same command plus --resume")
    return EXIT_CANCELLED if cancelled else 0


class _tqdm_logging:
    def __init__(self, progress: Progress):
        self.inner = None
        if progress.bar is not None and not progress.bar.disable:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.inner = logging_redirect_tqdm()

    def __enter__(self):
        if self.inner is not None:
            self.inner.__enter__()

    def __exit__(self, *exc):
        if self.inner is not None:
            return self.inner.__exit__(*exc)
        return False


if __name__ == "__main__":
    sys.exit(main())
