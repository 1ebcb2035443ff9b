"""The main job on an embedded default: run the DICE example workflow headless on the real
ComfyUI with a generated tiny checkpoint, against plain CFG, for the same seed and steps, and print
model calls, sampling time and where the images went.

    bash tools/demo.sh            (sets up, then runs this)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.comfy_server import ComfyServer, execution_error, succeeded  # noqa: E402
from tools.workflow_api import to_api  # noqa: E402

CKPT, REFINER = "tiny-sd15.safetensors", "demo-untrained-sd15.safetensors"


def prepare(base: str) -> None:
    import torch

    from cfg_distill import DiceRefiner, RefinerInfo, save_refiner
    from tools.tiny_models import write_tiny_sd15

    ckpt = os.path.join(base, "models", "checkpoints", CKPT)
    if not os.path.exists(ckpt):
        os.makedirs(os.path.dirname(ckpt), exist_ok=True)
        print(f"generating tiny SD1.5-architecture checkpoint (random weights) -> {ckpt}")
        write_tiny_sd15(ckpt)
    ref = os.path.join(base, "models", "dice_refiners", REFINER)
    if not os.path.exists(ref):
        os.makedirs(os.path.dirname(ref), exist_ok=True)
        torch.manual_seed(0)
        save_refiner(ref, DiceRefiner(768), RefinerInfo(768, 512, base_family="sd15", base_checkpoint=CKPT,
                                                         train_steps=0, extra={"note": "untrained demo refiner"}))


def build(object_info, method: str, steps: int, size: int, seed: int) -> dict:
    with open(os.path.join(ROOT, "example_workflows", "dice_sd15.json")) as f:
        api = to_api(json.load(f), object_info)
    ids = {v["class_type"]: k for k, v in api.items()}
    api[ids["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = CKPT
    api[ids["DiceRefinerLoader"]]["inputs"]["refiner_name"] = REFINER
    api[ids["EmptyLatentImage"]]["inputs"].update(width=size, height=size)
    ks = api[ids["KSampler"]]["inputs"]
    ks.update(steps=steps, seed=seed, cfg=5.0 if method == "cfg" else 1.0)
    if method == "cfg":  # the baseline: the prompt goes straight to the sampler at cfg 5
        ks["positive"] = api[ids["DiceRefinerApply"]]["inputs"]["positive"]
    api[ids["SaveImage"]]["inputs"]["filename_prefix"] = f"demo/{method}"
    api["900"] = {"class_type": "CountModelCalls", "inputs": {"model": ks["model"], "label": method}}
    ks["model"] = ["900", 0]
    api["901"] = {"class_type": "ReportModelCalls", "inputs": {"samples": [ids["KSampler"], 0], "label": method}}
    return api


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256, help="image size in pixels")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "demo"))
    args = ap.parse_args()

    prepare(args.out)
    rows, images = {}, {}
    with ComfyServer(args.out) as srv:
        info = srv.get("/object_info")
        for r in range(args.repeats):
            for method in ("cfg", "dice"):  # interleaved, so machine noise hits both alike
                entry = srv.run(build(info, method, args.steps, args.size, args.seed))
                if not succeeded(entry):
                    print(f"{method} failed: {execution_error(entry)}", file=sys.stderr)
                    return 1
                rep = next(o["model_calls"][0] for o in entry["outputs"].values() if "model_calls" in o)
                rows.setdefault(method, []).append(rep)
                images[method] = [os.path.join(args.out, "output", i["subfolder"], i["filename"])
                                  for o in entry["outputs"].values() for i in o.get("images", [])]

    def med(method, key):
        return statistics.median(r[key] for r in rows[method])

    print(f"\nSame seed ({args.seed}), sampler dpmpp_2m / karras, {args.steps} steps, {args.size}x{args.size} px, "
          f"tiny random-weight SD1.5-architecture checkpoint, CPU, median of {args.repeats}:\n")
    print("| method | cfg | model calls | rows evaluated (batch) | sampling s | s / step |")
    print("|---|---|---|---|---|---|")
    for method, cfg in (("cfg", 5.0), ("dice", 1.0)):
        r = rows[method][0]
        name = "CFG (plain prompt)" if method == "cfg" else "DICE refiner"
        print(f"| {name} | {cfg} | {r['calls']} | {sum(r['batches'])} | {med(method, 'sampling_seconds'):.3f} | "
              f"{med(method, 'sampling_seconds') / args.steps:.4f} |")
    ratio = med("dice", "sampling_seconds") / med("cfg", "sampling_seconds")
    print(f"\nDICE / CFG sampling time: {ratio:.2f}")
    print("Note: the refiner here is untrained (random); it shows the mechanics and the cost, not quality.\n"
          "CFG evaluates the prompt and the negative as one call of batch 2: at small sizes (try --size 128)\n"
          "that second row is nearly free on a CPU, so the saving shows at realistic sizes.")
    for method, paths in images.items():
        for p in paths:
            print(f"{method} image: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
