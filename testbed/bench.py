"""The quality table: CFG, DICE and TeEFusion on the testbed model, judged on image outcomes.

    python -m testbed.bench                 (60 held-out prompts x 4 seeds, 10 methods; a few minutes on 2 cores)
    python -m testbed.bench --quick         (the CI subset: 12 prompts x 2 seeds, 7 methods, the student at 3 w + the avoidance test)

Everything is sampled by the real ComfyUI in library mode with stock semantics: the checkpoint is
loaded by comfy.sd.load_checkpoint_guess_config (what CheckpointLoaderSimple calls), sampling is
nodes.common_ksampler (what KSampler calls; dpmpp_2m / karras), decoding is the VAE's decode (what
VAEDecode calls). DICE and TeEFusion rewrite the conditioning with this pack's own node code. Prompt
encodings come from testbed.textcache, which is bit-identical to CLIPTextEncode on this checkpoint
(checked by tests/test_testbed.py; --stock-text-encode uses CLIPTextEncode itself, slower).

All prompts and seeds of a method go through ONE sampler call as one batch (a conditioning batch that
matches the latent batch), so every method sees exactly the same starting noise per (prompt, seed).
Model evaluations are counted by wrapping the model (set_model_unet_function_wrapper): rows evaluated
per image. The negative prompt for the "with negative" rows is the colour-swapped prompt (shape colour
and background colour exchanged: the attribute-binding error).

Columns: NFE per image; alignment = mean over the four attributes of the judge's accuracy (%); all4 =
images with all four right (%); per-attribute accuracy; FD = Frechet distance between the judge's
features of the generated images and of real images of the same prompts (lower is better); dCFG =
RMS pixel distance (0..1) to the CFG w=5 image of the same prompt and seed.
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

from testbed import data, judge  # noqa: E402
from testbed.model import REFINER_FILE, WEIGHTS_DIR, comfy_library  # noqa: E402

SAMPLER, SCHEDULER = "dpmpp_2m", "karras"


def negative_for(c: data.Combo) -> data.Combo:
    return data.Combo(c.background, c.shape, c.color, c.position)


def load_pack():
    """This pack's modules (nodes + core) in library mode, as the headless trainer loads them."""
    comfy_library()
    import nodes  # noqa: F401  ComfyUI's nodes.py must be imported before the pack's `nodes` package

    from comfy_headless import load_pack as load

    return load()


