"""Command line: `python -m cfg_distill import-official IN.pkl OUT.safetensors [--family sd15 ...]`
and `python -m cfg_distill info FILE.safetensors`."""
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cfg_distill")
    sub = ap.add_subparsers(dest="cmd", required=True)
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
