"""What one-pass guidance saves: CFG (cfg 5) vs DICE (cfg 1) vs TeEFusion (cfg 1), through ComfyUI's
own sampling path in library mode: the stock KSampler node function (nodes.common_ksampler), the
stock text encoder and VAE decoder, and this pack's node classes. Model calls are counted through
the documented unet-function-wrapper hook, never assumed.

    python benchmarks/sampling_benchmark.py --quick          # tiny model; checks call counts (CI)
    python benchmarks/sampling_benchmark.py                  # tiny + SD1.5-size (256, 512 px)
    python benchmarks/sampling_benchmark.py --sdxl           # adds an SDXL-size UNet at 512 px
    python benchmarks/sampling_benchmark.py --no-sd15 --family sd3:512 --family wan21_t2v:256:9
                                                             # DiT families (tools/tiny_families.py BENCH_CONFIGS)

Prints markdown tables and writes a JSON record (machine, torch, device, dtype, date) next to
--out. Random weights: speed is what is measured, not image quality.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tools.comfy_env import load_pack as load_the_pack  # noqa: E402

SAMPLER, SCHEDULER, SEED = "dpmpp_2m", "karras", 42
PROMPT = "a red fox sitting in a snowy forest at sunrise, highly detailed"


def load_pack():
    """The pack's apply nodes (refiner, fusion), in library mode."""
    pack = load_the_pack()
    return sys.modules[pack.__name__ + ".nodes.refiner_nodes"], sys.modules[pack.__name__ + ".nodes.fusion_nodes"]


class CallCounter:
    """Wraps a MODEL clone; records batch rows and seconds of every diffusion-model call."""

    def __init__(self, model):
        self.calls = []
        self.model = model.clone()
        self.model.set_model_unet_function_wrapper(self._wrap)

    def _wrap(self, apply_model, args):
        t = time.perf_counter()
        out = apply_model(args["input"], args["timestep"], **args["c"])
        self.calls.append((int(args["input"].shape[0]), time.perf_counter() - t))
        return out


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


