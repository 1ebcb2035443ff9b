"""The main job on an embedded default: run the DICE example workflow headless on the real
ComfyUI against plain CFG, for the same seed and steps, and print model calls, sampling time and
where the images went; then print the testbed's quality table and save its image grid.

The default model is the testbed (testbed/, weights/testbed/): a small, really trained SD1.5-format
text-to-image model of coloured shapes (32x32 px) with its DICE refiner trained by this pack's
trainer at w=5. Its checkpoint is assembled from the committed weights plus the text encoder
regenerated from its seed. Without those weights (or with --tiny) the demo falls back to a generated
random-weight SD1.5-architecture checkpoint and an untrained refiner (mechanics and cost only).

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
TESTBED_PROMPT_INDEX = 3  # a held-out prompt (a combination the testbed model never saw in training)


def testbed_available() -> bool:
    from testbed.model import REFINER_FILE, WEIGHTS_DIR, weights_present

    return weights_present() and os.path.isfile(os.path.join(WEIGHTS_DIR, REFINER_FILE))


def prepare_testbed(base: str) -> dict:
    """Assemble the testbed checkpoint into the server's checkpoints folder; copy its refiner."""
    import shutil

    from testbed import data
    from testbed.assemble import assemble
    from testbed.model import CKPT_NAME, REFINER_FILE, WEIGHTS_DIR

    ckpt = assemble(os.path.join(base, "models", "checkpoints"))
    ref_dir = os.path.join(base, "models", "dice_refiners")
    os.makedirs(ref_dir, exist_ok=True)
    shutil.copyfile(os.path.join(WEIGHTS_DIR, REFINER_FILE), os.path.join(ref_dir, REFINER_FILE))
    _train, held = data.split()
    prompt = held[TESTBED_PROMPT_INDEX].prompt(TESTBED_PROMPT_INDEX)
    print(f"testbed checkpoint: {ckpt}")
    return {"ckpt": CKPT_NAME, "refiner": REFINER_FILE, "prompt": prompt, "size": data.SIZE}


def quality_table(args) -> int:
    """The testbed's quality table on held-out prompts (testbed.bench, in its own process: it runs
    ComfyUI in library mode), printed here; it also writes the image grid."""
    import subprocess

    flags = {"demo": ["--prompts", "24"], "full": [], "quick": ["--quick"]}[args.table]
    out = os.path.join(args.out, "quality")
    print(f"\nQuality on the testbed ({args.table} table; CFG, DICE, TeEFusion and baselines on held-out prompts) ...",
          flush=True)
    proc = subprocess.run([sys.executable, "-m", "testbed.bench", *flags, "--out", out,
                           "--ckpt-dir", os.path.join(args.out, "models", "checkpoints")], cwd=ROOT)
    return proc.returncode


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


def build(object_info, method: str, steps: int, size: int, seed: int, model: dict | None = None) -> dict:
    with open(os.path.join(ROOT, "example_workflows", "dice_sd15.json")) as f:
        api = to_api(json.load(f), object_info)
    ids = {v["class_type"]: k for k, v in api.items()}
    api[ids["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = model["ckpt"] if model else CKPT
    api[ids["DiceRefinerLoader"]]["inputs"]["refiner_name"] = model["refiner"] if model else REFINER
    if model:
        pos_node = api[ids["DiceRefinerApply"]]["inputs"]["positive"][0]
        api[pos_node]["inputs"]["text"] = model["prompt"]
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
    ap.add_argument("--tiny", action="store_true", help="use the random-weight tiny checkpoint, not the testbed")
    ap.add_argument("--table", choices=["demo", "full", "quick", "none"], default="demo",
                    help="testbed quality table: demo = 24 held-out prompts x 2 seeds (a few minutes), full = "
                         "all 60 x 2 (testbed.bench default), quick = the CI subset, none = skip")
    args = ap.parse_args()

    model = None
    if not args.tiny and testbed_available():
        model = prepare_testbed(args.out)
        args.size = model["size"]
    else:
        if not args.tiny:
            print("testbed weights not found (weights/testbed/): using the random-weight tiny checkpoint")
        prepare(args.out)
    rows, images = {}, {}
    with ComfyServer(args.out) as srv:
        info = srv.get("/object_info")
        for r in range(args.repeats):
            for method in ("cfg", "dice"):  # interleaved, so machine noise hits both alike
                entry = srv.run(build(info, method, args.steps, args.size, args.seed, model))
                if not succeeded(entry):
                    print(f"{method} failed: {execution_error(entry)}", file=sys.stderr)
                    return 1
                rep = next(o["model_calls"][0] for o in entry["outputs"].values() if "model_calls" in o)
                rows.setdefault(method, []).append(rep)
                images[method] = [os.path.join(args.out, "output", i["subfolder"], i["filename"])
                                  for o in entry["outputs"].values() for i in o.get("images", [])]

    def med(method, key):
        return statistics.median(r[key] for r in rows[method])

    what = (f"testbed model (trained; held-out prompt {model['prompt']!r}) with its trained DICE refiner" if model
            else "tiny random-weight SD1.5-architecture checkpoint")
    print(f"\nSame seed ({args.seed}), sampler dpmpp_2m / karras, {args.steps} steps, {args.size}x{args.size} px, "
          f"{what}, CPU, median of {args.repeats}:\n")
    print("| method | cfg | model calls | rows evaluated (batch) | sampling s | s / step |")
    print("|---|---|---|---|---|---|")
    for method, cfg in (("cfg", 5.0), ("dice", 1.0)):
        r = rows[method][0]
        name = "CFG (plain prompt)" if method == "cfg" else "DICE refiner"
        print(f"| {name} | {cfg} | {r['calls']} | {sum(r['batches'])} | {med(method, 'sampling_seconds'):.3f} | "
              f"{med(method, 'sampling_seconds') / args.steps:.4f} |")
    ratio = med("dice", "sampling_seconds") / med("cfg", "sampling_seconds")
    print(f"\nDICE / CFG sampling time: {ratio:.2f}")
    if model:
        print("At 32x32 px a model call costs little next to the sampler's own work, so the time ratio says little\n"
              "here; the model calls (one pass per step for DICE) are what carries over to real sizes. The speed\n"
              "at SD1.5 / SDXL sizes is in benchmarks/RESULTS.md.")
    else:
        print("Note: the refiner here is untrained (random); it shows the mechanics and the cost, not quality.\n"
              "CFG evaluates the prompt and the negative as one call of batch 2: at small sizes (try --size 128)\n"
              "that second row is nearly free on a CPU, so the saving shows at realistic sizes.")
    for method, paths in images.items():
        for p in paths:
            print(f"{method} image: {p}")
    if model and args.table != "none":
        return quality_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
