"""Refiner files: .safetensors with the official parameter names plus descriptive metadata.

Plain state dicts without metadata (as other tools write them) load too: dims are inferred from
the tensor shapes and the family is reported as unknown. Writing is atomic."""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .families import FAMILIES, describe_dim, get_family
from .refiner import DEFAULT_HEADS, PARAMETER_NAMES, DiceRefiner

# weights/testbed/ holds the testbed model (its UNet, VAE and the refiner trained for it), which the
# demo and the quality bench load by path. Its refiner suits that toy model only, and the other two
# files are not refiners, so both hosts leave the folder out of their refiner lists.
UNLISTED_FOLDERS = ("testbed/",)


def listed_refiner(name: str) -> bool:
    """Whether a refiner-folder file (relative name, any separator) belongs in the hosts' lists."""
    return not name.replace(os.sep, "/").startswith(UNLISTED_FOLDERS)

FORMAT_NAME = "cfg-distill.dice-refiner"
FORMAT_VERSION = 1
# K-range files (several refiners, each for one range of the sampling schedule) are version 2, so
# an older pack says "update" instead of failing on the prefixed names. K = 1 files stay version 1
# with the official parameter names.
RANGES_FORMAT_VERSION = 2
# Refiners trained for a range of guidance scales (w an input, see `RefinerInfo.w_input`) are version
# 3 with the official parameter names (a K-range file that takes w too: version 3 with the prefixed
# names, every range reading the same w input): an older pack would apply them as single-w refiners,
# so it must say "update" instead.
W_INPUT_FORMAT_VERSION = 3
NEWEST_FORMAT_VERSION = W_INPUT_FORMAT_VERSION
RANGE_PREFIX = "range{}."
_KEY = "cfg_distill"  # the single metadata entry, a JSON object


class RefinerFileError(ValueError):
    """A refiner file that cannot be used; the message says what is wrong and what would be right."""


@dataclass
class RefinerInfo:
    token_dim: int
    inner_dim: int
    heads: int = DEFAULT_HEADS
    base_family: str = "unknown"
    base_checkpoint: str = ""
    base_hash: str = ""
    guidance_scale: float | None = None
    train_steps: int | None = None
    keep_first_token: bool = True
    extra: dict = field(default_factory=dict)
    has_metadata: bool = True
    # Trained with negative prompts as the second input (teacher: CFG with that negative); without
    # it only "" is what the refiner knows, and a real negative can fail badly.
    negatives: bool = False
    # K-range files: [[start_percent, end_percent], ...] tiling 0..1 in sampling order; None = one refiner.
    ranges: list | None = None
    # One refiner for every w in a range: {"range": [w_min, w_max], "ref": w_ref, "scale": s}. The
    # refiner reads c + s (w - w_ref)(c - uc) instead of c (cfg_distill.refiner.w_input_tokens);
    # None: a single-w refiner (the official format), trained at guidance_scale.
    w_input: dict | None = None

    def w_amount(self, w: float) -> float | None:
        """The refiner's w input for guidance scale w (None for single-w refiners); out of range: ValueError."""
        if not self.w_input:
            return None
        lo, hi = self.w_input["range"]
        if not (isinstance(w, (int, float)) and lo - 1e-6 <= w <= hi + 1e-6):
            raise ValueError(f"this refiner was trained for w from {lo:g} to {hi:g}; got w = {w!r}. Set w "
                             "inside that range (or train a refiner for a wider one)")
        return float(self.w_input["scale"]) * (float(w) - float(self.w_input["ref"]))

    def summary(self) -> str:
        parts = [f"family {self.base_family}", f"{self.token_dim}-d tokens"]
        if self.w_input:
            parts.append("one refiner for w {:g}-{:g} (w is an input)".format(*self.w_input["range"]))
        elif self.guidance_scale is not None:
            parts.append(f"trained at w={self.guidance_scale:g}")
        if self.train_steps is not None:
            parts.append(f"{self.train_steps} steps")
        if self.ranges:
            parts.append(f"{len(self.ranges)} noise-level ranges "
                         + " ".join(f"[{a:g}-{b:g}]" for a, b in self.ranges))
        parts.append("negative prompts supported" if self.negatives else "trained with \"\" only (no negatives)")
        if self.base_checkpoint:
            parts.append(f"base {self.base_checkpoint}" + (f" [{self.base_hash}]" if self.base_hash else ""))
        return ", ".join(parts)

    def to_metadata(self) -> dict[str, str]:
        d = asdict(self)
        d.pop("has_metadata")
        if not d["ranges"]:
            d.pop("ranges")
        if not d["w_input"]:
            d.pop("w_input")
        version = W_INPUT_FORMAT_VERSION if self.w_input else RANGES_FORMAT_VERSION if self.ranges else FORMAT_VERSION
        d.update(format=FORMAT_NAME, format_version=version)
        return {_KEY: json.dumps(d, sort_keys=True)}


