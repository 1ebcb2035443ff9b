"""Write the testbed checkpoint: committed UNet + VAE (weights/testbed/) plus the text encoder
regenerated from its seed (sha256-checked), as one SD1.5-format .safetensors file that ComfyUI's
stock CheckpointLoaderSimple loads. About 290 MB; it is written, never committed.

    python -m testbed.assemble                      -> out/testbed/cfg-distill-testbed-sd15.safetensors
    python -m testbed.assemble --out DIR_OR_FILE    (e.g. ComfyUI/models/checkpoints/)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from testbed.data import SIZE  # noqa: E402
from testbed.model import CKPT_NAME, WEIGHTS_DIR, checkpoint_state_dict, weights_present  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "out", "testbed")


def _has_resolution(path: str) -> bool:
    """Checkpoints assembled before the modelspec.resolution key are written again."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return "modelspec.resolution" in (f.metadata() or {})


def assemble(out: str = DEFAULT_OUT, weights_dir: str = WEIGHTS_DIR, force: bool = False) -> str:
    """Write the checkpoint (if missing or older than the committed weights); returns its path."""
    from safetensors.torch import save_file

    if not weights_present(weights_dir):
        raise FileNotFoundError(f"testbed weights not found in {weights_dir}: run `python -m testbed.train`")
    path = out if out.endswith(".safetensors") else os.path.join(out, CKPT_NAME)
    sources = [os.path.join(weights_dir, f) for f in os.listdir(weights_dir) if f in ("unet.safetensors",
                                                                                       "vae.safetensors")]
    if not force and os.path.exists(path) and all(os.path.getmtime(path) >= os.path.getmtime(s) for s in sources) \
            and _has_resolution(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = checkpoint_state_dict(weights_dir)
    meta = {"cfg_distill_testbed": json.dumps({"note": "cfg-distill testbed model (synthetic coloured shapes, "
                                                       "32x32 px); text encoder regenerated from a seed"}),
            # The model-spec key trainers read for the model's own size (cfg_distill.families.model_size).
            "modelspec.resolution": f"{SIZE}x{SIZE}"}
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder (or .safetensors path) to write the checkpoint to")
    ap.add_argument("--weights", default=WEIGHTS_DIR)
    ap.add_argument("--force", action="store_true", help="rewrite even if up to date")
    args = ap.parse_args(argv)
    path = assemble(args.out, args.weights, args.force)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
