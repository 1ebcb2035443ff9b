"""TeEFusion student LoRAs named in an A1111 / Forge prompt, for the webui's TeEFusion mode.

The webui's own LoRA support loads the student (`<lora:name:1>` in the prompt); the script only
reads the file's header to say, before sampling, when the student cannot do its job:
- it was trained for another model family, or for SD3's modulation mechanism (the webuis leave
  LoRA keys that name no module of the loaded model out without a word, so TeEFusion would run
  training-free and the user would not know);
- w is outside the range it was trained for.
Only files whose metadata says cfg_distill.method=teefusion are judged; other LoRAs (styles,
characters) are the user's business. Header reads only: nothing is unpickled or loaded as weights.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from safetensors import SafetensorError, safe_open

from cfg_distill.families import FAMILIES
from cfg_distill.teefusion_training import FUSION_MODULATION, METHOD, LoraInfo

# <lora:name>, <lora:name:0.8>, <lora:name:0.8:1>, <lora:name:unet=0.5>: the name is up to the first ':'
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::[^>]*)?>", re.IGNORECASE)
LORA_EXTENSIONS = (".safetensors",)  # the student format; .pt / .ckpt are never opened here


def lora_names(prompts: Iterable[str]) -> list[str]:
    """The LoRA names the prompts mention, in order of first mention."""
    names: dict[str, None] = {}
    for prompt in prompts:
        for m in _LORA_TAG.finditer(prompt or ""):
            names.setdefault(m.group(1).strip(), None)
    return [n for n in names if n]


def find_lora_file(folder: str, name: str) -> str | None:
    """The .safetensors file in folder (or below) whose name without extension is `name`, as the
    webuis match `<lora:name>` by file name; None when there is none."""
    if not folder or not os.path.isdir(folder):
        return None
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            stem, ext = os.path.splitext(f)
            if stem == name and ext.lower() in LORA_EXTENSIONS:
                return os.path.join(dirpath, f)
    return None


@dataclass
class StudentLora:
    name: str
    info: LoraInfo


def read_student(path: str, name: str) -> StudentLora | None:
    """The file's TeEFusion student metadata, or None for any other LoRA (or an unreadable header:
    the webui reports files it cannot load itself)."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None
    if meta.get("cfg_distill.method") != METHOD:
        return None
    try:
        info = LoraInfo.from_metadata(meta)
    except (TypeError, ValueError, json.JSONDecodeError):
        info = None
    return StudentLora(name, info) if info is not None else None


def model_family(is_sd1: bool = False, is_sd2: bool = False, is_sdxl: bool = False) -> str | None:
    """The family key of the loaded checkpoint from the webui's model flags (None if unknown)."""
    if is_sdxl:
        return "sdxl"
    if is_sd2:
        return "sd2"
    if is_sd1:
        return "sd15"
    return None


def _family_name(key: str) -> str:
    family = FAMILIES.get(key)
    return family.label.split(" (")[0] if family is not None else (key or "an unknown model")


def student_notes(students: Sequence[StudentLora], w: float, family: str | None) -> list[str]:
    """What to tell the user about the TeEFusion students of this run (empty when all is well)."""
    notes = []
    for s in students:
        info = s.info
        if info.fusion == FUSION_MODULATION:
            notes.append(
                f"TeEFusion student {s.name!r} was trained for {_family_name(info.base_family)}'s modulation "
                f"mechanism, which this webui mode does not apply (it fuses the prompt tokens); use it in "
                f"ComfyUI with the TeEFusion Model Patch node. Here TeEFusion runs without it.")
        elif family and info.base_family and info.base_family != family:
            notes.append(
                f"TeEFusion student {s.name!r} was trained for {_family_name(info.base_family)}, but the loaded "
                f"checkpoint is {_family_name(family)}: its weights do not fit and the webui leaves them out, so "
                f"TeEFusion runs training-free. Load a student trained for this checkpoint.")
        elif not info.w_min - 1e-6 <= w <= info.w_max + 1e-6:
            notes.append(
                f"TeEFusion w {w:g} is outside the range student {s.name!r} was trained for "
                f"({info.w_min:g} to {info.w_max:g}); pick w in that range.")
    return notes