@dataclass
class LoadedRefiner:
    """What the loader hands to the apply node: the module, its description and its file name.

    A K-range file also fills range_modules (one refiner per info.ranges entry, in sampling order);
    module is then the first of them."""
    module: DiceRefiner
    info: RefinerInfo
    name: str = ""
    range_modules: list = field(default_factory=list)

    @property
    def stages(self) -> list[tuple[float, float, DiceRefiner]]:
        """(start_percent, end_percent, refiner) per noise-level range; one (0, 1, module) for K = 1."""
        if not self.info.ranges:
            return [(0.0, 1.0, self.module)]
        return [(float(a), float(b), m) for (a, b), m in zip(self.info.ranges, self.range_modules)]


def short_hash_of_file(path: str, length: int = 10) -> str:
    """sha256 of a file, shortened (the same convention as the webuis' short model hashes)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_refiner(path: str, refiner: DiceRefiner, info: RefinerInfo) -> None:
    if info.ranges:
        raise ValueError("a K-range refiner file is written with save_range_refiner")
    if (info.token_dim, info.inner_dim, info.heads) != (refiner.token_dim, refiner.inner_dim, refiner.heads):
        raise ValueError("refiner info does not describe this refiner's shape")
    tensors = {k: v.float() for k, v in refiner.state_dict().items()}
    atomic_save_safetensors(tensors, path, info.to_metadata())


def validate_ranges(ranges, name: str = "refiner") -> list[list[float]]:
    """K >= 2 ranges [start, end] of sampling percent that tile 0..1 in order, each start < end."""
    example = "e.g. [[0, 0.5], [0.5, 1]]"
    if not isinstance(ranges, (list, tuple)) or len(ranges) < 2:
        raise RefinerFileError(f"{name!r}: noise-level ranges must be a list of at least two [start, end] "
                               f"pairs ({example}); got {ranges!r}")
    out = []
    for i, r in enumerate(ranges):
        if (not isinstance(r, (list, tuple)) or len(r) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)):
            raise RefinerFileError(f"{name!r}: range {i} is {r!r}, expected [start_percent, end_percent] ({example})")
        a, b = float(r[0]), float(r[1])
        if not 0.0 <= a < b <= 1.0:
            raise RefinerFileError(f"{name!r}: range {i} [{a:g}, {b:g}] must satisfy 0 <= start < end <= 1")
        out.append([a, b])
    if out[0][0] != 0.0 or out[-1][1] != 1.0:
        raise RefinerFileError(f"{name!r}: the ranges must start at 0 and end at 1 so that every sampling "
                               f"step has exactly one refined conditioning (got {out})")
    for i in range(1, len(out)):
        if out[i][0] != out[i - 1][1]:
            raise RefinerFileError(f"{name!r}: range {i} starts at {out[i][0]:g} but range {i - 1} ends at "
                                   f"{out[i - 1][1]:g}; ranges must be in order, without gaps or overlaps")
    return out


def save_range_refiner(path: str, refiners: list[DiceRefiner], info: RefinerInfo) -> None:
    """K refiners for K noise-level ranges (info.ranges) in one file: official names under rangeK."""
    ranges = validate_ranges(info.ranges, os.path.basename(path))
    if len(refiners) != len(ranges):
        raise ValueError(f"{len(refiners)} refiners for {len(ranges)} ranges")
    tensors = {}
    for k, r in enumerate(refiners):
        if (info.token_dim, info.inner_dim, info.heads) != (r.token_dim, r.inner_dim, r.heads):
            raise ValueError(f"refiner {k} does not have the shape the info describes")
        tensors.update({RANGE_PREFIX.format(k) + n: v.detach().float().clone() for n, v in r.state_dict().items()})
    atomic_save_safetensors(tensors, path, info.to_metadata())


def _read_header(path: str) -> dict:
    """Parse the safetensors header ourselves first, to give a useful message for non-safetensors."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise RefinerFileError(f"refiner file {name!r} does not exist (looked at {path})")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RefinerFileError(f"{name!r} is empty or truncated ({size} bytes): not a .safetensors refiner")
        n = int.from_bytes(head, "little")
        if n <= 1 or n > min(size - 8, 100 << 20):
            hint = " It looks like a pickle; convert official DICE .pkl files with " \
                   "`python -m cfg_distill import-official IN.pkl OUT.safetensors`." if head[:1] == b"\x80" else ""
            raise RefinerFileError(f"{name!r} is not a .safetensors file (bad header).{hint}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RefinerFileError(f"{name!r} has a corrupt .safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise RefinerFileError(f"{name!r} is truncated: the header describes {8 + n + end} bytes, "
                               f"the file has {size}. Re-download or re-save it.")
    return header


def read_refiner_info(path: str) -> RefinerInfo:
    """Metadata only (cheap: no tensors are read). Used by the UI's details view."""
    header = _read_header(path)
    return _info_from(header, os.path.basename(path))


def _raw_meta(header: dict, name: str) -> dict | None:
    raw = (header.get("__metadata__") or {}).get(_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise RefinerFileError(f"{name!r} has corrupt cfg-distill metadata") from None
    if not isinstance(meta, dict):
        raise RefinerFileError(f"{name!r} has corrupt cfg-distill metadata (not a JSON object)")
    return meta


def _info_from(header: dict, name: str) -> RefinerInfo:
    shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    meta = _raw_meta(header, name)
    version = meta.get("format_version") if meta is not None else None
    if isinstance(version, int) and version > NEWEST_FORMAT_VERSION and meta.get("format") == FORMAT_NAME:
        raise RefinerFileError(f"{name!r} was written by a newer cfg-distill (format {version}, this version "
                               f"reads up to {NEWEST_FORMAT_VERSION}); update the pack")
    if meta is not None and meta.get("ranges") is not None:
        ranges = validate_ranges(meta["ranges"], name)
        expected = {RANGE_PREFIX.format(k) for k in range(len(ranges))}
        found = {k.split(".", 1)[0] + "." for k in shapes}
        if found != expected:
            raise RefinerFileError(f"{name!r}: metadata lists {len(ranges)} noise-level ranges but the tensors "
                                   f"are under {sorted(found)} (expected {sorted(expected)})")
        infos = [_info_from_single(header, f"{name} [{p[:-1]}]",
                                   {k[len(p):]: v for k, v in shapes.items() if k.startswith(p)}, meta)
                 for p in sorted(expected)]
        if len({(i.token_dim, i.inner_dim) for i in infos}) != 1:
            raise RefinerFileError(f"{name!r}: the ranges' refiners differ in shape")
        infos[0].ranges = ranges
        return infos[0]
    return _info_from_single(header, name, shapes, meta)


def _info_from_single(header: dict, name: str, shapes: dict, meta: dict | None) -> RefinerInfo:
    missing = [k for k in PARAMETER_NAMES if k not in shapes]
    if missing and any(k.startswith(RANGE_PREFIX.format(0)) for k in shapes):
        raise RefinerFileError(f"{name!r} holds refiners under range0., range1. ... but no valid noise-level "
                               "ranges in its metadata (cfg_distill.ranges, e.g. [[0, 0.5], [0.5, 1]])")
    if missing:
        raise RefinerFileError(
            f"{name!r} is not a DICE refiner: missing {', '.join(missing)}. Expected the parameters "
            f"{', '.join(PARAMETER_NAMES)} (as the official DICE code names them).")
    inner, token_dim = shapes["fc1.weight"]
    expected = {
        "fc1.weight": [inner, token_dim], "fc1.bias": [inner],
        "attention.to_q.weight": [inner, inner], "attention.to_k.weight": [inner, inner],
        "attention.to_v.weight": [inner, inner], "attention.to_out.0.weight": [inner, inner],
        "attention.to_out.0.bias": [inner], "fc2.weight": [token_dim, inner], "fc2.bias": [token_dim],
    }
    bad = [f"{k} {shapes[k]} (expected {v})" for k, v in expected.items() if shapes[k] != v]
    if bad:
        raise RefinerFileError(f"{name!r} has inconsistent shapes: {'; '.join(bad)}")
    if meta is None:
        return RefinerInfo(token_dim=token_dim, inner_dim=inner, has_metadata=False,
                           keep_first_token=True)
    if meta.get("format") != FORMAT_NAME or not isinstance(meta.get("format_version"), int):
        raise RefinerFileError(f"{name!r}: unrecognised metadata format {meta.get('format')!r}")
    if meta["format_version"] > NEWEST_FORMAT_VERSION:
        raise RefinerFileError(f"{name!r} was written by a newer cfg-distill (format "
                               f"{meta['format_version']}, this version reads up to {NEWEST_FORMAT_VERSION}); "
                               "update the pack")
    if (meta.get("token_dim"), meta.get("inner_dim")) != (token_dim, inner):
        raise RefinerFileError(f"{name!r}: metadata says {meta.get('token_dim')}/{meta.get('inner_dim')} dims "
                               f"but the weights are {token_dim}/{inner}")
    heads = int(meta.get("heads", DEFAULT_HEADS))
    if heads <= 0 or inner % heads:
        raise RefinerFileError(f"{name!r}: {heads} heads do not divide the inner dim {inner}")
    family = meta.get("base_family", "unknown")
    fam = FAMILIES.get(family, FAMILIES["other"])
    if fam.token_dim is not None and fam.token_dim != token_dim:
        raise RefinerFileError(f"{name!r}: family {family} uses {describe_dim(fam.token_dim)} tokens, "
                               f"but the weights are {token_dim}-d")
    return RefinerInfo(
        token_dim=token_dim, inner_dim=inner, heads=heads, base_family=family,
        base_checkpoint=str(meta.get("base_checkpoint", "")), base_hash=str(meta.get("base_hash", "")),
        guidance_scale=meta.get("guidance_scale"), train_steps=meta.get("train_steps"),
        keep_first_token=bool(meta.get("keep_first_token", fam.keep_first_token)),
        extra=dict(meta.get("extra") or {}), negatives=bool(meta.get("negatives", False)),
        w_input=_valid_w_input(meta.get("w_input"), name))


def _valid_w_input(raw, name: str) -> dict | None:
    if raw is None:
        return None
    try:
        lo, hi = (float(v) for v in raw["range"])
        ref, scale = float(raw["ref"]), float(raw["scale"])
        ok = all(map(math.isfinite, (lo, hi, ref, scale))) and 0 <= lo <= hi
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise RefinerFileError(f"{name!r} has a corrupt w input in its metadata ({raw!r}); expected "
                               '{"range": [w_min, w_max], "ref": w, "scale": s} with 0 <= w_min <= w_max')
    return {"range": [lo, hi], "ref": ref, "scale": scale}


def load_refiner(path: str) -> LoadedRefiner:
    """Validate and load a refiner file (fp32, CPU, eval mode)."""
    name = os.path.basename(path)
    info = _info_from(_read_header(path), name)
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise RefinerFileError(f"{name!r} could not be read as .safetensors: {e}") from None
    prefixes = [RANGE_PREFIX.format(k) for k in range(len(info.ranges))] if info.ranges else [""]
    modules = []
    for prefix in prefixes:
        module = DiceRefiner(info.token_dim, info.inner_dim, info.heads)
        state = {k: tensors[prefix + k].float() for k in PARAMETER_NAMES}
        for k, v in state.items():
            if not torch.isfinite(v).all():
                raise RefinerFileError(f"{name!r}: parameter {prefix}{k} contains NaN or inf; the file is damaged "
                                       "or training diverged. Use an earlier checkpoint.")
        module.load_state_dict(state)
        modules.append(module.eval().requires_grad_(False))
    return LoadedRefiner(modules[0], info, name, range_modules=modules if info.ranges else [])
