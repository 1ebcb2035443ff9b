"""One training request for every front door (ComfyUI nodes, the webui tab and its route, the command
line): what to train, on what, and how, with one `validate()` and one set of defaults.

The hosts only map their inputs onto a TrainRequest; prompt parsing, file names, state-file names and
the range checks live here, once. The command line's flags are generated from the fields below
(`add_arguments` / `from_arguments`), so a new option is added in one place: a field with its help.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from .prompts import default_prompts

METHODS = ("dice", "teefusion")
LOSSES = ("l2", "l1")
SCHEDULES = ("cosine", "constant")
AUTOCASTS = ("none", "bf16", "fp16")
# A plain file name in the output folder: no folders, no leading dot.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,120}$")
STATE_SUFFIX = {"dice": ".dice-train-state", "teefusion": ".teefusion-train-state"}
# What each method writes and where the hosts put it (the host maps the kind to its model folder).
OUTPUT_KIND = {"dice": "dice_refiners", "teefusion": "loras"}
DEFAULT_NAME = {"dice": "my_dice_refiner", "teefusion": "my_teefusion_lora"}
OUTPUT_LABEL = {"dice": "DICE refiner", "teefusion": "TeEFusion LoRA"}

# How far a w-conditioned refiner's input c + s (w - w_ref)(c - uc) may move towards the negative over the
# trained range: |s (w - w_ref)| <= W_INPUT_REACH. At 1 the query at the range's end is uc itself and the
# refiner cannot see the prompt (testbed: s = 0.5 over 3-7 fell to 47% at w = 3); 0.5 is s = 0.25 over
# 3-7, the best measured (0.1 read too little of w). At w_ref the input is c, so a single-w refiner
# trained at w_ref is a valid start.
W_INPUT_REACH = 0.5


class RequestError(ValueError):
    """A training request that cannot run; the message names the setting and what would be right."""


def _opt(help: str, *, methods: tuple[str, ...] = METHODS, cli: bool = True, lab: bool = False,
         aliases: tuple[str, ...] = (), **per_method):
    """Field metadata: help text, which methods use it, whether the command line offers it (and under
    which extra flags), whether it is a lab option (testbed experiments), and per-method defaults
    (dice=..., teefusion=...)."""
    return {"help": help, "methods": methods, "cli": cli, "lab": lab, "aliases": aliases, "per_method": per_method}


def parse_lines(text: Any) -> list[str]:
    """One entry per line; blank lines and lines starting with # are ignored."""
    if isinstance(text, (list, tuple)):
        text = "\n".join(str(t) for t in text)
    lines = (line.strip() for line in str(text or "").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def file_name(raw: Any, what: str = "name") -> str:
    """The output's name as typed: a plain file name, without the .safetensors extension."""
    name = str(raw or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")].rstrip()
    if not NAME_PATTERN.match(name):
        raise RequestError(f"{what} {raw!r} is not a plain file name: use letters, digits, '.', '_', '-' or spaces, "
                           "starting with a letter or digit (no folders); it is saved as <name>.safetensors")
    return name


@dataclass
class TrainRequest:
    """Settings of one training run. None means "the method's default" (see `resolved`)."""
    method: str = field(default="dice", metadata=_opt("dice: a DICE refiner; teefusion: a TeEFusion student LoRA",
                                                      cli=False))
    name: str | None = field(default=None, metadata=_opt(
        "output file name, no extension (dice: models/dice_refiners, teefusion: models/loras)",
        dice=DEFAULT_NAME["dice"], teefusion=DEFAULT_NAME["teefusion"]))
    prompts: list[str] = field(default_factory=list, metadata=_opt(
        "training prompts, one per line (# starts a comment); empty: the bundled list of varied prompts"))
    negative_prompts: list[str] = field(default_factory=list, metadata=_opt(
        "negative prompts to train with, one per line, so the refiner works with a negative prompt (the teacher "
        "is CFG with that negative); mix short ones ('blurry', 'red') and full prompts. Empty: \"\" only",
        methods=("dice",)))
    negative_share: float = field(default=0.5, metadata=_opt(
        "share of samples that get a negative prompt (used only with negative prompts)", methods=("dice",)))
    guidance_scale: float = field(default=5.0, metadata=_opt(
        "the CFG scale w the refiner reproduces at cfg 1 (paper: 5); with a w range, its reference w",
        methods=("dice",), aliases=("-w",)))
    w_min: float | None = field(default=None, metadata=_opt(
        "lowest w of the range one file serves (dice: 0 with w_max 0 = guidance_scale only)",
        dice=0.0, teefusion=2.0))
    w_max: float | None = field(default=None, metadata=_opt("highest w of that range", dice=0.0, teefusion=8.0))
    steps: int = field(default=2000, metadata=_opt("total optimizer steps (with resume: the target, not the extra)"))
    batch_size: int = field(default=4, metadata=_opt(
        "samples per micro-batch (sets the memory); the effective batch is batch_size x grad_accum"))
    grad_accum: int | None = field(default=None, metadata=_opt(
        "micro-batches per optimizer step", dice=4, teefusion=4))
    lr: float | None = field(default=None, metadata=_opt("AdamW learning rate", aliases=("--learning-rate",),
                                                                       dice=5e-4, teefusion=1e-3))
    lr_schedule: str | None = field(default=None, metadata=_opt(
        "cosine: the rate falls to 0 over the run; constant: the same rate throughout (a resumed run with more "
        "steps continues exactly)", dice="cosine", teefusion="cosine"))
    loss: str = field(default="l2", metadata=_opt("l2 or l1 (paper: l1 for SD1.5, l2 for SDXL), summed per sample"))
    width: int = field(default=0, metadata=_opt(
        "training image width in pixels (multiple of 8); 0: the model's own size (the checkpoint's "
        "modelspec.resolution, else its family's: SD1.5 512, SD2 768, SDXL / SD3 / DiTs 1024)"))
    height: int = field(default=0, metadata=_opt("training image height in pixels (multiple of 8); 0: the model's own"))
    seed: int = field(default=0, metadata=_opt("data and initialisation seed"))
    save_every: int = field(default=200, metadata=_opt("save the training state every N steps (0: only at the end)"))
    resume: bool = field(default=False, metadata=_opt("continue the saved run of this name"))
    overwrite: bool = field(default=True, metadata=_opt(
        "without resume, replace a saved run of this name (the command line refuses unless given)", cli=False))
    x0_steps: int = field(default=8, metadata=_opt(
        "teacher CFG sampling steps per prompt that make the training latents (no images given)"))
    autocast: str = field(default="none", metadata=_opt("mixed precision on CUDA GPUs: none, bf16 or fp16"))
    gradient_checkpointing: bool = field(default=False, metadata=_opt(
        "recompute the frozen model's blocks in the backward pass: less memory, slower steps"))
    rank: int = field(default=8, metadata=_opt("LoRA rank", methods=("teefusion",)))
    start_from: str = field(default="", metadata=_opt(
        "a file of this pack to start from instead of a fresh one (dice: a refiner; teefusion: a student LoRA "
        "of the same rank)", aliases=("--init-lora",)))
    command: str = field(default="", metadata=_opt(
        "the command line that started the run (recorded in the output file so it can be re-run)", cli=False))
    # Data the hosts hand over directly (no command-line flag).
    images: Any = field(default=None, repr=False, metadata=_opt("real images to noise (with the model's VAE)",
                                                                cli=False))
    captions: list[str] = field(default_factory=list, metadata=_opt(
        "one caption per image; else the prompts are used in turn", cli=False))
    # Lab options: what the testbed varies (documented, off by default).
    percent_range: tuple[float, float] = field(default=(0.0, 1.0), metadata=_opt(
        "train on this sampling-percent range only: one range of a K-range refiner", methods=("dice",), lab=True))
    one_level_per_batch: bool = field(default=False, metadata=_opt(
        "one noise level per micro-batch (the official recipe's one t per batch)", methods=("dice",), lab=True))
    inner_dim: int = field(default=512, metadata=_opt("refiner width when training from zero (official: 512)",
                                                      methods=("dice",), lab=True))
    w_input_scale: float | None = field(default=None, metadata=_opt(
        "with a w range: s in c + s (w - w_ref)(c - uc) instead of the reach rule", methods=("dice",), lab=True))

    # -- defaults -----------------------------------------------------------------------------------
    @classmethod
    def defaults(cls, method: str) -> dict[str, Any]:
        """Every field's default for `method` (what a user gets without setting it)."""
        out = {}
        for f in fields(cls):
            per = f.metadata.get("per_method", {})
            if method in per:
                out[f.name] = per[method]
            elif f.default is not MISSING:
                out[f.name] = f.default
            else:
                out[f.name] = f.default_factory()
        out["method"] = method
        return out

    def resolved(self) -> "TrainRequest":
        """A copy with every None filled by the method's default."""
        if self.method not in METHODS:
            raise RequestError(f"method must be one of {', '.join(METHODS)} (got {self.method!r})")
        base = self.defaults(self.method)
        return replace(self, **{k: base[k] for k, v in self.__dict__.items() if v is None and base.get(k) is not None})

    # -- checks -------------------------------------------------------------------------------------
    def validate(self) -> "TrainRequest":
        """The resolved, checked request; RequestError says which setting is wrong and what would do."""
        r = self.resolved()
        r.name = file_name(r.name, "refiner name" if r.method == "dice" else "LoRA name")
        r.prompts = parse_lines(r.prompts)
        r.negative_prompts = parse_lines(r.negative_prompts) if r.method == "dice" else []
        r.captions = parse_lines(r.captions)

        def whole(value, what, minimum):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise RequestError(f"{what} must be a whole number >= {minimum} (got {value!r})")

        def number(value, what):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RequestError(f"{what} must be a finite number (got {value!r})")

        whole(r.steps, "steps", 1)
        whole(r.batch_size, "batch size", 1)
        whole(r.grad_accum, "grad_accum", 1)
        whole(r.save_every, "save_every", 0)
        whole(r.x0_steps, "x0_steps", 1)
        whole(r.seed, "seed", 0)
        whole(r.rank, "rank", 1)
        number(r.lr, "learning rate")
        if r.lr <= 0:
            raise RequestError(f"learning rate must be > 0, e.g. 5e-4 (got {r.lr!r})")
        if r.lr_schedule not in SCHEDULES:
            raise RequestError(f"lr_schedule must be one of {', '.join(SCHEDULES)} (got {r.lr_schedule!r})")
        if r.loss not in LOSSES:
            raise RequestError(f"loss must be l1 or l2 (got {r.loss!r})")
        if r.autocast not in AUTOCASTS:
            raise RequestError(f"autocast must be one of {', '.join(AUTOCASTS)} (got {r.autocast!r})")
        for what, v in (("width", r.width), ("height", r.height)):
            whole(v, what, 0)
            if v % 8 or v > 4096 or 0 < v < 8:
                raise RequestError(f"width and height must be multiples of 8 between 8 and 4096, or 0 for the "
                                   f"model's own size (got {r.width}x{r.height})")
        for what, v in (("guidance scale", r.guidance_scale), ("w_min", r.w_min), ("w_max", r.w_max),
                        ("negative share", r.negative_share)):
            number(v, what)
        if not 0.0 <= r.negative_share <= 1.0:
            raise RequestError(f"negative share must be between 0 and 1, e.g. 0.5 (got {r.negative_share:g})")
        if r.method == "dice":
            if not 1.0 <= r.guidance_scale <= 30.0:
                raise RequestError(f"guidance scale must be between 1 and 30 (the paper uses 5), got {r.guidance_scale:g}")
            if r.w_min or r.w_max:
                self._check_w_range(r)
            if r.start_from and r.inner_dim != 512:
                raise RequestError("start_from and inner_dim exclude each other: the start file sets the width")
        else:
            if r.w_min < 0 or r.w_max < r.w_min:
                raise RequestError(f"w range must satisfy 0 <= w_min <= w_max, e.g. 2 to 8 (got {r.w_min:g} to "
                                   f"{r.w_max:g})")
        start, end = (float(v) for v in r.percent_range)
        if not 0.0 <= start < end <= 1.0:
            raise RequestError(f"percent_range must satisfy 0 <= start < end <= 1 (got {r.percent_range!r})")
        r.percent_range = (start, end)
        if r.images is not None and r.captions and len(r.captions) != r.images.shape[0]:
            raise RequestError(f"{len(r.captions)} captions for {r.images.shape[0]} images: give one caption per "
                               "line per image, or none (then the prompts are used in turn)")
        if r.resume and not r.overwrite:
            r.overwrite = False  # resume never replaces; nothing to check
        return r

    @staticmethod
    def _check_w_range(r: "TrainRequest") -> None:
        if not (0 <= r.w_min < r.w_max and r.w_min <= r.guidance_scale <= r.w_max):
            raise RequestError(f"w range must satisfy 0 <= w_min < w_max with the guidance scale inside it, e.g. 3 "
                               f"to 7 around 5 (got {r.w_min:g} to {r.w_max:g}, guidance scale {r.guidance_scale:g})")

    # -- what follows from it -----------------------------------------------------------------------
    @property
    def w_range(self) -> tuple[float, float] | None:
        """DICE: the range one refiner serves (None: guidance_scale only). TeEFusion: the drawn range."""
        if self.method == "dice" and not (self.w_min or self.w_max):
            return None
        return (float(self.w_min), float(self.w_max))

    def w_input(self) -> dict | None:
        """RefinerInfo.w_input of the DICE refiner this request trains (None: a single-w refiner)."""
        rng = self.w_range if self.method == "dice" else None
        if rng is None:
            return None
        lo, hi = rng
        scale = self.w_input_scale
        if scale is None:
            scale = round(W_INPUT_REACH / max(hi - self.guidance_scale, self.guidance_scale - lo), 6)
        return {"range": [lo, hi], "ref": float(self.guidance_scale), "scale": scale}

    def training_prompts(self) -> list[str]:
        return self.prompts or default_prompts()

    @property
    def uses_default_prompts(self) -> bool:
        return not self.prompts

    @property
    def negative_share_used(self) -> float:
        return self.negative_share if self.negative_prompts else 0.0

    def state_file(self, folder: str) -> str:
        return os.path.join(folder, self.name + STATE_SUFFIX[self.method])

    def output_file(self, folder: str) -> str:
        return os.path.join(folder, self.name + ".safetensors")

    def settings_line(self) -> str:
        """One line that states the run's settings (logged at the start of every run)."""
        line = (f"{self.method} {self.name!r}: {self.steps} steps x batch {self.batch_size} x grad_accum "
                f"{self.grad_accum}, lr {self.lr:g} {self.lr_schedule}, {self.loss}, {self.size_text}, "
                f"seed {self.seed}")
        if self.method == "dice":
            line += f", w {self.guidance_scale:g}" + (f" (range {self.w_min:g}-{self.w_max:g})" if self.w_range else "")
            if self.negative_prompts:
                line += f", {len(self.negative_prompts)} negatives at share {self.negative_share:g}"
        else:
            line += f", w {self.w_min:g}-{self.w_max:g}, rank {self.rank}"
        prompts = "the bundled prompts" if self.uses_default_prompts else f"{len(self.prompts)} prompts"
        return line + f"; {prompts}" + (f", start from {os.path.basename(self.start_from)}" if self.start_from else "")

    @property
    def size_text(self) -> str:
        if self.width and self.height:
            return f"{self.width}x{self.height} px"
        return "the model's own size" if not (self.width or self.height) else \
            f"{self.width or 'model'}x{self.height or 'model'} px"

    def to_json(self) -> dict:
        """The settings as plain JSON values (recorded in the output file's metadata)."""
        out = {}
        for f in fields(self):
            if f.name in ("images",):
                continue
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["prompts"] = len(self.prompts)
        out["negative_prompts"] = len(self.negative_prompts)
        out["captions"] = len(self.captions)
        out["images"] = 0 if self.images is None else int(self.images.shape[0])
        return out


# ---------------------------------------------------------------------------------------------
# The command line's flags, generated from the fields


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cli_fields(method: str, lab: bool = True):
    for f in fields(TrainRequest):
        meta = f.metadata
        if meta.get("cli") and method in meta.get("methods", METHODS) and (lab or not meta.get("lab")):
            yield f


def add_arguments(parser: argparse.ArgumentParser, method: str) -> None:
    """One flag per request field the method uses; list fields read a text file (one entry per line)."""
    defaults = TrainRequest.defaults(method)
    lab_group = parser.add_argument_group("lab options (testbed experiments; off by default)")
    for f in cli_fields(method):
        meta, default = f.metadata, defaults[f.name]
        target = lab_group if meta["lab"] else parser
        helptext, flags = meta["help"], [_flag(f.name), *meta["aliases"]]
        if isinstance(default, bool):
            target.add_argument(*flags, dest=f.name, action="store_true", help=helptext)
        elif isinstance(default, list):
            target.add_argument(*flags, dest=f.name, metavar="FILE", default=None,
                                help=f"{helptext} (a text file, one per line)")
        elif isinstance(default, tuple):
            target.add_argument(*flags, dest=f.name, metavar="A,B", default=None,
                                help=f"{helptext} (default {','.join(f'{v:g}' for v in default)})")
        else:
            kind = type(default) if default is not None else (float if "float" in str(f.type) else str)
            choices = {"loss": LOSSES, "lr_schedule": SCHEDULES, "autocast": AUTOCASTS}.get(f.name)
            target.add_argument(*flags, dest=f.name, type=kind, default=None, choices=choices,
                                help=f"{helptext} (default {default})" if default not in (None, "") else helptext)


def from_arguments(args: argparse.Namespace, method: str) -> TrainRequest:
    """A TrainRequest from flags made by add_arguments; files of list fields are read here."""
    values: dict[str, Any] = {"method": method}
    for f in cli_fields(method):
        v = getattr(args, f.name, None)
        if v is None or v is False:
            continue
        if isinstance(f.default, tuple):
            try:
                v = tuple(float(x) for x in str(v).split(","))
            except ValueError:
                raise RequestError(f"{_flag(f.name)} takes two numbers A,B (got {v!r})") from None
        elif f.default_factory is list:  # type: ignore[comparison-overlap]
            if not os.path.isfile(v):
                raise RequestError(f"{_flag(f.name)}: no such file {v!r}")
            with open(v, encoding="utf-8") as fh:
                v = parse_lines(fh.read())
            if not v:
                noun = f.name.replace("_", " ")
                raise RequestError(f"{_flag(f.name)}: {getattr(args, f.name)} has no {noun} (one per line)")
        values[f.name] = v
    return TrainRequest(**values)
