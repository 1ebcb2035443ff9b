"""Base-model families a refiner can belong to: token width and whether a start token is kept."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    key: str
    label: str
    token_dim: int | None
    keep_first_token: bool


FAMILIES = {
    f.key: f for f in (
        Family("sd15", "SD1.5 (CLIP-L, 768-d tokens)", 768, True),
        Family("sd2", "SD2.x (OpenCLIP-H, 1024-d tokens)", 1024, True),
        Family("sdxl", "SDXL (CLIP-L + CLIP-G, 2048-d tokens)", 2048, True),
        Family("sd3", "SD3 (CLIP + T5, 4096-d tokens)", 4096, True),
        # T5-only: there is no start-of-text token to keep.
        Family("pixart", "PixArt (T5-XXL, 4096-d tokens)", 4096, False),
        Family("other", "another base model", None, True),
        Family("unknown", "an unknown base model (no metadata)", None, True),
    )
}


def describe_dim(dim: int) -> str:
    """Human name for a token width, for error messages: '768-d (SD1.5 ...)'."""
    names = [f.label.split(" (")[0] for f in FAMILIES.values() if f.token_dim == dim]
    return f"{dim}-d ({' / '.join(names)})" if names else f"{dim}-d (no known family)"


def get_family(key: str) -> Family:
    try:
        return FAMILIES[key]
    except KeyError:
        raise ValueError(f"unknown base family {key!r}; expected one of {', '.join(FAMILIES)}") from None
