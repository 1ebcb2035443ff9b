"""Procedural data: 32x32 images of one coloured shape on a coloured background, with prompts built
from the attributes in several phrasings. Nothing is downloaded; everything follows from seeds.

Attributes: shape colour (6), shape (4), background colour (6, never the shape colour), position (5):
600 combinations. HELD_OUT of them (fixed by HOLDOUT_SEED) never appear in training; every single
attribute value and every pair of values still does, so held-out prompts test composition.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 32  # pixels (latents 4x4x4 with the TAESD-format VAE)
COLORS = {  # name -> RGB in 0..255, far apart so that a pixel judge is unambiguous
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 210, 40), "white": (240, 240, 240), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = {  # name -> centre (x, y) in pixels
    "top left": (9, 9), "top right": (23, 9), "bottom left": (9, 23), "bottom right": (23, 23),
    "center": (16, 16),
}
ATTRIBUTES = ("color", "shape", "background", "position")
TEMPLATES = (
    "a {color} {shape} on a {background} background, {position}",
    "{position}: {color} {shape}, {background} background",
    "a {background} background with a {color} {shape} in the {position}",
    "{color} {shape} in the {position}, {background} backdrop",
)
HOLDOUT_SEED, HELD_OUT = 6, 60
SIZE_RANGE = (15, 18)  # bounding-box side of the shape in pixels
JITTER = 1  # max centre offset in pixels
COLOR_JITTER = 8  # max per-channel colour offset (0..255 scale)
SUPERSAMPLE = 8
# Web captions are noisy, and that noise is where CFG's alignment gain comes from: the model learns
# p(image | caption) including the mislabelled part, cfg 1 samples it faithfully, and guidance
# sharpens it toward what the caption says. With clean captions this small task is learned so well
# that cfg 1 is already near CFG (measured: +4.6 alignment points). So a fixed share of the training
# images carries the caption of another, random training combination.
CAPTION_NOISE = 0.4


def noisy_caption_index(index: np.ndarray, n_combos: int, seed: int, p: float = CAPTION_NOISE) -> np.ndarray:
    """The combination whose caption each training image carries: its own, or with probability p a
    random one (fixed by seed)."""
    rng = np.random.default_rng(seed)
    swap = rng.random(len(index)) < p
    other = rng.integers(0, n_combos, len(index))
    return np.where(swap, other, index)


@dataclass(frozen=True)
class Combo:
    color: str
    shape: str
    background: str
    position: str

    def prompt(self, template: int = 0) -> str:
        return TEMPLATES[template % len(TEMPLATES)].format(**self.__dict__)

    def as_tuple(self) -> tuple[str, str, str, str]:
        return (self.color, self.shape, self.background, self.position)


def all_combos() -> list[Combo]:
    return [Combo(c, s, b, p) for c, s, b, p in itertools.product(COLORS, SHAPES, COLORS, POSITIONS) if c != b]


def split() -> tuple[list[Combo], list[Combo]]:
    """(train, held_out): a fixed random split in which every attribute pair still occurs in training."""
    combos = all_combos()
    rng = np.random.default_rng(HOLDOUT_SEED)
    order = rng.permutation(len(combos))
    held: list[Combo] = []
    pairs_left = {}
    for c in combos:
        for pair in itertools.combinations(range(4), 2):
            key = (pair, c.as_tuple()[pair[0]], c.as_tuple()[pair[1]])
            pairs_left[key] = pairs_left.get(key, 0) + 1
    for i in order:
        c = combos[int(i)]
        keys = [(pair, c.as_tuple()[pair[0]], c.as_tuple()[pair[1]]) for pair in itertools.combinations(range(4), 2)]
        if all(pairs_left[k] > 1 for k in keys):
            held.append(c)
            for k in keys:
                pairs_left[k] -= 1
        if len(held) == HELD_OUT:
            break
    held_set = set(held)
    return [c for c in combos if c not in held_set], sorted(held, key=lambda c: combos.index(c))


def shape_mask(shape: str, cx: float, cy: float, side: float, size: int = SIZE, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage in [0, 1] of a shape whose bounding box is `side` wide, centred at (cx, cy) (pixels)."""
    n = size * ss
    coords = (np.arange(n) + 0.5) / ss
    x, y = np.meshgrid(coords - cx, coords - cy)
    h = side / 2
    if shape == "circle":
        m = x * x + y * y <= h * h
    elif shape == "square":
        m = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "triangle":  # apex up, base at the bottom of the box
        m = (y >= -h) & (y <= h) & (np.abs(x) <= (y + h) / 2)
    elif shape == "cross":
        arm = side / 6
        m = ((np.abs(x) <= arm) & (np.abs(y) <= h)) | ((np.abs(y) <= arm) & (np.abs(x) <= h))
    else:
        raise ValueError(shape)
    return m.reshape(size, ss, size, ss).mean(axis=(1, 3))


