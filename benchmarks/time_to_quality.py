#!/usr/bin/env python
"""Time to quality: how a default training run's recovery of CFG's gain grows with the teacher
samples it has used (and its wall time, also counted in "CFG images' worth" of compute).

One run is the product's own command line, `python -m cfg_distill train dice|teefusion`, on the
testbed (its checkpoint, its 2,160 training captions as the prompts, its 32 px size), with the
defaults a user gets plus whatever flags follow `--`. The run saves its training state every
--every steps (atomic saves); this script copies each saved state as a snapshot, with the wall time
at which it appeared. `evaluate` turns every snapshot into the file the run would have written at
that step and judges it with the testbed bench (held-out prompts, CFG at the same w as reference).

    python benchmarks/time_to_quality.py train dice --out out/ttq/dice-default
    python benchmarks/time_to_quality.py train dice --out out/ttq/dice-X -- --steps 4000 --lr 1e-3
    python benchmarks/time_to_quality.py evaluate out/ttq/dice-default [--prompts 60 --seeds 4]
    python benchmarks/time_to_quality.py plot out/ttq/dice-default/curve-*.json [more] --png docs/time_to_quality.png

A snapshot's teacher samples are step x batch_size x grad_accum (the training targets the CFG teacher
made; the x0 latents of the data-free mode cost a further prompts x x0_steps CFG steps once, recorded
as `x0_cfg_steps`). "CFG images' worth": the run's wall time divided by the time of one 20-step CFG
image at the training size, measured just before the run in the same process layout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SIZE = 32  # the testbed model's own size (px)
CFG_IMAGE_STEPS = 20


def _train_prompts(path: str) -> str:
    from testbed import data

    train, _ = data.split()
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(data.all_prompts(train)) + "\n")
    return path


def _cfg_image_seconds(ckpt: str, repeats: int = 3) -> float:
    """Seconds of one CFG image (w 5, 20 steps, batch 1, dpmpp_2m / karras) on the testbed checkpoint."""
    code = f"""
import sys, time, torch
sys.path.insert(0, {ROOT!r})
from testbed.bench import Runner
r = Runner({ckpt!r})
c = r.encode(["a red circle on a green background, top left"]); null = r.encode([""])
r.sample(c, null, 5.0, {CFG_IMAGE_STEPS}, 0)
t = []
for i in range({repeats}):
    t0 = time.perf_counter(); r.sample(c, null, 5.0, {CFG_IMAGE_STEPS}, i); t.append(time.perf_counter() - t0)
