"""Base-model families a refiner can belong to: token width, whether a start token is kept, and what
the family's text encoder puts into CONDITIONING (for telling a refiner's family from the
conditioning it is applied to), read from ComfyUI's text encoders and model_base.extra_conds."""
from __future__ import annotations

from dataclasses import dataclass

ANY = "any"  # pooled_dim: the family's conditioning may or may not carry a pooled vector


@dataclass(frozen=True)
class Family:
    key: str
    label: str
    token_dim: int | None
    keep_first_token: bool
    # What the text encoder adds next to the refined token tensor. pooled_dim None: no pooled vector;
    # ANY: not checked. extra_tensors: other token tensors the family needs (kept, never refined).
    pooled_dim: int | str | None = ANY
    extra_tensors: tuple[str, ...] = ()
    # Guidance-distilled families have no CFG pass to distil; the reason is shown to the user.
    not_distillable: str = ""
    # ComfyUI model_base class names of the family (the trainer names a refiner's family from these).
    model_classes: tuple[str, ...] = ()
    notes: str = ""
    # The image size (px, square) the family's models are trained at: where a training run takes its
    # size when neither the user nor the checkpoint (modelspec.resolution) says otherwise.
    native_px: int = 1024


FAMILIES = {
    f.key: f for f in (
        Family("sd15", "SD1.5 (CLIP-L, 768-d tokens)", 768, True, native_px=512),
        Family("sd2", "SD2.x (OpenCLIP-H, 1024-d tokens)", 1024, True, native_px=768),
        Family("sdxl", "SDXL (CLIP-L + CLIP-G, 2048-d tokens)", 2048, True, model_classes=("SDXL",)),
        # CLIP-L+G tokens (zero-padded to 4096) come first, so token 0 is CLIP's start token.
        Family("sd3", "SD3 / SD3.5 (CLIP-L + CLIP-G + T5-XXL, 4096-d tokens)", 4096, True, 2048,
               model_classes=("SD3",)),
        # T5-only: there is no start-of-text token to keep.
        Family("pixart", "PixArt-alpha / sigma (T5-XXL, 4096-d tokens)", 4096, False, None,
               model_classes=("PixArt",)),
        Family("chroma", "Chroma (T5-XXL, 4096-d tokens)", 4096, False, None, model_classes=("Chroma",),
               notes="Flux-derived but sampled with real CFG; its guidance input is 0 (no guidance embedding)."),
        # The chat template (and its start token) is cut off: token 0 is already prompt text.
        Family("qwen_image", "Qwen-Image (Qwen2.5-VL 7B, 3584-d tokens)", 3584, False, None,
               model_classes=("QwenImage",)),
        Family("hidream", "HiDream (T5-XXL 4096-d tokens + Llama-3.1 layers)", 4096, False, 2048,
               ("conditioning_llama3",), model_classes=("HiDream",),
               notes="Refines the T5 tokens; the Llama-3.1 hidden states (conditioning_llama3) pass unchanged."),
        Family("lumina2", "Lumina 2 (Gemma-2 2B, 2304-d tokens)", 2304, True, None, model_classes=("Lumina2",)),
        Family("wan", "Wan 2.1 / 2.2 (UMT5-XXL, 4096-d tokens)", 4096, False, None, model_classes=("WAN21", "WAN22"),
               native_px=480,  # the short side of Wan's 832 x 480 clips; a training frame is square
               notes="512 tokens, zero-padded: the refiner also rewrites the padding, as DICE does."),
        Family("hunyuan_video", "HunyuanVideo (Llama-3 4096-d tokens + CLIP-L pooled)", 4096, False, 768,
               model_classes=("HunyuanVideo",), native_px=544),
        Family("flux", "Flux (T5-XXL, 4096-d tokens + guidance embedding)", 4096, False, 768,
               model_classes=("Flux",),
               not_distillable="it is guidance-distilled: guidance enters through its guidance embedding "
                               "(FluxGuidance) and it is sampled at cfg 1 with no negative pass, so there is "
                               "no CFG pass to distil"),
        Family("other", "another base model", None, True, native_px=512),
        Family("unknown", "an unknown base model (no metadata)", None, True, native_px=512),
    )
}


def describe_dim(dim: int) -> str:
    """Human name for a token width, for error messages: '768-d (SD1.5 ...)'."""
    names = [f.label.split(" (")[0] for f in FAMILIES.values() if f.token_dim == dim]
    return f"{dim}-d ({' / '.join(names)})" if names else f"{dim}-d (no known family)"


