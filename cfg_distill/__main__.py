"""Command line:

    python -m cfg_distill train dice --ckpt MODEL [options]        train a DICE refiner (ComfyUI library mode)
    python -m cfg_distill train teefusion --ckpt MODEL [options]   train a TeEFusion student LoRA
    python -m cfg_distill info FILE.safetensors                    print a refiner file's metadata
    python -m cfg_distill import-official IN.pkl OUT.safetensors   convert an official DICE pickle safely

`train`'s options are generated from the training request (cfg_distill.request); the ComfyUI side
lives in comfy_headless/ and is imported only when training starts. Run it from the pack's folder.
"""
from __future__ import annotations

import argparse
import sys

from .families import FAMILIES
from .refiner import DiceRefiner
from .refiner_file import RefinerFileError, RefinerInfo, load_refiner, save_refiner


def _import_official(args) -> int:
    from .official_import import RefusedPickle, read_official_state_dict

    try:
        state = read_official_state_dict(args.input)
    except (RefusedPickle, OSError, EOFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    inner, dim = state["fc1.weight"].shape
    try:
        refiner = DiceRefiner(dim, inner, args.heads)
    except ValueError as e:
        print(f"error: {e}; pass --heads with a divisor of {inner} (official: 8)", file=sys.stderr)
        return 2
    refiner.load_state_dict(state)
    family = FAMILIES[args.family]
    info = RefinerInfo(token_dim=dim, inner_dim=inner, heads=args.heads, base_family=args.family,
                       base_checkpoint=args.base_checkpoint, guidance_scale=args.guidance_scale,
                       keep_first_token=family.keep_first_token,
                       extra={"source": "official DICE pickle"})
    try:
        save_refiner(args.output, refiner, info)
    except (RefinerFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {info.summary()}")
    return 0


def _info(args) -> int:
    try:
        loaded = load_refiner(args.file)
    except RefinerFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(loaded.info.summary())
    return 0


def _train(args) -> int:
    import shlex
    from dataclasses import replace

    from comfy_headless.train import EXIT_BAD_REQUEST, main as train_main

    from .request import RequestError, from_arguments

    try:
        request = from_arguments(args, args.method)
        if getattr(args, "w_range", None):
            lo, hi = (float(v) for v in args.w_range.split(","))
            request = replace(request, w_min=lo, w_max=hi)
        # The command line never replaces a saved run silently; the file records what made it.
        request = replace(request, overwrite=bool(args.overwrite),
                          command="python -m cfg_distill " + shlex.join(args.argv))
        replace(request, name=request.name or "check").validate()  # fail fast, before ComfyUI loads
    except (RequestError, ValueError) as e:
        print(f"error: {as_flags(str(e))}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    return train_main(args, request)


def as_flags(message: str) -> str:
    """A request error in the command line's words: setting names (w_min) become flags (--w-min)."""
    import re
    from dataclasses import fields

    from .request import TrainRequest

    names = [f.name for f in fields(TrainRequest) if "_" in f.name]
    return re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: "--" + m.group(1).replace("_", "-"), message)


def _add_train(sub) -> None:
    from comfy_headless.train import add_host_arguments

    from .request import add_arguments

    train = sub.add_parser("train", help="train a DICE refiner or a TeEFusion student LoRA for a checkpoint "
                                         "(ComfyUI's library mode; torchrun for several GPUs)")
    methods = train.add_subparsers(dest="method", required=True)
    helps = {"dice": "a DICE refiner: one pass at cfg 1 with refined prompt tokens reproduces CFG",
             "teefusion": "a TeEFusion student LoRA: one pass with fused conditioning at w reproduces CFG at w"}
    for method in ("dice", "teefusion"):
        p = methods.add_parser(method, help=helps[method], description=helps[method])
        add_host_arguments(p, method)
        add_arguments(p, method)
        p.set_defaults(func=_train)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cfg_distill")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_train(sub)
    imp = sub.add_parser("import-official", help="convert an official DICE .pkl safely (no code runs); "
                         "snapshots of bf16 (accelerate mixed precision) runs included")
    imp.add_argument("input")
    imp.add_argument("output")
    imp.add_argument("--family", default="unknown", choices=sorted(FAMILIES))
    imp.add_argument("--heads", type=int, default=8, help="attention heads (official: 8)")
    imp.add_argument("--guidance-scale", type=float, default=5.0, help="w it was trained at (official: 5)")
    imp.add_argument("--base-checkpoint", default="")
    imp.set_defaults(func=_import_official)
    inf = sub.add_parser("info", help="print a refiner file's metadata")
    inf.add_argument("file")
    inf.set_defaults(func=_info)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