print(sorted(t)[len(t) // 2])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def train(args) -> int:
    from testbed.assemble import assemble

    os.makedirs(os.path.join(args.out, "snapshots"), exist_ok=True)
    ckpt = assemble()
    prompts = _train_prompts(os.path.join(args.out, "prompts.txt"))
    cfg_image_s = _cfg_image_seconds(ckpt)
    name = "run"
    cmd = [sys.executable, "-m", "cfg_distill", "train", args.method, "--ckpt", ckpt, "--prompts", prompts,
           "--width", str(SIZE), "--height", str(SIZE), "--out-dir", os.path.join(args.out, "files"),
           "--name", name, "--save-every", str(args.every), "--overwrite", "--no-progress", *args.extra]
    suffix = ".dice-train-state" if args.method == "dice" else ".teefusion-train-state"
    state = os.path.join(args.out, "files", name + suffix)
    record = dict(method=args.method, command=cmd[1:], extra=args.extra, cfg_image_seconds=cfg_image_s,
                  size=SIZE, snapshots=[])
    print("running:", " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    with open(os.path.join(args.out, "train.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        seen = None
        while True:
            done = proc.poll() is not None
            if os.path.exists(state):
                stamp = os.stat(state).st_mtime_ns
                if stamp != seen:
                    seen = stamp
                    wall = time.monotonic() - t0
                    snap = os.path.join(args.out, "snapshots", f"t{len(record['snapshots']):03d}{suffix}")
                    shutil.copyfile(state, snap)  # saves are atomic (os.replace): a whole file either way
                    record["snapshots"].append(dict(file=os.path.basename(snap), wall_s=wall))
                    print(f"snapshot {snap} at {wall:.0f} s", flush=True)
            if done:
                break
            time.sleep(1.0)
    record["returncode"] = proc.returncode
    record["wall_s"] = time.monotonic() - t0
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"exit {proc.returncode} after {record['wall_s']:.0f} s; log: {os.path.join(args.out, 'train.log')}")
    return proc.returncode


def _snapshot_file(core, method: str, state_path: str, out_path: str, template: str = "") -> dict:
    """The file the run would have written at the snapshot's step; returns {step, teacher_samples}."""
    st = core.training.load_training_state(state_path)
    cfg = st.config or {}
    samples = st.step * int(cfg.get("batch_size", 1)) * int(cfg.get("grad_accum", 1)) * st.world_size
    if method == "dice":
        info = core.refiner_file.read_refiner_info(state_path)
        refiner = core.refiner.DiceRefiner(*st.shape)
        refiner.load_state_dict(st.refiner)
        core.refiner_file.save_refiner(out_path, refiner, info)
    else:
        # The state holds the student's tensors under its module names ("<module>.lora_up" [out, r]);
        # the run's own output file (written at its end) gives the LoRA key, shape and alpha of each.
        from safetensors import safe_open
        from safetensors.torch import save_file

        import importlib

        lora_key = importlib.import_module(core.__name__ + ".teefusion_training").lora_key
        with safe_open(template, "pt") as f:
            meta, ref = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        out = {}
        for name, t in st.refiner.items():
            module, part = name.rsplit(".", 1)  # part: lora_up / lora_down
            key = f"{lora_key(module)}.{part}.weight"
            out[key] = t.reshape(ref[key].shape).to(ref[key].dtype).contiguous()
            out[f"{lora_key(module)}.alpha"] = ref[f"{lora_key(module)}.alpha"]
        if set(out) != set(ref):
            raise SystemExit(f"snapshot {state_path} does not match the run's file {template}: "
                             f"{sorted(set(ref) ^ set(out))[:3]}")
        save_file(out, out_path, metadata=meta)
    ratio = st.checks[-1].loss / st.checks[0].loss if len(st.checks) > 1 and st.checks[0].loss > 0 else None
    return dict(step=st.step, teacher_samples=samples, check_ratio=ratio)


def evaluate(args) -> int:
    from testbed import bench

    pack = bench.load_pack()
    core = sys.modules[pack.__name__ + ".cfg_distill"]
    for run_dir in args.runs:
        with open(os.path.join(run_dir, "run.json")) as f:
            record = json.load(f)
        method = record["method"]
        ev = os.path.join(run_dir, "eval")
        os.makedirs(ev, exist_ok=True)
        snaps = record["snapshots"][-args.last:] if args.last else record["snapshots"]
        specs = []
        for s in snaps:
            path = os.path.join(ev, s["file"].split(".")[0] + ".safetensors")
            s.update(_snapshot_file(core, method, os.path.join(run_dir, "snapshots", s["file"]), path,
                                    template=os.path.join(run_dir, "files", "run.safetensors")))
            s["path"] = path
            specs.append(s)
        rows = []
        for s in specs:  # one bench call per snapshot: the CFG rows are the bench's own, the same each time
            bench_args = ["--prompts", str(args.prompts), "--seeds", str(args.seeds), "--seed", str(args.seed),
                          "--no-avoidance", "--out", os.path.join(ev, f"bench-{s['step']}-seed{args.seed}"),
                          "--grid-rows", "4"]
            if method == "dice":
                bench_args += ["--refiner", s["path"], "--teefusion-lora", "",
                               "--methods", "cfg1,cfg3,cfg5,cfg7,cfg5_neg,dice,dice_neg,dice_w3,dice_w7"]
            else:
                bench_args += ["--refiner", "", "--teefusion-lora", s["path"],
                               "--methods", "cfg1,cfg3,cfg5,cfg7,tee_lora3,tee_lora5,tee_lora7"]
            out = bench.run(bench.main_args(bench_args))
            summ, res = out["summary"], out["results"]
            row = dict(step=s["step"], teacher_samples=s["teacher_samples"], wall_s=s["wall_s"],
                       cfg_images=s["wall_s"] / record["cfg_image_seconds"], check_ratio=s.get("check_ratio"))
            if method == "dice":
                row["recovery"] = {"5": summ.get("recovery_dice")}
                for w in (3, 7):
                    row["recovery"][str(w)] = summ.get(f"recovery_same_w_dice_w{w}")
                row["with_negative"] = res["dice_neg"]["alignment"]
                row["cfg_with_negative"] = res["cfg5_neg"]["alignment"]
                row["fd_w5"] = res["dice"]["fd"]
            else:
                row["recovery"] = {str(w): summ.get(f"recovery_tee_lora{w}") for w in (3, 5, 7)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        with open(os.path.join(run_dir, f"curve-seed{args.seed}-{args.prompts}x{args.seeds}.json"), "w") as f:
            json.dump(dict(run=record, prompts=args.prompts, seeds=args.seeds, seed=args.seed, rows=rows), f, indent=1)
    return 0


def plot(args) -> int:
    try:
        import matplotlib
    except ImportError:
        print("error: the plot needs matplotlib (a lab tool, not a dependency of the pack): "
              "pip install matplotlib", file=sys.stderr)
        return 2

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for spec in args.curves:
        curve_path, _, label = spec.partition("=")  # PATH or PATH=LABEL
        with open(curve_path) as f:
            c = json.load(f)
        label = label or c["run"]["method"] + (" " + " ".join(c["run"]["extra"]) if c["run"]["extra"] else " (defaults)")
        for w, style in (("5", "-"), ("3", ":"), ("7", "--")):
            xs = [r["teacher_samples"] for r in c["rows"] if r["recovery"].get(w) is not None]
            ys = [100 * r["recovery"][w] for r in c["rows"] if r["recovery"].get(w) is not None]
            if xs:
                axes[0].plot(xs, ys, style, marker="o", ms=3, label=f"{label}, w={w}")
        xs = [r["cfg_images"] for r in c["rows"] if r["recovery"].get("5") is not None]
        ys = [100 * r["recovery"]["5"] for r in c["rows"] if r["recovery"].get("5") is not None]
        axes[1].plot(xs, ys, marker="o", ms=3, label=f"{label}, w=5")
        pts = [(100 * r["recovery"]["5"], 100 * r["check_ratio"]) for r in c["rows"]
               if r.get("check_ratio") is not None and r["recovery"].get("5") is not None]
        if pts:  # what the live held-out check said when the run had that quality
            axes[2].plot([p[1] for p in pts], [p[0] for p in pts], marker="o", ms=3, label=f"{label}, w=5")
    axes[2].set_xlabel("held-out check: % of the start's gap left (shown while training)")
    axes[2].invert_xaxis()
    for ax, xl in ((axes[0], "teacher samples"), (axes[1], "wall time, in 20-step CFG images' worth (CPU, shared cores)"),
                   (axes[2], None)):
        ax.axhline(90, color="grey", lw=0.8, ls="--")
        if xl:
            ax.set_xlabel(xl)
        ax.set_ylabel("% of CFG's gain kept (held-out prompts)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if axes[2].lines:
        axes[2].legend(fontsize=7)
    fig.suptitle("Time to quality of one training run (testbed)")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(args.png)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="one run of the command line with snapshots")
    t.add_argument("method", choices=["dice", "teefusion"])
    t.add_argument("--out", required=True)
    t.add_argument("--every", type=int, default=250, help="steps between snapshots (the run's --save-every)")
    e = sub.add_parser("evaluate", help="judge every snapshot of runs with the testbed bench")
    e.add_argument("runs", nargs="+")
    e.add_argument("--prompts", type=int, default=12)
    e.add_argument("--seeds", type=int, default=2)
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--last", type=int, default=0, help="only the last N snapshots (0: all)")
    p = sub.add_parser("plot", help="draw curves of evaluated runs")
    p.add_argument("curves", nargs="+", help="curve-*.json files written by evaluate (FILE=LABEL names a curve)")
    p.add_argument("--png", default=os.path.join(ROOT, "docs", "time_to_quality.png"))
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # flags for the training command line
    args = ap.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.extra = extra
    return {"train": train, "evaluate": evaluate, "plot": plot}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
