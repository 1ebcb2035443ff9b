"""Combine refiners trained on disjoint noise-level ranges (testbed.train_refiner --percent-range)
into one K-range refiner file (cfg_distill.refiner_file.save_range_refiner), float16.

    python -m testbed.combine_ranges OUT.safetensors A.safetensors B.safetensors ...

The inputs must be in sampling order and their ranges (recorded by train_refiner) must tile 0..1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cfg_distill.refiner_file import (RANGE_PREFIX, atomic_save_safetensors, load_refiner,  # noqa: E402
                                      validate_ranges)


def combine(out: str, inputs: list[str]) -> None:
    ranges, trainings, loaded = [], [], []
    for path in inputs:
        with safe_open(path, framework="pt") as f:
            training = json.loads((f.metadata() or {}).get("testbed_training", "{}"))
        if "percent_range" not in training:
            raise SystemExit(f"{path}: no percent_range recorded; train it with testbed.train_refiner --percent-range")
        ranges.append(training["percent_range"])
        trainings.append(training)
        loaded.append(load_refiner(path))
    validate_ranges(ranges, os.path.basename(out))
    first = loaded[0].info
    if any(x.info.w_input != first.w_input for x in loaded):
        raise SystemExit("the inputs differ in their w input (train every range with the same --w-range)")
    negatives = all(x.info.negatives for x in loaded)
    info = first.__class__(**{**first.__dict__, "ranges": ranges, "negatives": negatives,
                              "train_steps": sum(x.info.train_steps or 0 for x in loaded),
                              "extra": {"range_train_steps": [x.info.train_steps for x in loaded]}})
    tensors = {}
    for k, x in enumerate(loaded):
        tensors.update({RANGE_PREFIX.format(k) + n: v.to(torch.float16) for n, v in x.module.state_dict().items()})
    meta = {**info.to_metadata(), "testbed_training": json.dumps(trainings)}
    atomic_save_safetensors(tensors, out, meta)
    print(f"wrote {out}: {load_refiner(out).info.summary()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("inputs", nargs="+")
    args = ap.parse_args(argv)
    combine(args.out, args.inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
