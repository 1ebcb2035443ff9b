"""`python -m cfg_distill train dice|teefusion ...`: one training request run in ComfyUI's library mode,
without its interface. The same run as the training nodes (cfg_distill.run with ComfyUI as the host),
the same files and metadata.

Ctrl-C (or SIGTERM) cancels: the current step finishes, the training state and the output are saved,
and the exit status is 130; --resume continues later (--steps is the total, not the extra). A second
Ctrl-C at least 2 s after the first aborts at once (the last checkpoint is kept).

Several GPUs (or CPU processes) with torchrun; the batch size is per process:

    torchrun --standalone --nproc_per_node 4 -m cfg_distill train dice --ckpt ... --batch-size 8

Each rank runs on its own device (cuda:LOCAL_RANK, or the CPU with --cpu / no GPU), gradients are
averaged across ranks every step, each rank draws its own noise, timesteps and prompts (its data
generator is seeded with seed + rank), and only rank 0 writes files and logs.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time

from . import find_comfyui, import_comfy, load_pack, pack_module

EXIT_CANCELLED = 130
EXIT_BAD_REQUEST = 2
log = logging.getLogger("cfg_distill.headless")


def add_host_arguments(p: argparse.ArgumentParser, method: str) -> None:
    """The flags that are about ComfyUI and the process, not the request."""
    p.add_argument("--ckpt", required=True,
                   help="checkpoint: a name in ComfyUI's checkpoints folder(s) or a path to the file")
    p.add_argument("--comfyui", default=None,
                   help="ComfyUI folder (default: $COMFYUI_DIR, else the folder two levels above this pack when "
                        "it is installed in ComfyUI/custom_nodes/)")
    p.add_argument("--extra-model-paths-config", action="append", default=[], metavar="YAML",
                   help="extra_model_paths.yaml to load, as ComfyUI's flag of that name")
    kind = "models/dice_refiners" if method == "dice" else "models/loras"
    p.add_argument("--out-dir", default=None, help=f"save the output and its training state here instead of {kind}")
    if method == "dice":
        p.add_argument("--w-range", default=None, metavar="MIN,MAX",
                       help="the same as --w-min MIN --w-max MAX: one refiner for every w in the range")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if a saved run of this name exists (it is replaced)")
    p.add_argument("--log-every", type=int, default=50, help="log the loss every N steps (0: never; default 50)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off when not a terminal)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")


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



class Progress:
    """tqdm bar on rank 0 (when a terminal shows it); logging goes through tqdm so both stay readable."""

    def __init__(self, enabled: bool, total: int, start: int, desc: str = "DICE"):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=None,
                            desc=desc)

    def __call__(self, step, total, loss, elapsed, eta) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(args: argparse.Namespace, request) -> int:
    """Run `request` (a cfg_distill TrainRequest) on the checkpoint named by the host flags."""
    d = Dist()
    logging.basicConfig(level=logging.INFO if d.rank == 0 else logging.WARNING,
                        format=("%(asctime)s %(levelname)s %(name)s: %(message)s" if not d.enabled
                                else f"%(asctime)s [rank {d.rank}] %(levelname)s %(name)s: %(message)s"))
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume and --overwrite exclude each other")
    if args.log_every < 0:
        raise SystemExit("error: --log-every must be >= 0")
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
        return _run(args, request, d, comfy_dir, use_cpu)
    except KeyboardInterrupt:  # a second Ctrl-C before training began
        if d.rank == 0:
            log.warning("aborted")
        return EXIT_CANCELLED
    finally:
        d.stop()


def _run(args, request, d: "Dist", comfy_dir: str, use_cpu: bool) -> int:
    stop = StopFlag(d.rank)
    stop.install()
    import_comfy(comfy_dir, use_cpu, args.extra_model_paths_config)
    import comfy.model_management
    import comfy.sd
    import folder_paths

    pack = load_pack()
    host_mod = pack_module(pack, "nodes.comfy_host")
    req_mod = pack_module(pack, "cfg_distill.request")
    run_mod = pack_module(pack, "cfg_distill.run")
    training = pack_module(pack, "cfg_distill.training")
    # The request in the pack's own classes (the pack is loaded as its own package).
    request = req_mod.TrainRequest(**{f.name: getattr(request, f.name) for f in dataclasses.fields(request)})
    kind = req_mod.OUTPUT_KIND[request.method]
    if args.out_dir:
        out_dir = os.path.abspath(os.path.expanduser(args.out_dir))
        os.makedirs(out_dir, exist_ok=True)
        folder_paths.add_model_folder_path(kind, out_dir, is_default=True)
    ckpt_path, ckpt_name = resolve_checkpoint(args.ckpt)
    if request.name is None:
        request.name = default_name(ckpt_name, request)
    if request.start_from and not os.path.isfile(request.start_from):
        found = folder_paths.get_full_path(kind, request.start_from)
        request.start_from = found or request.start_from
    try:
        request = request.validate()
    except req_mod.RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    state_path = request.state_file(folder_paths.get_folder_paths(kind)[0])
    if request.resume and d.rank == 0:
        if os.path.exists(state_path):
            try:
                saved = training.load_training_state(state_path)
                log.info("resuming %s at step %d of %d (saved by %d process(es))", state_path, saved.step,
                         request.steps, saved.world_size)
                if saved.step >= request.steps:
                    log.warning("the saved run is already at step %d (target %d): nothing to train; raise --steps "
                                "to continue", saved.step, request.steps)
            except training.TrainingStateError:
                pass  # the run says why
        else:
            log.warning("no saved run at %s: starting afresh", state_path)

    if d.rank == 0:
        log.info("ComfyUI %s; device %s; %d process(es)%s", comfy_dir, comfy.model_management.get_torch_device(),
                 d.world, f" ({d.backend})" if d.enabled else "")
        log.info("loading %s", ckpt_path)
    model, clip = comfy.sd.load_checkpoint_guess_config(
        ckpt_path, output_vae=False, output_clip=True,
        embedding_directory=folder_paths.get_folder_paths("embeddings"))[:2]
    if clip is None:
        raise SystemExit(f"error: {ckpt_name} has no text encoder; training needs the prompt encodings")

    progress = Progress(d.rank == 0 and not args.no_progress, request.steps, 0, request.method.upper())
    last_status = [0.0]

    def status(text: str) -> None:  # preparation can take minutes: say what it does, at most every 5 s
        now = time.monotonic()
        if d.rank == 0 and (now - last_status[0] >= 5 or not text.startswith("preparing")):
            last_status[0] = now
            log.info("%s", text)

    reporter = host_mod.ComfyReporter(request.steps, None, extra_stop=stop, on_step=progress,
                                      log_every=args.log_every, on_status=status)
    host = host_mod.ComfyTrainingHost(model, clip, None, ckpt_name)
    if d.rank == 0:
        log.info("%d process(es) x batch %d x grad_accum %d = %d samples per step", d.world, request.batch_size,
                 request.grad_accum, d.world * request.batch_size * request.grad_accum)
    started = time.monotonic()
    try:
        with _tqdm_logging(progress):
            out = run_mod.run(request, host, reporter)
    except (req_mod.RequestError, training.TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_REQUEST if isinstance(e, req_mod.RequestError) else 1
    except comfy.model_management.InterruptProcessingException:
        if d.rank == 0:
            log.warning("cancelled while preparing the training data: nothing was trained or saved")
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        if d.rank == 0:
            log.warning("aborted: the last checkpoint is kept; continue with --resume")
        return EXIT_CANCELLED
    finally:
        progress.close()
    d.barrier()  # rank 0 has written the file before anyone leaves
    if out.path is None and d.rank == 0:
        log.warning("cancelled while preparing the training data: nothing was trained or saved")
        return EXIT_CANCELLED
    if d.rank == 0:
        log.info("%s saved after %d steps (final loss %.5g)%s: %s", req_mod.OUTPUT_LABEL[request.method], out.step,
                 out.final_loss, " - cancelled" if out.cancelled else "", out.path)
        log.info("%s after %d steps in %.0f s", "cancelled" if out.cancelled else "done", out.step,
                 time.monotonic() - started)
        for line in out.message.splitlines():
            log.info("%s", line)
        if out.cancelled:
            log.info("continue with the same command plus --resume")
    return EXIT_CANCELLED if out.cancelled or out.path is None else 0


def default_name(ckpt_name: str, request) -> str:
    stem = os.path.splitext(os.path.basename(ckpt_name))[0]
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in stem).strip("._-") or "model"
    if request.method == "dice":
        return f"{stem[:100]}-dice-w{request.guidance_scale:g}"
    return f"{stem[:100]}-teefusion"


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