class Case:
    """One model at one size and batch: encode / refine / sample / decode for each method."""

    def __init__(self, label, model, clip, vae, size, batch, steps, token_dim, conds=None, latent=None):
        self.label, self.model, self.clip, self.vae = label, model, clip, vae
        self.size, self.batch, self.steps, self.token_dim = size, batch, steps, token_dim
        self.conds = conds  # pre-made (positive, negative) when there is no text encoder (SDXL-size)
        self.latent = latent or (4, size // 8, size // 8)  # per-image latent shape (video: C, frames, h, w)
        torch.manual_seed(0)
        from cfg_distill import DiceRefiner, LoadedRefiner, RefinerInfo

        self.refiner = LoadedRefiner(DiceRefiner(token_dim).eval(), RefinerInfo(token_dim, 512), "bench")

    def encode(self):
        if self.conds is not None:
            return self.conds, 0.0
        import nodes

        t = time.perf_counter()
        enc = nodes.CLIPTextEncode()
        pos = enc.encode(self.clip, PROMPT)[0]
        neg = enc.encode(self.clip, "")[0]
        return (pos, neg), time.perf_counter() - t

    def run(self, method, refiner_nodes, fusion_nodes, steps=None):
        import nodes

        steps = steps or self.steps
        (pos, neg), t_encode = self.encode()
        t_prep = 0.0
        cfg = 5.0
        if method == "dice":
            res, t_prep = timed(refiner_nodes.ApplyDiceRefiner.execute, positive=pos, negative=neg,
                                refiner=self.refiner, strength=1.0)
            pos, cfg = res.result[0], 1.0
        elif method == "teefusion":
            res, t_prep = timed(fusion_nodes.TeEFusionConditioning.execute, positive=pos, negative=neg, w=1.0,
                                fuse_tokens=True, fuse_pooled=True)
            pos, cfg = res.result[0], 1.0
        counter = CallCounter(self.model)
        latent = {"samples": torch.zeros(self.batch, *self.latent)}
        out, t_sample = timed(nodes.common_ksampler, counter.model, SEED, steps, cfg, SAMPLER, SCHEDULER,
                              pos, neg, latent)
        t_decode = 0.0
        if self.vae is not None:
            _, t_decode = timed(self.vae.decode, out[0]["samples"])
        return {"calls": len(counter.calls), "rows": sum(b for b, _ in counter.calls),
                "step_s": sum(s for _, s in counter.calls) / steps, "sample_s": t_sample,
                "prep_s": t_prep, "encode_s": t_encode, "decode_s": t_decode,
                "end_to_end_s": t_encode + t_prep + t_sample + t_decode}


METHODS = ("cfg", "dice", "teefusion")


def bench(case, repeats, refiner_nodes, fusion_nodes):
    runs = {m: [] for m in METHODS}
    for m in METHODS:  # warm-up, not recorded: model loading and first-call costs (2 steps suffice)
        case.run(m, refiner_nodes, fusion_nodes, steps=2)
    for _ in range(repeats):
        for m in METHODS:  # interleaved, so machine noise hits every method alike
            runs[m].append(case.run(m, refiner_nodes, fusion_nodes))
    return runs


def stat(runs, key):
    v = [r[key] for r in runs]
    return statistics.median(v), min(v), max(v)


def table(results):
    lines = ["| model | px | batch | method | cfg | calls / step | rows / step | s / step (min-max) | "
             "sampling s / image | end-to-end s | step ratio vs CFG |", "|" + "---|" * 11]
    for label, case, runs in results:
        cfg_step = stat(runs["cfg"], "step_s")[0]
        for m in ("cfg", "dice", "teefusion"):
            r = runs[m]
            med, lo, hi = stat(r, "step_s")
            name = {"cfg": "CFG", "dice": "DICE", "teefusion": "TeEFusion"}[m]
            lines.append(
                f"| {label} | {case.size} | {case.batch} | {name} | {5.0 if m == 'cfg' else 1.0} | "
                f"{r[0]['calls'] / case.steps:g} | {r[0]['rows'] / case.steps:g} | {med:.4f} ({lo:.4f}-{hi:.4f}) | "
                f"{stat(r, 'sample_s')[0] / case.batch:.3f} | {stat(r, 'end_to_end_s')[0]:.3f} | "
                f"{med / cfg_step:.3f} |")
    return "\n".join(lines)


def overheads(results):
    # The limit: CFG's model call is one batch-2 pass (prompt and negative), DICE's one batch-1 pass,
    # both timed at the model call, so their ratio is the best the sampling time ratio can reach.
    lines = ["| model | px | batch | refiner (one-off) ms | % of one CFG step | % of one DICE image's sampling | "
             "TeEFusion ms | model call, CFG / DICE (2 rows vs 1) | ideal DICE / CFG |", "|" + "---|" * 9]
    for label, case, runs in results:
        refine = stat(runs["dice"], "prep_s")[0]
        tee = stat(runs["teefusion"], "prep_s")[0]
        step = stat(runs["cfg"], "step_s")[0]
        dice_sample = stat(runs["dice"], "sample_s")[0]
        limit = stat(runs["cfg"], "step_s")[0] / stat(runs["dice"], "step_s")[0]
        lines.append(f"| {label} | {case.size} | {case.batch} | {refine * 1e3:.2f} | {100 * refine / step:.2f} | "
                     f"{100 * refine / dice_sample:.3f} | {tee * 1e3:.2f} | {limit:.2f} | {1 / limit:.2f} |")
    return "\n".join(lines)


def check_counts(results) -> list[str]:
    """One pass per step (batch 1 rows per image) for DICE and TeEFusion at cfg 1; two rows for CFG."""
    problems = []
    for label, case, runs in results:
        for m, rows in (("dice", 1), ("teefusion", 1), ("cfg", 2)):
            for r in runs[m]:
                if r["rows"] != rows * case.batch * case.steps:
                    problems.append(f"{label} {m}: {r['rows']} rows over {case.steps} steps, "
                                    f"expected {rows * case.batch * case.steps}")
        for r in runs["dice"]:
            if r["calls"] != case.steps:
                problems.append(f"{label} dice: {r['calls']} model calls for {case.steps} steps")
    return problems


def machine_record(args):
    import comfy.model_management as mm

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "device": str(mm.get_torch_device()), "dtype": "float32 (CPU)" if mm.cpu_mode() else "model default",
            "sampler": f"{SAMPLER}/{SCHEDULER}", "args": vars(args)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, 4 steps, check call counts")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="256,512", help="pixel sizes for the SD1.5-size UNet")
    ap.add_argument("--batches", default="1", help="batch sizes, e.g. 1,4 (scaling)")
    ap.add_argument("--sdxl", action="store_true", help="add the SDXL-size UNet at 512 px (needs ~12 GB)")
    ap.add_argument("--sdxl-steps", type=int, default=3)
    ap.add_argument("--sd15-repeats", type=int, default=None, help="repeats for the SD1.5 / SDXL-size rows "
                    "(default --repeats)")
    ap.add_argument("--no-sd15", action="store_true")
    ap.add_argument("--family", action="append", default=[], metavar="NAME:PX[:FRAMES]",
                    help="a DiT family at a released model's layout (tools/tiny_families.py BENCH_CONFIGS: sd3, "
                         "wan21_t2v), synthetic conds shaped like its text encoder's; FRAMES in video frames")
    ap.add_argument("--family-steps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats, args.no_sd15, args.sdxl = 4, 1, True, False

    refiner_nodes, fusion_nodes = load_pack()
    import comfy.sd

    from tools.tiny_models import build_tiny_sdxl, write_tiny_sd15

    os.makedirs(args.out, exist_ok=True)
    results = []
    batches = [int(b) for b in args.batches.split(",")]

    def add(label, path_or_model, sizes, steps, token_dim=768, conds=None, repeats=None, latent=None):
        if isinstance(path_or_model, str):
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path_or_model)
        else:
            model, clip, vae = path_or_model, None, None
        for size in sizes:
            for b in batches:
                case = Case(label, model, clip, vae, size, b, steps, token_dim, conds, latent)
                print(f"... {label} {size}px batch {b}", file=sys.stderr, flush=True)
                results.append((label, case, bench(case, repeats or args.repeats, refiner_nodes, fusion_nodes)))

    tiny = os.path.join(args.out, "tiny-sd15.safetensors")
    if not os.path.exists(tiny):
        write_tiny_sd15(tiny)
    add("tiny SD1.5-arch (19M UNet)", tiny, [64] if args.quick else [128, 256], args.steps)
    if not args.no_sd15:
        full = os.path.join(args.out, "sd15-size-random.safetensors")
        if not os.path.exists(full):
            print("writing the SD1.5-size random checkpoint (~2 GB, once)", file=sys.stderr)
            write_tiny_sd15(full, unet_size="full")
        add("SD1.5-size UNet (859M)", full, [int(s) for s in args.sizes.split(",")], args.steps,
            repeats=args.sd15_repeats)
    if args.sdxl:
        g = torch.Generator().manual_seed(0)
        extras = {"width": 512, "height": 512, "crop_w": 0, "crop_h": 0, "target_width": 512, "target_height": 512}
        pos = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g), **extras}]]
        neg = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g), **extras}]]
        add("SDXL-size UNet (2.6B), random conds", build_tiny_sdxl(size="full"), [512], args.sdxl_steps,
            token_dim=2048, conds=(pos, neg), repeats=args.sd15_repeats)

    for item in args.family:
        from tools.tiny_families import FAMILY_SPECS, FamilyEncoder, build_family_model

        name, px, *frames = item.split(":")
        px, spec = int(px), FAMILY_SPECS[name]
        model = build_family_model(name, bench=True)
        params = sum(p.numel() for p in model.model.diffusion_model.parameters())
        enc = FamilyEncoder(name)
        pos, neg = [[*enc.encode([3, 1, 4, 1, 5, 9, 2, 6])]], [[*enc.encode([])]]
        if spec.frames is not None:
            n = int(frames[0]) if frames else 1
            latent, what = (spec.latent_channels, (n - 1) // 4 + 1, px // 8, px // 8), f"{n} frames"
        else:
            latent, what = (spec.latent_channels, px // 8, px // 8), "image"
        add(f"{name} ({params / 1e9:.2f}B, {what}), synthetic conds", model, [px], args.family_steps,
            token_dim=spec.token_dim, conds=(pos, neg), repeats=args.sd15_repeats, latent=latent)

    record = machine_record(args)
    record["results"] = [{"model": label, "px": c.size, "batch": c.batch, "steps": c.steps, "runs": runs}
                         for label, c, runs in results]
    print(f"\n{record['date']} | {record['processor']} x{record['cpus']} | torch {record['torch']} | "
          f"{record['device']} | {record['dtype']} | {SAMPLER}/{SCHEDULER}, same seed | median of {args.repeats}\n")
    print(table(results))
    print()
    print(overheads(results))
    problems = check_counts(results)
    for p in problems:
        print("CALL COUNT MISMATCH:", p)
    print("\ncall counts:", "OK (DICE / TeEFusion one pass per step at batch 1; CFG two)" if not problems else "FAILED")
    path = os.path.join(args.out, f"sampling-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print("JSON record:", path)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