class Runner:
    """The loaded checkpoint plus batched sampling with model-evaluation counting."""

    def __init__(self, ckpt_path: str, stock_text_encode: bool = False):
        comfy_library()
        import comfy.sd

        self.model, self.clip, self.vae = comfy.sd.load_checkpoint_guess_config(ckpt_path)[:3]
        self.stock = stock_text_encode
        self._fast = None

    def encode(self, prompts: list[str]) -> torch.Tensor:
        if self.stock:
            import nodes

            enc = nodes.CLIPTextEncode()
            return torch.cat([enc.encode(self.clip, p)[0][0][0] for p in prompts])
        if self._fast is None:
            from testbed.textcache import FastEncoder

            self._fast = FastEncoder()
        return self._fast.encode(prompts)

    def sample(self, positive, negative: torch.Tensor, cfg: float, steps: int, seed: int, model=None):
        """positive [B,77,768] (one row per image) or a K-range refiner's stages [(start, end, [B,77,768])],
        negative [1 or B,77,768] -> (images [B,H,W,3], rows evaluated). model: another MODEL (a LoRA'd one)."""
        import nodes

        rows = [0]
        m = (model or self.model).clone()

        def wrapper(apply_model, args):
            rows[0] += int(args["input"].shape[0])
            return apply_model(args["input"], args["timestep"], **args["c"])

        m.set_model_unet_function_wrapper(wrapper)
        if isinstance(positive, torch.Tensor):
            pos = [[positive, {}]]
        else:  # as the Apply DICE Refiner node emits them: one entry per range, ComfyUI's own keys
            pos = [[t, {"start_percent": a, "end_percent": b}] for a, b, t in positive]
        b = pos[0][0].shape[0]
        latent = {"samples": torch.zeros(b, 4, data.SIZE // 8, data.SIZE // 8)}
        neg = [[negative, {}]]
        with torch.inference_mode():
            out = nodes.common_ksampler(m, seed, steps, cfg, SAMPLER, SCHEDULER, pos, neg, latent)[0]
            images = self.vae.decode(out["samples"])
        return images.reshape(-1, data.SIZE, data.SIZE, 3).float().numpy(), rows[0]


W_ROWS = (3.0, 7.0)  # a w-conditioned refiner's rows besides its reference w (5)


def methods(quick: bool, refiners: dict[str, str], w_keys=()) -> list[dict]:
    """refiners: key -> label of the loaded refiner files ("dice" is the shipped one); w_keys: those
    that take w as an input (one refiner for a range of w), which get rows at W_ROWS too."""
    m = [dict(name="cfg 1 (no guidance)", key="cfg1", cfg=1.0, pos="c", neg="null"),
         dict(name="CFG w=3", key="cfg3", cfg=3.0, pos="c", neg="null"),
         dict(name="CFG w=5", key="cfg5", cfg=5.0, pos="c", neg="null"),
         dict(name="CFG w=7", key="cfg7", cfg=7.0, pos="c", neg="null"),
         dict(name="CFG w=5, negative prompt", key="cfg5_neg", cfg=5.0, pos="c", neg="negative")]
    for key, label in refiners.items():
        m += [dict(name=f"DICE ({label}), cfg 1", key=key, cfg=1.0, pos=key, neg="null"),
              dict(name=f"DICE ({label}) + negative prompt, cfg 1", key=f"{key}_neg", cfg=1.0, pos=f"{key}_neg",
                   neg="null")]
        if key in w_keys:
            m += [dict(name=f"DICE ({label}) at w = {w:g}, cfg 1", key=f"{key}_w{w:g}", cfg=1.0, pos=f"{key}_w{w:g}",
                       neg="null", same_w=w) for w in W_ROWS]
    m += [dict(name="TeEFusion fusion w=4 (training-free), cfg 1", key="teefusion4", cfg=1.0, pos="fuse4", neg="null"),
          dict(name="TeEFusion fusion w=1 (training-free), cfg 1", key="teefusion1", cfg=1.0, pos="fuse1", neg="null"),
          dict(name="scaled embeddings x1.2, cfg 1", key="scaled", cfg=1.0, pos="scaled", neg="null")]
    if quick:  # extra refiners: their row without a negative only; CFG 3 / 7: the TeEFusion student's references
        m = [x for x in m if x["key"] in ("cfg1", "cfg3", "cfg5", "cfg7", "cfg5_neg", "dice", "dice_neg")
             or x["key"].startswith("dice_w")  # the shipped refiner's other w, when it takes w
             or (x["key"].startswith("dice:") and not x["key"].endswith("_neg"))]
    return m


# The avoidance test (what negative prompts are used for): the prompt leaves the shape's colour open,
# the user sees the colour the method drew and re-runs the same seed with that colour as the negative
# prompt. Measured: how many images still show the avoided colour, and whether the three attributes
# the prompt names stay right.
OPEN_COLOR_TEMPLATES = (
    "a {shape} on a {background} background, {position}",
    "{position}: {shape}, {background} background",
    "a {background} background with a {shape} in the {position}",
    "{shape} in the {position}, {background} backdrop",
)


def open_color_prompt(c: data.Combo, template: int) -> str:
    return OPEN_COLOR_TEMPLATES[template % len(OPEN_COLOR_TEMPLATES)].format(**c.__dict__)


def avoidance(runner, core, refiners: dict, combos, seeds: int, steps: int, seed: int, keys: list[str]) -> dict:
    """For CFG w=5 and each DICE refiner in keys: % of images that show the colour named by the
    negative (lower is better), with and without it, and the other three attributes' alignment."""
    prompts = [open_color_prompt(c, i) for i, c in enumerate(combos)]
    row_combos = [cb for cb in combos for _ in range(seeds)]
    c = runner.encode(prompts).repeat_interleave(seeds, dim=0)
    null = runner.encode([""])
    out = {}
    for key in keys:
        def positive(uc):
            if key == "cfg5":
                return c
            r = refiners[key]
            return [(a, b, t) for a, b, t in core.refine_ranges(r, c, uc, 1.0, w=r.info.guidance_scale)]

        cfg = 5.0 if key == "cfg5" else 1.0
        t0 = time.monotonic()
        base, _ = runner.sample(positive(null), null, cfg, steps, seed)
        shown = [judge.judge(img).color for img in base]
        negs = [col if col in data.COLORS else "" for col in shown]
        neg = runner.encode(negs)
        pos = positive(neg) if key != "cfg5" else c
        after, _ = runner.sample(pos, neg if key == "cfg5" else null, cfg, steps, seed)
        after_v = [judge.judge(img) for img in after]
        named = [i for i, n in enumerate(negs) if n]
        still = 100.0 * float(np.mean([after_v[i].color == negs[i] for i in named])) if named else float("nan")
        other = lambda vs: 100.0 * float(np.mean([  # noqa: E731
            np.mean([getattr(v, a) == getattr(cb, a) for a in ("shape", "background", "position")])
            for v, cb in zip(vs, row_combos)]))
        out[key] = dict(images=len(base), named=len(named), still_shows=still,
                        other3_without=other([judge.judge(img) for img in base]), other3_with=other(after_v),
                        seconds=time.monotonic() - t0)
        print(f"  avoidance {key}: still shows the negative's colour {still:.1f}% of {len(named)}  "
              f"other-3 alignment {out[key]['other3_without']:.1f} -> {out[key]['other3_with']:.1f}", flush=True)
    return out


def real_features(combos: list[data.Combo], per_combo: int = 8, seed: int = 4242) -> np.ndarray:
    images, index, _ = data.make_set(combos, per_combo, seed)
    return judge.score(images, [combos[i] for i in index])["features"]


def run(args) -> dict:
    pack = load_pack()
    from testbed.assemble import assemble

    core = sys.modules[pack.__name__ + ".cfg_distill"]
    ckpt = assemble(args.ckpt_dir, args.weights, force=args.weights != WEIGHTS_DIR)
    runner = Runner(ckpt, args.stock_text_encode)
    train, held = data.split()
    if args.split == "train":  # seen combinations, spread evenly over the training list
        combos = train[::max(1, len(train) // args.prompts)][:args.prompts]
    else:
        combos = held[:args.prompts]
    prompts = [c.prompt(i) for i, c in enumerate(combos)]
    negatives = [negative_for(c).prompt(i) for i, c in enumerate(combos)]
    t0 = time.monotonic()
    c = runner.encode(prompts)
    null = runner.encode([""])
    neg = runner.encode(negatives)
    t_text = time.monotonic() - t0
    S = args.seeds
    rep = lambda t: t.repeat_interleave(S, dim=0)  # noqa: E731  row = prompt * S + seed
    refiners, labels = {}, {}
    if os.path.exists(args.refiner):
        refiners["dice"] = core.load_refiner(args.refiner)
        labels["dice"] = shipped_label(refiners["dice"])
    for spec in args.extra_refiner:
        label, _, path = spec.rpartition("=")
        refiners[f"dice:{label}"] = core.load_refiner(path)
        labels[f"dice:{label}"] = label
    inputs = {"c": c, "null": null, "negative": neg, "scaled": c * 1.2,
              "fuse4": core.fuse_tokens(c, null, 4.0), "fuse1": core.fuse_tokens(c, null, 1.0)}
    for key, r in refiners.items():
        # w: a w-conditioned refiner at its reference w (single-w refiners ignore it)
        inputs[key] = core.refine_ranges(r, c, null, 1.0, w=r.info.guidance_scale)
        inputs[f"{key}_neg"] = core.refine_ranges(r, c, neg, 1.0, w=r.info.guidance_scale)
        if r.info.w_input:
            for w in W_ROWS:
                inputs[f"{key}_w{w:g}"] = core.refine_ranges(r, c, null, 1.0, w=w)
    w_keys = [k for k, r in refiners.items() if r.info.w_input]
    # --- TeEFusion student rows (testbed.bench_teefusion) ---
    from testbed import bench_teefusion

    tee_models = bench_teefusion.setup(runner, core, args.teefusion_lora, c, null, inputs)
    # --- end TeEFusion ---
    row_combos = [cb for cb in combos for _ in range(S)]
    real = real_features(combos)
    results, images = {}, {}
    chosen = methods(args.quick, labels, w_keys)
    chosen += bench_teefusion.methods(args.quick) if tee_models else []  # TeEFusion student rows
    if args.methods:  # "none": only the avoidance test
        every = methods(False, labels, w_keys) + (bench_teefusion.methods(False) if tee_models else [])
        chosen = [m for m in every if m["key"] in args.methods.split(",")]
    for m in chosen:
        t0 = time.monotonic()
        pos = inputs[m["pos"]]
        pos = rep(pos) if isinstance(pos, torch.Tensor) else [(a, b, rep(t)) for a, b, t in pos]
        negt = inputs["null"] if m["neg"] == "null" else rep(inputs[m["neg"]])
        imgs, rows = runner.sample(pos, negt, m["cfg"], args.steps, args.seed, model=tee_models.get(m.get("model")))
        sc = judge.score(imgs, row_combos)
        results[m["key"]] = dict(name=m["name"], cfg=m["cfg"], same_w=m.get("same_w"), nfe=rows / len(imgs),
                                 alignment=sc["alignment"],
                                 all_correct=sc["all_correct"], per_attribute=sc["per_attribute"],
                                 fd=judge.frechet(sc["features"], real), seconds=time.monotonic() - t0)
        images[m["key"]] = imgs
        print(f"  {m['name']}: alignment {sc['alignment']:.1f}%  all4 {sc['all_correct']:.1f}%  "
              f"nfe {rows / len(imgs):.0f}  ({time.monotonic() - t0:.0f}s)", flush=True)
    if "cfg5" in images:
        for k, imgs in images.items():
            results[k]["d_cfg5"] = float(np.sqrt(((imgs - images["cfg5"]) ** 2).mean(axis=(1, 2, 3))).mean())
    bench_teefusion.rms_to_same_w(results, images)
    avoid = {}
    if args.avoidance:
        keys = ["cfg5"] + [k for k in refiners if (args.methods in (None, "none") or k in args.methods.split(","))
                           and not (args.quick and k != "dice")]
        avoid = avoidance(runner, core, refiners, combos, S, args.steps, args.seed, keys)
    summary = summarize(results)
    bench_teefusion.summarize(results, summary)
    out = dict(prompts=prompts, seeds=S, steps=args.steps, sampler=f"{SAMPLER}/{SCHEDULER}", seed=args.seed,
               split=args.split, refiner=os.path.basename(args.refiner) if "dice" in refiners else None,
               refiner_info={k: r.info.summary() for k, r in refiners.items()},
               labels=labels, text_seconds=t_text, results=results, summary=summary, avoidance=avoid)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table_markdown(out))
    save_grid(images, combos, S, os.path.join(args.out, "grid.png"), args.grid_rows, results)
    return out


def shipped_label(loaded) -> str:
    i = loaded.info
    if i.w_input:
        parts = ["refiner for w {:g}-{:g}".format(*i.w_input["range"])]
    else:
        parts = [f"w={i.guidance_scale:g} refiner" if i.guidance_scale is not None else "refiner"]
    if i.ranges:
        parts.append(f"{len(i.ranges)} noise ranges")
    if i.negatives:
        parts.append("negative-trained")
    return ", ".join(parts)


def summarize(results: dict) -> dict:
    s = {}
    if "cfg1" in results and "cfg5" in results:
        gap = results["cfg5"]["alignment"] - results["cfg1"]["alignment"]
        s["gap_cfg5_minus_cfg1"] = gap
        for k in results:
            if k.startswith(("dice", "teefusion", "scaled")) and gap > 0:
                s[f"recovery_{k}"] = (results[k]["alignment"] - results["cfg1"]["alignment"]) / gap
            ref = f"cfg{results[k].get('same_w') or 0:g}"
            if results[k].get("same_w") and ref in results:  # a w-conditioned refiner: against CFG at its w
                same_gap = results[ref]["alignment"] - results["cfg1"]["alignment"]
                if same_gap > 0:
                    s[f"recovery_same_w_{k}"] = (results[k]["alignment"] - results["cfg1"]["alignment"]) / same_gap
    return s


def table_markdown(out: dict) -> str:
    which = ("Training prompts: {} (combinations the refiners were trained on)" if out.get("split") == "train"
             else "Held-out prompts: {} (combinations never seen in training)").format(len(out["prompts"]))
    lines = [f"{which} x {out['seeds']} seeds; "
             f"{out['sampler']}, {out['steps']} steps, base seed {out['seed']}.", "",
             "| method | NFE / image | alignment % | all 4 % | colour | shape | background | position | FD (judge) | "
             "RMS to CFG 5 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"].values():
        pa = r["per_attribute"]
        lines.append(f"| {r['name']} | {r['nfe']:.0f} | {r['alignment']:.1f} | {r['all_correct']:.1f} | "
                     f"{pa['color']:.0f} | {pa['shape']:.0f} | {pa['background']:.0f} | {pa['position']:.0f} | "
                     f"{r['fd']:.3f} | {r.get('d_cfg5', float('nan')):.3f} |")
    s = out["summary"]
    if "gap_cfg5_minus_cfg1" in s:
        lines += ["", f"CFG w=5 minus cfg 1: {s['gap_cfg5_minus_cfg1']:+.1f} alignment points."]
        for k, r in out["results"].items():
            if f"recovery_{k}" in s and not k.startswith("tee_"):
                lines.append(f"{r['name'].replace(', cfg 1', '')} recovers {100 * s[f'recovery_{k}']:.0f}% of that gap.")
            if f"recovery_same_w_{k}" in s:
                lines.append(f"{r['name'].replace(', cfg 1', '')} recovers {100 * s[f'recovery_same_w_{k}']:.0f}% "
                             f"of the CFG w={r['same_w']:g} gap.")
    avoid = out.get("avoidance") or {}
    if avoid:
        lines += ["", "Avoidance (the prompt leaves the shape's colour open; the same seed re-run with the colour "
                  "the method drew as the negative prompt; lower 'still shows' is better):", "",
                  "| method | still shows the negative's colour % | other 3 attributes without negative % | "
                  "with negative % |", "|---|---|---|---|"]
        for k, a in avoid.items():
            name = "CFG w=5 + negative" if k == "cfg5" else f"DICE ({out['labels'].get(k, k)}) + negative, cfg 1"
            lines.append(f"| {name} | {a['still_shows']:.1f} | {a['other3_without']:.1f} | {a['other3_with']:.1f} |")
    from testbed import bench_teefusion

    lines += bench_teefusion.markdown(out)
    return "\n".join(lines) + "\n"


def save_grid(images: dict, combos, seeds: int, path: str, rows: int, results: dict, scale: int = 3) -> None:
    from PIL import Image, ImageDraw

    keys = list(images)
    n = min(rows, len(combos))
    cell, pad, head, left = data.SIZE * scale, 4, 16, 250
    W = left + len(keys) * (cell + pad)
    H = head + n * (cell + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, k in enumerate(keys):
        draw.text((left + j * (cell + pad), 2), k, fill=(0, 0, 0))
    for i in range(n):
        y = head + i * (cell + pad)
        draw.text((2, y + cell // 2 - 6), combos[i].prompt(i)[:44], fill=(0, 0, 0))
        for j, k in enumerate(keys):
            img = (np.clip(images[k][i * seeds], 0, 1) * 255).astype(np.uint8)
            canvas.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (left + j * (cell + pad), y))
    canvas.save(path)


def main_args(argv=None) -> argparse.Namespace:
    """The bench's settings from command-line words (defaults filled in), for main and for scripts
    that call run() directly."""
    ap = argparse.ArgumentParser(description="Quality table of CFG / DICE / TeEFusion on the testbed model.")
    ap.add_argument("--quick", action="store_true", help="CI subset: 12 prompts x 2 seeds, cfg 1 / CFG 5 / DICE")
    ap.add_argument("--prompts", type=int, default=None, help="held-out prompts to use (default 60; quick 12)")
    ap.add_argument("--split", choices=["held-out", "train"], default="held-out",
                    help="train: prompts of combinations seen in training instead (does the refiner generalise, "
                         "or does it fall short on what it was trained on too?)")
    ap.add_argument("--seeds", type=int, default=None, help="noise draws per prompt (default 4; quick 2)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--refiner", default=os.path.join(WEIGHTS_DIR, REFINER_FILE))
    ap.add_argument("--ckpt-dir", default=os.path.join(ROOT, "out", "testbed"))
    ap.add_argument("--teefusion-lora", default=os.path.join(WEIGHTS_DIR, "testbed-teefusion-lora.safetensors"),
                    help="the TeEFusion student LoRA (rows left out when the file is missing)")
    ap.add_argument("--weights", default=WEIGHTS_DIR, help="folder with the testbed's unet / vae weights")
    ap.add_argument("--methods", default=None, help="comma-separated method keys (default: all)")
    ap.add_argument("--extra-refiner", action="append", default=[], metavar="LABEL=PATH",
                    help="another refiner file to compare (rows dice:LABEL and dice:LABEL_neg); repeatable")
    ap.add_argument("--avoidance", action=argparse.BooleanOptionalAction, default=True,
                    help="run the avoidance test (negative prompt naming the colour drawn)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--grid-rows", type=int, default=12)
    ap.add_argument("--stock-text-encode", action="store_true", help="encode prompts with CLIPTextEncode itself")
    args = ap.parse_args(argv)
    args.prompts = args.prompts or (12 if args.quick else 60)
    args.seeds = args.seeds or (2 if args.quick else 4)
    args.out = args.out or os.path.join(ROOT, "out", "testbed", "bench-quick" if args.quick else "bench")
    return args


def main(argv=None) -> int:
    args = main_args(argv)
    torch.set_num_threads(int(os.environ.get("TESTBED_THREADS", "2")))
    started = time.monotonic()
    out = run(args)
    print()
    print(table_markdown(out))
    print(f"grid: {os.path.join(args.out, 'grid.png')}   table: {os.path.join(args.out, 'table.md')}   "
          f"({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
