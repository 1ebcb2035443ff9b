"""The TeEFusion student rows of the quality table (testbed.bench): the committed student LoRA,
loaded with ComfyUI's own LoRA loading (what LoraLoaderModelOnly calls), sampled at cfg 1 with the
prompt fused at w (the TeEFusion Conditioning node's maths), judged against CFG at the same w."""
from __future__ import annotations

import os

from testbed.model import WEIGHTS_DIR

LORA_FILE = "testbed-teefusion-lora.safetensors"
DEFAULT_LORA = os.path.join(WEIGHTS_DIR, LORA_FILE)
W_ROWS = (3.0, 5.0, 7.0)


def methods(quick: bool) -> list[dict]:
    rows = [dict(name=f"TeEFusion student (LoRA), w = {w:g}, cfg 1", key=f"tee_lora{w:g}", cfg=1.0,
                 pos=f"tee_fused{w:g}", neg="null", model="lora", w=w) for w in W_ROWS]
    rows.append(dict(name="base + TeEFusion LoRA, no fusion, cfg 1", key="tee_lora_nofuse", cfg=1.0, pos="c",
                     neg="null", model="lora"))
    if quick:
        rows = [r for r in rows if r["key"] != "tee_lora_nofuse"]  # the three w of one file
    return rows


def setup(runner, core, lora_path: str, c, null, inputs: dict) -> dict:
    """Adds the fused inputs; returns {"lora": the model with the LoRA} (empty without a LoRA file)."""
    if not lora_path or not os.path.exists(lora_path):
        return {}
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
    model = comfy.sd.load_lora_for_models(runner.model, None, lora, 1.0, 0)[0]
    for w in W_ROWS:
        inputs[f"tee_fused{w:g}"] = core.fuse_tokens(c, null, w)
    return {"lora": model}


def summarize(results: dict, s: dict) -> None:
    """Recovery of each student row against CFG at ITS w, and the RMS to that CFG image."""
    for w in W_ROWS:
        k, ref = f"tee_lora{w:g}", f"cfg{w:g}"
        if k in results and ref in results and "cfg1" in results:
            gap = results[ref]["alignment"] - results["cfg1"]["alignment"]
            if gap > 0:
                s[f"recovery_{k}"] = (results[k]["alignment"] - results["cfg1"]["alignment"]) / gap


def rms_to_same_w(results: dict, images: dict) -> None:
    import numpy as np

    for w in W_ROWS:
        k, ref = f"tee_lora{w:g}", f"cfg{w:g}"
        if k in images and ref in images:
            results[k]["d_cfg_same_w"] = float(np.sqrt(((images[k] - images[ref]) ** 2).mean(axis=(1, 2, 3))).mean())


def markdown(out: dict) -> list[str]:
    lines = []
    for w in W_ROWS:
        k = f"tee_lora{w:g}"
        if f"recovery_{k}" in out["summary"]:
            r = out["results"][k]
            lines.append(f"TeEFusion student w={w:g} recovers {100 * out['summary'][f'recovery_{k}']:.0f}% of the "
                         f"CFG w={w:g} gap (RMS to CFG w={w:g}: {r.get('d_cfg_same_w', float('nan')):.3f}).")
    return lines
