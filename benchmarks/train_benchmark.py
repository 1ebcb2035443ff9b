#!/usr/bin/env python
"""Cost of one DICE training step, relative to one plain forward pass of the frozen model.

Measured through the real code path: ComfyUI (library mode) builds the diffusion model with its own
supported_models config and random weights, wrapped in a ModelPatcher; nodes/comfy_training's
ComfyDistillHost supplies the teacher (CFG, two passes), the student (one pass with refined tokens,
differentiable) and the data; cfg_distill.training.train_refiner runs the steps. Prompt encodings
are synthetic (random 77x768 tokens), so no text encoder is needed; the x0 pool is random latents
(the step does not depend on where x0 came from).

Models:
  tiny  the test suite's SD1.5-architecture UNet (one level, 320 channels, 18.7M parameters)
  sd15  the real SD1.5 UNet configuration (ComfyUI's model_detection SD15 config: channel_mult
        [1,2,4,4], 2 res blocks per level, attention at 3 levels, 768-d context): 859.5M parameters

Each (model, latent size, batch) runs in its own subprocess, so peak memory is per configuration:
peak RSS on the CPU (getrusage), torch.cuda.max_memory_allocated on a GPU.

    .venv/bin/python benchmarks/train_benchmark.py                       # CPU defaults below
    python benchmarks/train_benchmark.py --device cuda --dtype fp16 --autocast bf16 --steps 10

Prints a markdown table and writes a JSON record (machine, torch, device, dtype, date, results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
PACK = "cfg_distill_pack"

TINY_UNET = {
    "model_channels": 320, "use_linear_in_transformer": False, "transformer_depth": [1],
    "transformer_depth_output": [1, 1], "transformer_depth_middle": -2, "context_dim": 768,
    "adm_in_channels": None, "use_temporal_attention": False, "in_channels": 4, "out_channels": 4,
    "num_res_blocks": [1], "channel_mult": [1], "image_size": 32, "use_spatial_transformer": True, "legacy": False,
}
# comfy/model_detection.py, unet_config_from_diffusers_unet: SD15 (the released v1.5 UNet)
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
MODELS = {"tiny": TINY_UNET, "sd15": SD15_UNET}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# ---------------------------------------------------------------------------------------------
# Worker: one configuration


def _comfy(comfy_dir: str, cpu: bool):
    from comfy_headless import import_comfy, load_pack

    import_comfy(comfy_dir, cpu)
    load_pack(PACK)
    return sys.modules[PACK + ".nodes.comfy_training"], sys.modules[PACK + ".cfg_distill.training"]


def _init_weights(module, seed: int) -> None:
    """randn / sqrt(fan_in) for matrices, 1 for norm scales, 0 for biases: finite, prompt-dependent."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).div_(p[0].numel() ** 0.5))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def _rss_gb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:
        return float("nan")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _protect_the_machine(limit_gb: float) -> None:
    """On a shared machine: be the out-of-memory killer's first choice, and optionally fail with a
    MemoryError above limit_gb of private memory (RLIMIT_DATA covers anonymous mmaps since Linux 4.7)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    if limit_gb:
        limit = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def worker(job: dict) -> dict:
    _protect_the_machine(job.get("mem_limit_gb", 0))
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    cuda = job["device"] == "cuda"
    ct, training = _comfy(job["comfyui"], cpu=not cuda)
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    dtype = getattr(torch, DTYPES[job["dtype"]])
    device = comfy.model_management.get_torch_device()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    config = comfy.supported_models.SD15(dict(MODELS[job["model"]]))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    _init_weights(model.diffusion_model, 0)
    model.diffusion_model.to(dtype)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    mp = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    comfy.model_management.load_models_gpu([mp])
    rss_model = _rss_gb()

    # Synthetic prompt encodings and a random x0 pool (latent-space, already "processed in").
    g = torch.Generator().manual_seed(1)
    prompts = [ct.EncodedPrompt(torch.randn(1, 77, 768, generator=g), {}) for _ in range(8)]
    null = ct.EncodedPrompt(torch.randn(1, 77, 768, generator=g), {})
    b, hw = job["batch"], job["latent"]
    host = ct.ComfyDistillHost(mp, prompts, null, 5.0, b, job.get("gc", False))  # a clone: nothing is patched before host.load()
    for i in range(len(prompts)):
        host.x0.append(torch.randn(1, 4, hw, hw, generator=g))
        host.x0_prompt.append(i)
    probe = host.sample_batch(0, torch.Generator().manual_seed(2))

    def forwards(patcher) -> list[float]:
        times = []
        with torch.no_grad():
            for i in range(job["warmup"] + job["forwards"]):
                sync()
                t0 = time.perf_counter()
                patcher.model.apply_model(probe.x_t, probe.sigma, c_crossattn=probe.c)
                sync()
                if i >= job["warmup"]:
                    times.append(time.perf_counter() - t0)
        return times

    # One plain forward of the original MODEL (loaded as itself: no weight wrappers), no grad.
    wrapped = [m for m in model.diffusion_model.modules() if getattr(m, "weight_function", None)]
    assert not wrapped, "the plain forward must run without the trainer's weight wrappers"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fwd_times = forwards(mp)
    peak_fwd = torch.cuda.max_memory_allocated() / 2**30 if cuda else _peak_rss_gb()
    # The same through the trainer's clone (identity weight wrappers: a fresh weight copy per forward).
    host.load()
    wrapped_fwd_times = forwards(host.mp)

    # Training steps, timed per part.
    parts = {"teacher": [], "student": []}

    def timed(name, fn):
        def run(*a):
            sync()
            t0 = time.perf_counter()
            out = fn(*a)
            sync()
            parts[name].append(time.perf_counter() - t0)
            return out
        return run

    stamps = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    total = job["warmup"] + job["steps"]
    cfg = training.TrainConfig(guidance_scale=5.0, steps=total, batch_size=b, lr=2e-4, loss="l2",
                               autocast=None if job["autocast"] == "none" else job["autocast"])
    sync()
    start = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        training.train_refiner(cfg, host.sample_batch, timed("teacher", host.teacher), timed("student", host.student),
                               token_dim=768, device=host.device,
                               on_step=lambda *a: (sync(), stamps.append(time.perf_counter())))
    host.cleanup()
    step_times = [t1 - t0 for t0, t1 in zip([start] + stamps[:-1], stamps)][job["warmup"]:]
    w = job["warmup"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    step, fwd = mean(step_times), mean(fwd_times)
    teacher, student = mean(parts["teacher"][w:]), mean(parts["student"][w:])
    peak_train = torch.cuda.max_memory_allocated() / 2**30 if cuda else _peak_rss_gb()
    return {
        "model": job["model"], "params_m": round(params / 1e6, 1), "latent": hw, "pixels": hw * 8, "batch": b,
        "plain_forward_s": fwd, "train_step_s": step, "step_over_forward": step / fwd,
        "teacher_s": teacher, "student_forward_s": student, "backward_and_update_s": step - teacher - student,
        "samples_per_s": b / step, "timed_steps": len(step_times), "step_times_s": step_times, "forward_times_s": fwd_times,
        "wrapped_forward_s": sum(wrapped_fwd_times) / len(wrapped_fwd_times), "wrapped_forward_times_s": wrapped_fwd_times,
        "memory": ({"kind": "cuda max_memory_allocated (GiB)", "forward_peak": peak_fwd, "train_peak": peak_train}
                   if cuda else {"kind": "process RSS (GiB)", "after_model_load": rss_model,
                                 "forward_peak": peak_fwd, "train_peak": peak_train}),
        "dtype": job["dtype"], "autocast": job["autocast"], "device": str(device),
        "gradient_checkpointing": bool(job.get("gc", False)),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# Driver


def machine_info(device: str) -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__}
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_average_at_start"] = list(os.getloadavg())
    except ImportError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def comfy_version(comfy_dir: str) -> str:
    try:
        with open(os.path.join(comfy_dir, "comfyui_version.py")) as f:
            for line in f:
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("\"'")
    except OSError:
        pass
    return "unknown"


def table(results: list[dict]) -> str:
    mem_kind = results[0]["memory"]["kind"] if results else ""
    head = ("| model | params | latent (px) | batch | grad ckpt | timed steps | plain forward (s) | forward, trainer's clone (s) | "
            "train step (s) | step / forward | "
            "teacher (s) | student fwd (s) | backward + AdamW (s) | samples/s | peak mem, forward | "
            "peak mem, training |")
    rows = [head, "|" + "---|" * 16]
    for r in results:
        m = r["memory"]
        rows.append(f"| {r['model']} | {r['params_m']}M | {r['latent']}x{r['latent']} ({r['pixels']}) | {r['batch']} | "
                    f"{'on' if r.get('gradient_checkpointing') else 'off'} | {r['timed_steps']} | {r['plain_forward_s']:.3f} | {r['wrapped_forward_s']:.3f} | {r['train_step_s']:.3f} | **{r['step_over_forward']:.2f}x** | "
                    f"{r['teacher_s']:.3f} | {r['student_forward_s']:.3f} | {r['backward_and_update_s']:.3f} | "
                    f"{r['samples_per_s']:.3f} | {m['forward_peak']:.2f} | {m['train_peak']:.2f} |")
    return "\n".join(rows) + f"\n\nMemory: {mem_kind}."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default="tiny:8:4,tiny:64:1,tiny:64:2,sd15:64:1,sd15:64:2",
                   help="comma-separated model:latent:batch[:steps] (latent side in latent pixels, 64 = 512 px; "
                        "steps overrides --steps for that configuration)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="model weights (default fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none", help="CUDA only (the core's option)")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per configuration")
    p.add_argument("--gradient-checkpointing", choices=["off", "on", "both"], default="off",
                   help="checkpoint the frozen model's blocks in the student pass; 'both' runs each configuration "
                        "twice, without then with")
    p.add_argument("--forwards", type=int, default=2,
                   help="timed plain forwards per configuration (at least the steps, up to 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps / forwards")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--mem-limit-gb", type=float, default=0,
                   help="CPU: fail a configuration (MemoryError) instead of exhausting the machine's memory")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default: the dev env's .comfyui/ComfyUI)")
    p.add_argument("--json", default=os.path.join(HERE, "results_training.json"))
    p.add_argument("--markdown", default=None, help="also write the table (with context) to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    comfy_dir = args.comfyui or os.environ.get("CFG_DISTILL_COMFYUI", os.path.join(ROOT, ".comfyui", "ComfyUI"))

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    results, failures = [], []
    gc_modes = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    for spec, gc in [(s, g) for s in args.configs.split(",") for g in gc_modes]:
        model, latent, batch, *more = spec.split(":")
        steps = int(more[0]) if more else args.steps
        job = dict(model=model, latent=int(latent), batch=int(batch), device=args.device, dtype=dtype,
                   autocast=args.autocast, steps=steps, forwards=max(args.forwards, min(steps, 10)),
                   warmup=args.warmup,
                   threads=args.threads, comfyui=comfy_dir, mem_limit_gb=args.mem_limit_gb, gc=gc)
        print(f"-- {spec}{' (gradient checkpointing)' if gc else ''} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout)[-1500:]
            print(f"   failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
            failures.append({"config": spec, "gradient_checkpointing": gc, "exit": proc.returncode, "error": tail})
            continue
        r = json.loads(line[len("RESULT "):])
        results.append(r)
        print(f"   {time.monotonic() - t0:.0f}s: step {r['train_step_s']:.3f}s = {r['step_over_forward']:.2f}x "
              f"forward", file=sys.stderr, flush=True)

    record = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": machine_info(args.device), "comfyui": comfy_version(comfy_dir), "device": args.device,
              "dtype": dtype, "autocast": args.autocast, "warmup": args.warmup, "threads": args.threads,
              "results": results, "failures": failures}
    md = table(results)
    print(md)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=2)
    if args.markdown:
        m = record["machine"]
        with open(args.markdown, "w") as f:
            f.write(f"# DICE training step cost\n\n`python benchmarks/train_benchmark.py {' '.join(argv or sys.argv[1:])}`"
                    f"\n\n{record['date']}; {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, ComfyUI "
                    f"{record['comfyui']}; device {args.device}, weights {dtype}, autocast {args.autocast}; "
                    f"{args.warmup} warm-up step(s), then timed steps as listed (timed count per row in the "
                    f"JSON record).\n\n{md}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
