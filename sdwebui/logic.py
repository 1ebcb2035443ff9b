"""Host-independent logic of the AUTOMATIC1111 / Forge extension (scripts/cfg_distill_webui.py).

The script file only reads the webui's objects and calls into this module, so everything that can
go wrong with tensors, infotext or the skip_early_cond option is tested here without a webui:

- settings and the CFG != 1 warning,
- infotext keys (writing and reading back),
- the per-step conditioning transform for SD1/2 tensor conds and SDXL dict conds, with AND rows
  (text_cond has one row per AND-subprompt, the negative one row per image),
- the skip_early_cond save / restore state machine,
- the refiner folder (shared with the training tab): where it is, listing, loading once, short hashes.

Imports only torch and the cfg_distill core (never the webui's `modules`).
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from cfg_distill.apply import ConditioningError, fuse_tokens, refine_tokens
from cfg_distill.families import FAMILIES, describe_dim
from cfg_distill.fusion import repeat_to_length
from cfg_distill.refiner_file import LoadedRefiner, RefinerInfo, listed_refiner, load_refiner, read_refiner_info, short_hash_of_file

# ---------------------------------------------------------------------------------------------
# Settings

MODE_OFF, MODE_DICE, MODE_TEEFUSION = "Off", "DICE", "TeEFusion"
MODES = (MODE_OFF, MODE_DICE, MODE_TEEFUSION)

DEFAULT_STRENGTH = 1.0
DEFAULT_W = 1.0
# Official DICE inference passes the negative prompt's tokens as the null input when one is given.
DEFAULT_NEGATIVE_AS_NULL = True

REFINER_FOLDER_NAME = "dice_refiners"  # models/dice_refiners, the same name ComfyUI uses
REFINER_EXTENSIONS = (".safetensors",)  # pickles are never offered: loading one runs code

# SDXL's `vector` is [pooled text embedding (1280) | size / crop / aesthetic embeddings].
SDXL_POOLED_DIM = 1280


@dataclass(frozen=True)
class Settings:
    """What the user chose in the accordion for one generation."""
    mode: str = MODE_OFF
    refiner: str = ""
    strength: float = DEFAULT_STRENGTH
    negative_as_null: bool = DEFAULT_NEGATIVE_AS_NULL
    w: float = DEFAULT_W

    @property
    def active(self) -> bool:
        return self.mode in (MODE_DICE, MODE_TEEFUSION)

    @classmethod
    def from_ui(cls, mode, refiner, strength, negative_as_null, w) -> "Settings":
        """From the values the webui passes to process(); tolerant of None from old API callers."""
        mode = mode or MODE_OFF
        if mode not in MODES:
            raise ValueError(f"unknown cfg-distill mode {mode!r}; expected one of {', '.join(MODES)}")
        return cls(mode=mode, refiner=refiner or "",
                   strength=float(DEFAULT_STRENGTH if strength is None else strength),
                   negative_as_null=bool(DEFAULT_NEGATIVE_AS_NULL if negative_as_null is None else negative_as_null),
                   w=float(DEFAULT_W if w is None else w))


def cfg_warning(mode: str, cfg_scale, hr_cfg_scale=None) -> str | None:
    """The line shown in the UI and the console when the speed-up does not apply (CFG != 1)."""
    if mode not in (MODE_DICE, MODE_TEEFUSION):
        return None
    scales = [("CFG scale", cfg_scale), ("Hires CFG scale", hr_cfg_scale)]
    off = [(name, float(v)) for name, v in scales if v is not None and not math.isclose(float(v), 1.0)]
    if not off:
        return None
    what = " and ".join(f"{name} is {v:g}" for name, v in off)
    return (f"cfg-distill: {what}. {mode} is meant for CFG scale 1 (one model pass per step); "
            f"the {mode} conditioning is still applied, but the webui also runs the negative pass "
            f"and applies CFG on top: twice the cost per step and usually over-guided. "
            f"Set CFG scale to 1.")


# ---------------------------------------------------------------------------------------------
# Infotext: p.extra_generation_params keys, and reading them back ("send to txt2img")

INFO_MODE = "CFG distill"
INFO_REFINER = "DICE refiner"
INFO_REFINER_HASH = "DICE refiner hash"
INFO_STRENGTH = "DICE strength"
INFO_NEGATIVE = "DICE negative as null"
INFO_W = "TeEFusion w"  # TeEFusion's w
INFO_DICE_W = "DICE w"  # the w a DICE refiner trained for a range of w reads (older versions wrote "TeEFusion w")
# Written only when the mode was applied to part of the sampling (a refusal in the middle of the
# run): which steps it applied to, e.g. "1-2 of 4" or "first pass, hires 1-2 of 3".
INFO_STEPS = "CFG distill steps"
INFOTEXT_KEYS = (INFO_MODE, INFO_REFINER, INFO_REFINER_HASH, INFO_STRENGTH, INFO_NEGATIVE, INFO_DICE_W, INFO_W,
                 INFO_STEPS)
# Why the mode was not (fully) applied: written into the infotext, so API users (whose responses
# carry the infotext and extra_generation_params, never the console) learn it too.
INFO_NOTE = "CFG distill note"


def add_note(extra_params: dict, text: str) -> None:
    """Append one message to the note entry of p.extra_generation_params (several join with ' | ')."""
    old = extra_params.get(INFO_NOTE)
    extra_params[INFO_NOTE] = text if not old or text in old else f"{old} | {text}"


def remove_note(extra_params: dict, text: str) -> None:
    """Take one message added by add_note out again (a note that held for one batch only)."""
    old = extra_params.get(INFO_NOTE)
    if not old:
        return
    kept = [part for part in old.split(" | ") if part != text]
    if kept:
        extra_params[INFO_NOTE] = " | ".join(kept)
    else:
        extra_params.pop(INFO_NOTE, None)


def and_prompt_problem(weights_per_prompt: Sequence[Sequence[float]]) -> str | None:
    """Why AND-prompts cannot run at CFG 1 with one pass per step, or None when they can.

    Composable diffusion is uncond + cfg * sum_i w_i (c_i - uncond). At CFG 1 that needs the
    negative pass unless the weights sum to 1 (then it is sum_i w_i c_i): A1111 under the skip puts
    the first subprompt in place of the negative, Forge a zero negative, and both give the right
    image exactly when the weights sum to 1. Otherwise refuse rather than compose wrongly."""
    for weights in weights_per_prompt:
        if len(weights) > 1 and not math.isclose(sum(weights), 1.0, rel_tol=0, abs_tol=1e-6):
            listed = " + ".join(f"{w:g}" for w in weights)
            return (f"AND-prompts at CFG 1 are exact only when their weights sum to 1 (here {listed} = "
                    f"{sum(weights):g}): one pass per step has no negative to compose them against. "
                    f"Weight the subprompts to sum 1 (e.g. 'a :0.5 AND b :0.5'), or turn cfg-distill off "
                    f"and use CFG for this prompt.")
    return None


def forge_and_batch_problem(weights_per_prompt: Sequence[Sequence[float]]) -> str | None:
    """Why Forge would not sample the AND-prompts of one batch as written, or None.

    Forge composes the subprompts of a batch position by position (backend/sampling/condition.py,
    compile_weighted_conditions: zip over the images' subprompt lists, one weight per position):
    with unequal AND counts every prompt is cut to the shortest count, and at each position all
    images get the weight of the last image. The extension cannot undo that, and must not claim an
    image made from a prompt the user did not write."""
    if len(weights_per_prompt) < 2:
        return None
    counts = [len(w) for w in weights_per_prompt]
    if len(set(counts)) > 1:
        return (f"Forge cuts the AND-prompts of a batch to the shortest AND count (here {min(counts)} of "
                f"{'/'.join(str(c) for c in counts)} subprompts), so some subprompts never reach the model. "
                f"Give every prompt of the batch the same number of AND parts, or use batch size 1.")
    for position in range(counts[0]):
        weights = [w[position] for w in weights_per_prompt]
        if any(not math.isclose(w, weights[-1], rel_tol=0, abs_tol=1e-6) for w in weights):
            listed = "/".join(f"{w:g}" for w in weights)
            return (f"Forge gives every image of a batch the AND weights of the last image (subprompt "
                    f"{position + 1} is weighted {listed} here), so the other images are not composed "
                    f"as written. Use the same AND weights across the batch, or batch size 1.")
    return None


class AppliedSteps:
    """Which sampling steps of one batch the mode was applied to: the first pass, then the hires
    pass; a refusal in the middle of the run stops it for the rest of the generation, so what it
    applied to is always a leading run of steps."""

    FIRST, HIRES = "first", "hires"

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.applied = {self.FIRST: 0, self.HIRES: 0}  # steps applied, per pass
        self.total = {self.FIRST: None, self.HIRES: None}  # the pass's step count, when known
        self.hires_seen = False
        self.stopped = False  # a step of this batch ran without the mode

    def ran(self, hires: bool, step: int, total, applied: bool) -> None:
        key = self.HIRES if hires else self.FIRST
        self.hires_seen |= hires
        if total:
            self.total[key] = int(total)
        if applied and not self.stopped:
            self.applied[key] = max(self.applied[key], int(step) + 1)
        elif not applied:
            self.stopped = True

    @property
    def any(self) -> bool:
        return any(self.applied.values())

    def describe(self) -> str | None:
        """None: not applied at all; "": applied to every step; else the steps it applied to."""
        if not self.any:
            return None
        if not self.stopped:
            return ""

        def part(key):
            n, total = self.applied[key], self.total[key]
            return f"1-{n}" + (f" of {total}" if total else "") if n != 1 else "1" + (f" of {total}" if total else "")

        if not self.applied[self.HIRES]:
            text = part(self.FIRST)
            return text + (", hires none" if self.hires_seen else "")
        return f"first pass, hires {part(self.HIRES)}"


def infotext_params(settings: Settings, refiner_hash: str = "", refiner_takes_w: bool = False) -> dict:
    """The entries to put into p.extra_generation_params (only those of the active mode; w in DICE
    mode only for refiners trained for a range of w, which read it)."""
    if not settings.active:
        return {}
    out = {INFO_MODE: settings.mode}
    if settings.mode == MODE_DICE:
        out[INFO_REFINER] = display_name(settings.refiner)
        if refiner_hash:
            out[INFO_REFINER_HASH] = refiner_hash
        out[INFO_STRENGTH] = settings.strength
        out[INFO_NEGATIVE] = settings.negative_as_null
        if refiner_takes_w:
            out[INFO_DICE_W] = settings.w
    else:
        out[INFO_W] = settings.w
    return out


def _as_float(v, default):
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _as_bool(v, default):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    return default


def parse_infotext(params: dict) -> dict:
    """Settings found in a parsed infotext (values are strings there); absent keys give defaults.

    An infotext without our keys means the image was made with cfg-distill off. w is read from the
    key of the mode; DICE images written before the key was renamed carry it as "TeEFusion w"."""
    mode = str(params.get(INFO_MODE, MODE_OFF)).strip()
    if mode == MODE_DICE:
        w = params.get(INFO_DICE_W, params.get(INFO_W))
    elif mode == MODE_TEEFUSION:
        w = params.get(INFO_W)
    else:
        w = None
    return {
        "mode": mode if mode in MODES else MODE_OFF,
        "refiner": str(params.get(INFO_REFINER, "") or "").strip(),
        "refiner_hash": str(params.get(INFO_REFINER_HASH, "") or "").strip(),
        "strength": _as_float(params.get(INFO_STRENGTH), DEFAULT_STRENGTH),
        "negative_as_null": _as_bool(params.get(INFO_NEGATIVE), DEFAULT_NEGATIVE_AS_NULL),
        "w": _as_float(w, DEFAULT_W),
        "has_w": w is not None,
        "steps": str(params.get(INFO_STEPS, "") or "").strip(),
    }


def display_name(name: str) -> str:
    """A refiner's name as written into infotext: the file name without folder or extension."""
    base = os.path.basename(name.replace("\\", "/"))
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in REFINER_EXTENSIONS else base


def resolve_refiner(name: str, short_hash: str, available: Sequence[str],
                    hash_of: Callable[[str], str] | None = None) -> str | None:
    """The local refiner file an infotext names: by hash first (a renamed file is still found),
    then by name. None when nothing matches (the dropdown then keeps its value)."""
    if short_hash and hash_of is not None:
        for candidate in available:
            try:
                if hash_of(candidate) == short_hash:
                    return candidate
            except OSError:
                continue
    for candidate in available:
        if candidate == name or display_name(candidate) == display_name(name):
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# skip_early_cond: one model pass per step on A1111 (it never skips the negative pass because
# cfg = 1; only opts.skip_early_cond, a fraction of steps, makes it skip).


_ABSENT = object()


class _ShadowFloat(float):
    """A shadowed option's value: a float the webui compares and prints like any other, marked so
    that any copy of this module (a reloaded script) can recognise and remove it."""

    cfg_distill_shadow = True


class OptionShadow:
    """Makes the webui READ one option as a fixed value, without changing any setting.

    The webui's Options keeps every setting in opts.data: the settings page, quicksettings,
    /sdapi/v1/options and Options.save (config.json) read and write that dict and nothing else.
    Reading `opts.key` goes through Options.__getattr__, which Python calls only when ordinary
    attribute lookup fails, so a value in the Options object's own __dict__ wins over opts.data.
    The shadow lives there (object.__setattr__, past Options.__setattr__), never in opts.data: no
    save, from any thread at any moment, can write it, and the user's value in opts.data is never
    touched (a change made meanwhile on the settings page stays exactly as made).

    - apply(opts, token, value) checks that the host really reads the option through the shadow and
      leaves opts.data alone (`reads_through`); if not, it undoes itself and returns False. value
      (default: the one given at construction) may differ per call.
    - restore(opts, token) only acts for the run that applied (a late safety net of an old run must
      not end a newer run's shadow); restore(opts) always acts, and also removes a shadow that an
      earlier copy of this module left (a script reload), recognised by its value's type.
    """

    def __init__(self, key: str, value: float):
        self.key, self.value = key, float(value)
        self._token = None
        self._user = self._applied = None

    @property
    def active(self) -> bool:
        return self._token is not None

    @property
    def token(self):
        return self._token

    @staticmethod
    def reads_through(opts, key: str) -> bool:
        """Whether a value in opts.__dict__ would be what `opts.key` returns: the class serves
        options through __getattr__ (not a custom __getattribute__, __slots__ or a descriptor)."""
        cls = type(opts)
        return (hasattr(opts, "__dict__") and isinstance(getattr(opts, "data", None), dict)
                and "__getattr__" in dir(cls) and cls.__getattribute__ is object.__getattribute__
                and not hasattr(cls, key))

    def apply(self, opts, token, value: float | None = None) -> bool:
        self.restore(opts)
        if not self.reads_through(opts, self.key):
            return False
        data = opts.data
        entry = data.get(self.key, _ABSENT)
        self._user = None if entry is _ABSENT else entry
        shadow = _ShadowFloat(self.value if value is None else value)
        self._applied = float(shadow)
        object.__setattr__(opts, self.key, shadow)
        self._token = token
        # Only this option's entry is compared: settings saved meanwhile by another thread are fine.
        if (getattr(opts, self.key, None) is not shadow or opts.data is not data
                or data.get(self.key, _ABSENT) is not entry):
            self.restore(opts)  # not a host this works on: leave nothing behind
            return False
        return True

    def overrode(self, token) -> bool:
        """True while the run with this token makes the host read a value the user does not have."""
        return self.active and token is self._token and self._user != self._applied

    def restore(self, opts, token=None) -> bool:
        """Remove the shadow; True if this call ended this object's active shadow."""
        if token is not None and token is not self._token:
            return False
        own = vars(opts) if hasattr(opts, "__dict__") else {}
        if getattr(own.get(self.key), "cfg_distill_shadow", False):
            own.pop(self.key, None)
        ended = self._token is not None
        self._token = self._user = self._applied = None
        return ended


# ---------------------------------------------------------------------------------------------
# Conditioning: tensors [rows, T, D] (SD1/2) or dicts {"crossattn": [rows, T, D], "vector": [rows, V]}

def is_dict_cond(cond) -> bool:
    return isinstance(cond, dict)


def tokens_of(cond) -> torch.Tensor:
    if is_dict_cond(cond):
        if "crossattn" not in cond:
            raise ConditioningError(f"this model's conditioning has no token sequence ('crossattn'); "
                                    f"keys are {', '.join(map(str, cond))}")
        return cond["crossattn"]
    return cond


def vector_of(cond) -> torch.Tensor | None:
    return cond.get("vector") if is_dict_cond(cond) else None


def rows_of(cond) -> int:
    return int(tokens_of(cond).shape[0])


def take_row(cond, i: int):
    """Row i of a cond batch, kept as a batch of one."""
    if is_dict_cond(cond):
        return {k: v[i:i + 1] for k, v in cond.items() if isinstance(v, torch.Tensor)}
    return cond[i:i + 1]


def pooled_dim(vector: torch.Tensor) -> int:
    """Width of the pooled text part of `vector`: 1280 for SDXL base (2816) and refiner (2560);
    the whole vector for models whose vector is only the pooled embedding."""
    return SDXL_POOLED_DIM if vector.shape[-1] > SDXL_POOLED_DIM else vector.shape[-1]


def image_of_rows(n_rows: int, n_images: int | None, rows_per_image: Sequence[int] | None = None) -> list[int] | None:
    """For each text_cond row, the image it belongs to (AND-subprompts give several rows per image).

    rows_per_image comes from the host's multicond batch when it can be read; without it a
    one-to-one or single-image batch is still unambiguous. None means unknown."""
    if rows_per_image and sum(rows_per_image) == n_rows and (n_images is None or len(rows_per_image) == n_images):
        return [i for i, n in enumerate(rows_per_image) for _ in range(n)]
    if n_images == n_rows:
        return list(range(n_rows))
    if n_images == 1:
        return [0] * n_rows
    return None


def null_plan(settings: Settings, negatives: Sequence[str] | None, n_images: int) -> list[str]:
    """Per image, what the null input is: "negative" (the negative prompt as the host encodes it)
    or "empty" (a real encoding of "").

    TeEFusion fuses with the negative exactly as CFG would use it. DICE was trained with "" as its
    null: the negative is used only when asked for and non-empty (the webuis ZERO an empty SDXL
    negative, which is not what the refiner saw in training)."""
    if settings.mode == MODE_TEEFUSION:
        return ["negative"] * n_images
    if not settings.negative_as_null:
        return ["empty"] * n_images
    if negatives is None or len(negatives) != n_images:
        return ["negative"] * n_images
    return ["negative" if (neg or "").strip() else "empty" for neg in negatives]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _null_key(null) -> tuple:
    return (tokens_of(null), vector_of(null))


def group_images(nulls: Sequence) -> list[tuple[object, list[int]]]:
    """Images that share the same null input (by value), so each group is refined in one call."""
    groups: list[tuple[object, list[int]]] = []
    for i, null in enumerate(nulls):
        t, v = _null_key(null)
        for g_null, members in groups:
            gt, gv = _null_key(g_null)
            if _same(t, gt) and _same(v, gv):
                members.append(i)
                break
        else:
            groups.append((null, [i]))
    return groups


class CondTransform:
    """The per-step conditioning change of one run: DICE refinement or TeEFusion fusion.

    Call it with the step's text_cond (fresh from the host each step), the null input of each
    image (a batch of one each) and the image of each text_cond row. It returns a NEW cond: the
    host's tensors and dicts are never modified. Results are cached by value, so a prompt that does
    not change between steps is refined once (prompt editing simply gives new entries)."""

    def __init__(self, settings: Settings, refiner: LoadedRefiner | None = None, cache_size: int = 8):
        if settings.mode == MODE_DICE and refiner is None:
            raise ValueError("DICE needs a loaded refiner")
        if not settings.active:
            raise ValueError("cfg-distill is off: nothing to transform")
        self.settings, self.refiner, self.cache_size = settings, refiner, cache_size
        self._cache: list[tuple[list, tuple, torch.Tensor, torch.Tensor | None]] = []
        self.computed = 0  # how many times the maths ran (the rest were cache hits)

    def __call__(self, text_cond, nulls: Sequence, row_image: Sequence[int] | None):
        n_rows = rows_of(text_cond)
        if row_image is None:
            groups = group_images(nulls)
            if len(groups) != 1:
                raise ConditioningError(
                    f"cannot tell which of the {n_rows} prompt rows (AND-subprompts) belong to which of "
                    f"the {len(nulls)} images, and their negative prompts differ. Use the same negative "
                    f"prompt for the whole batch, or batch size 1.")
            row_image = [0] * n_rows
            nulls = [nulls[0]]
        if len(row_image) != n_rows:
            raise ConditioningError(f"{len(row_image)} row owners given for {n_rows} prompt rows")

        tokens, vector = tokens_of(text_cond), vector_of(text_cond)
        key = [tokens, vector] + [t for null in nulls for t in _null_key(null)]
        hit = self._lookup(key, tuple(row_image))
        if hit is None:
            hit = self._compute(tokens, vector, nulls, list(row_image))
            self._store(key, tuple(row_image), hit)
        new_tokens, new_vector = (t.clone() if t is not None else None for t in hit)
        return self._rebuild(text_cond, new_tokens, new_vector)

    # -- maths --------------------------------------------------------------------------------
    def _compute(self, tokens, vector, nulls, row_image):
        self.computed += 1
        groups = group_images(nulls)
        n_rows = tokens.shape[0]
        parts = []
        for null, images in groups:
            rows = [r for r in range(n_rows) if row_image[r] in images]
            if not rows:
                continue
            whole = rows == list(range(n_rows))
            c = tokens if whole else tokens[rows]
            vec = None if vector is None else (vector if whole else vector[rows])
            parts.append((rows, *self._one_group(c, vec, null)))
        return self._assemble(parts, n_rows)

    def _one_group(self, c, vec, null):
        s = self.settings
        null_tokens = tokens_of(null)
        if s.mode == MODE_DICE:  # tokens only: the pooled vector stays the host's own
            return refine_tokens(self.refiner, c, null_tokens, s.strength, w=s.w), None
        out_tokens = fuse_tokens(c, null_tokens, s.w, "token")
        if vec is None:
            return out_tokens, None
        null_vec = vector_of(null)
        if null_vec is None:
            raise ConditioningError("the negative conditioning has no pooled vector but the prompt has one")
        k = pooled_dim(vec)
        fused = fuse_tokens(vec[:, :k], null_vec[:, :k], s.w, "pooled")
        return out_tokens, torch.cat([fused, vec[:, k:]], dim=1)  # size embeddings untouched

    @staticmethod
    def _assemble(parts, n_rows):
        if len(parts) == 1 and parts[0][0] == list(range(n_rows)):
            return parts[0][1], parts[0][2]
        # Groups may come back with different token counts (TeEFusion tiles to the negative's
        # length): bring them to a common length by tiling whole sequences (attention-neutral).
        length = 1
        for _, t, _ in parts:
            length = math.lcm(length, t.shape[1])
        first = parts[0][1]
        tokens = first.new_empty((n_rows, length, first.shape[-1]))
        vector = None
        if parts[0][2] is not None:
            vector = parts[0][2].new_empty((n_rows, parts[0][2].shape[-1]))
        for rows, t, v in parts:
            idx = torch.tensor(rows, device=first.device)
            tokens[idx] = repeat_to_length(t, length) if t.shape[1] != length else t
            if vector is not None:
                vector[idx] = v
        return tokens, vector

    @staticmethod
    def _rebuild(text_cond, new_tokens, new_vector):
        if not is_dict_cond(text_cond):
            return new_tokens
        # A shallow copy keeps the host's dict class (A1111 reads .shape of its DictWithShape) and
        # any other keys; the host's own dict is left as it was.
        out = copy.copy(text_cond)
        out["crossattn"] = new_tokens
        if new_vector is not None:
            out["vector"] = new_vector
        return out

    # -- cache --------------------------------------------------------------------------------
    def _lookup(self, key, owners):
        for k, o, t, v in self._cache:
            if o == owners and len(k) == len(key) and all(_same(a, b) for a, b in zip(k, key)):
                return t, v
        return None

    def _store(self, key, owners, result):
        # Keep copies: the host may reuse or change its tensors after this step.
        frozen = [None if t is None else t.detach().clone() for t in key]
        self._cache.append((frozen, owners, *result))
        del self._cache[:-self.cache_size]


# ---------------------------------------------------------------------------------------------
# Checks before a run starts

def model_token_dim(is_sd1: bool = False, is_sd2: bool = False, is_sdxl: bool = False) -> int | None:
    """The token width of the loaded checkpoint from the webui's model flags (None if unknown)."""
    if is_sdxl:
        return FAMILIES["sdxl"].token_dim
    if is_sd2:
        return FAMILIES["sd2"].token_dim
    if is_sd1:
        return FAMILIES["sd15"].token_dim
    return None


def check_refiner_for_model(info: RefinerInfo, name: str, model_dim: int | None) -> None:
    """Refuse a refiner made for another model family before sampling starts.

    Only refiners of a known width are judged (a 1280-d refiner for SDXL's refiner checkpoint, which
    the webuis also flag as SDXL, passes and is checked per step instead)."""
    known = {f.token_dim for f in FAMILIES.values() if f.token_dim}
    if model_dim is None or info.token_dim not in known or info.token_dim == model_dim:
        return
    raise ConditioningError(
        f"refiner {display_name(name)!r} is for {describe_dim(info.token_dim)} tokens "
        f"(family {info.base_family}), but the loaded checkpoint uses {describe_dim(model_dim)} tokens. "
        f"Pick a refiner trained for this checkpoint's family.")


# ---------------------------------------------------------------------------------------------
# The refiner folder

def refiner_folder_for(custom_dir: str | None, models_path: str) -> str:
    """Where refiners are listed (generation script) and written (training tab): the
    --dice-refiners-dir flag (preload.py) or <models>/dice_refiners, the folder ComfyUI uses too."""
    if custom_dir:
        return os.path.abspath(os.path.expanduser(custom_dir))
    return os.path.join(models_path, REFINER_FOLDER_NAME)

class RefinerStore:
    """Lists the refiner files of one or more folders (the first is the user's, later ones e.g. the
    extension's bundled weights/) and loads each file once while it is unchanged on disk."""

    def __init__(self, folders: Callable[[], Sequence[str]]):
        self._folders = folders
        self._loaded: dict[str, tuple[tuple, LoadedRefiner]] = {}
        self._hashes: dict[str, tuple[tuple, str]] = {}

    def folders(self) -> list[str]:
        return [os.path.abspath(f) for f in self._folders()]

    def folder(self) -> str:
        """The main folder, named in messages."""
        return self.folders()[0]

    def names(self) -> list[str]:
        """Relative paths ("sub/x.safetensors", always with "/"), sorted; the first folder wins a
        name found in several. [] when no folder exists."""
        found = set()
        for root in self.folders():
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for f in filenames:
                    if f.lower().endswith(REFINER_EXTENSIONS) and not f.startswith("."):
                        rel = os.path.relpath(os.path.join(dirpath, f), root)
                        found.add(rel.replace(os.sep, "/"))
        return sorted(filter(listed_refiner, found), key=str.lower)

    def path(self, name: str) -> str:
        """The file a listed name refers to; names never reach outside the folders."""
        candidates = []
        for root in self.folders():
            path = os.path.abspath(os.path.join(root, name))
            if os.path.commonpath([root, path]) != root:
                raise ValueError(f"refiner name {name!r} points outside the refiner folder {root}")
            if os.path.isfile(path):
                return path
            candidates.append(path)
        return candidates[0]  # missing: load_refiner then says where it looked

    @staticmethod
    def _stamp(path: str) -> tuple:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size)

    def load(self, name: str) -> LoadedRefiner:
        path = self.path(name)
        stamp = self._stamp(path) if os.path.isfile(path) else None
        cached = self._loaded.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        loaded = load_refiner(path)  # raises RefinerFileError with a clear message
        loaded.name = display_name(name)
        self._loaded[path] = (stamp, loaded)
        return loaded

    def info(self, name: str) -> RefinerInfo:
        return read_refiner_info(self.path(name))

    def short_hash(self, name: str) -> str:
        path = self.path(name)
        stamp = self._stamp(path)
        cached = self._hashes.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, short_hash_of_file(path))
            self._hashes[path] = cached
        return cached[1]