def model_size(width: int, height: int, family_key: str, metadata: dict | None = None) -> tuple[int, int, str]:
    """The training size: (width, height, where it came from). A side given as 0 means "the model's
    own": the checkpoint's `modelspec.resolution` ("1024x1024", the model-spec metadata that SAI's
    and many trainers' checkpoints carry), else the family's native size."""
    if width and height:
        return int(width), int(height), "as set"
    spec = str((metadata or {}).get("modelspec.resolution", "")).lower().replace(" ", "")
    try:
        w, h = (int(v) for v in spec.split("x"))
        if not (8 <= w <= 4096 and 8 <= h <= 4096 and w % 8 == 0 and h % 8 == 0):
            raise ValueError(spec)
        source = "the checkpoint's modelspec.resolution"
    except ValueError:
        w = h = FAMILIES.get(family_key, FAMILIES["other"]).native_px
        source = f"the {FAMILIES.get(family_key, FAMILIES['other']).label.split(' (')[0]} default"
    return int(width) or w, int(height) or h, source


def get_family(key: str) -> Family:
    try:
        return FAMILIES[key]
    except KeyError:
        raise ValueError(f"unknown base family {key!r}; expected one of {', '.join(FAMILIES)}") from None


def family_for_model_class(class_name: str, token_dim: int) -> str:
    """The family key for a ComfyUI model_base class name (exact match first, then the class name's
    start: subclasses such as SDXLRefiner); else by token width (SD1.5 / SD2 use BaseModel)."""
    lower = class_name.lower()
    exact = [f for f in FAMILIES.values() if class_name in f.model_classes]
    prefix = [f for f in FAMILIES.values() if any(lower.startswith(c.lower()) for c in f.model_classes)]
    for f in exact + prefix:
        # A later model of the same class line with another text encoder (HunyuanVideo 1.5: Qwen2.5-VL
        # 3584-d) is not that family.
        if f.token_dim == token_dim:
            return f.key
    return {768: "sd15", 1024: "sd2", 2048: "sdxl"}.get(token_dim, "other")


def guidance_distilled_reason(family_key: str, guidance_embed: bool) -> str:
    """Why a model cannot be distilled, or "" if it can. guidance_embed: the model has a guidance
    embedding (Flux dev, the released HunyuanVideo T2V) and so no CFG pass at sampling time."""
    fam = FAMILIES.get(family_key, FAMILIES["other"])
    if fam.not_distillable:
        return fam.not_distillable
    if guidance_embed:
        return ("it is guidance-distilled: it has a guidance embedding (the guidance value travels in the "
                "conditioning) and is sampled at cfg 1 with no negative pass, so there is no CFG pass to "
                "distil; de-distilled variants without a guidance embedding can be trained")
    return ""


def conditioning_mismatch(family_key: str, token_dim: int, extras: dict) -> str:
    """Why conditioning cannot come from the given family's text encoder, or "" when it may.

    Families with the same token width are told apart by what their encoders add (a pooled vector
    of a given width, extra token tensors). Families whose conditioning is alike (PixArt, Chroma and
    Wan: T5 tokens only) cannot be told apart here; the token width check still applies."""
    fam = FAMILIES.get(family_key)
    if fam is None or fam.token_dim is None or fam.token_dim != token_dim:
        return ""  # unknown family, or a width mismatch (reported separately)
    pooled = extras.get("pooled_output")
    pooled_dim = pooled.shape[-1] if getattr(pooled, "ndim", 0) else None
    name = fam.label.split(" (")[0]
    if fam.pooled_dim != ANY and pooled_dim != fam.pooled_dim:
        want = f"a {fam.pooled_dim}-d pooled vector" if fam.pooled_dim else "no pooled vector"
        got = f"a {pooled_dim}-d pooled vector" if pooled_dim else "none"
        return f"{name} conditioning has {want}, this conditioning has {got}"
    for key in fam.extra_tensors:
        if key not in extras:
            return f"{name} conditioning carries '{key}', this conditioning does not"
    for other in FAMILIES.values():
        for key in other.extra_tensors:
            if key in extras and key not in fam.extra_tensors:
                return f"this conditioning carries '{key}' ({other.label.split(' (')[0]}), which {name} conditioning never has"
    return ""


def families_from_conditioning(token_dim: int, extras: dict) -> list[str]:
    """Family keys whose text encoder could have produced this conditioning (for error messages)."""
    return [f.key for f in FAMILIES.values()
            if f.token_dim == token_dim and f.model_classes and not conditioning_mismatch(f.key, token_dim, extras)]