def render(combo: Combo, rng: np.random.Generator, with_coverage: bool = False):
    """One image, float32 [SIZE, SIZE, 3] in [0, 1] (and the shape's coverage [SIZE, SIZE] if asked)."""
    side = rng.uniform(*SIZE_RANGE)
    cx, cy = POSITIONS[combo.position]
    cx, cy = cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER)
    fg = np.clip(np.array(COLORS[combo.color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255) / 255.0
    bg = np.clip(np.array(COLORS[combo.background]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255) / 255.0
    m = shape_mask(combo.shape, cx, cy, side)
    img = (m[..., None] * fg + (1 - m[..., None]) * bg).astype(np.float32)
    return (img, m.astype(np.float32)) if with_coverage else img


def make_set(combos: list[Combo], per_combo: int, seed: int, with_latents: bool = False):
    """Images [N, SIZE, SIZE, 3], combo index per image, a prompt per image (random phrasing) and, if
    asked, the images' latents (see latents_of)."""
    rng = np.random.default_rng(seed)
    images, index, prompts, coverage, shapes = [], [], [], [], []
    for k in range(per_combo):
        for i, c in enumerate(combos):
            img, cov = render(c, rng, with_coverage=True)
            images.append(img)
            coverage.append(cov)
            shapes.append(c.shape)
            index.append(i)
            prompts.append(c.prompt(int(rng.integers(len(TEMPLATES)))))
    images = np.stack(images)
    if with_latents:
        return images, index, prompts, latents_of(images, np.stack(coverage), shapes)
    return images, index, prompts


# The latent space (4 channels at 1/8 resolution), fixed by design; the TAESD-format encoder and
# decoder are trained to it (testbed.train). Channels 1-3: the 8x8-cell mean colour, centred and
# scaled; channel 4: the cell's shape coverage times a code for the shape. Model space = these
# numbers (the checkpoint's vae_scale cancels ComfyUI's SD1.5 factor 0.18215).
LATENT_COLOR_GAIN = 3.0
LATENT_SHAPE_GAIN = 2.0
SHAPE_CODE = {"circle": -1.5, "square": -0.5, "triangle": 0.5, "cross": 1.5}


def latents_of(images: np.ndarray, coverage: np.ndarray, shapes: list[str]) -> np.ndarray:
    """[N, 4, SIZE/8, SIZE/8] float32 latents of rendered images (their coverage masks and shapes known)."""
    n, h, w, _ = images.shape
    cells = images.reshape(n, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))  # [n, h/8, w/8, 3]
    code = np.array([SHAPE_CODE[s] for s in shapes], dtype=np.float64)[:, None, None]
    shape_cells = (coverage.reshape(n, h // 8, 8, w // 8, 8).mean(axis=(2, 4)) * code)
    lat = np.concatenate([LATENT_COLOR_GAIN * (cells.transpose(0, 3, 1, 2) - 0.5),
                          LATENT_SHAPE_GAIN * shape_cells[:, None]], axis=1)
    return lat.astype(np.float32)


def all_prompts(combos: list[Combo]) -> list[str]:
    return [c.prompt(t) for c in combos for t in range(len(TEMPLATES))]
