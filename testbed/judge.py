"""The alignment judge: deterministic pixel analysis of a 32x32 image (no learned parts).

background  the median colour of the 2-pixel border, nearest palette colour
mask        pixels farther than MASK_DIST (RGB, 0..1) from that measured background colour; the
            largest 4-connected component is the shape (smaller specks are ignored)
color       median colour of the mask's most distinct half, nearest palette colour
coverage    per pixel, where its colour lies between background and shape colour (0..1): a soft
            mask that keeps the anti-aliased edges, which matter at 32x32 pixels
shape       for each of the four shapes, the size that gives the measured area and the centre that
            gives the measured centroid; the shape whose rendering matches the coverage best wins
position    that shape's centre, nearest of the five anchor points

An image whose coverage is below MIN_AREA pixels shows no shape: shape, colour and position are then
"none" (wrong). Verdict.features is a 15-number description used for the Frechet distance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import data

MASK_DIST = 0.25
MIN_AREA = 10
BORDER = 2
_PALETTE = np.array(list(data.COLORS.values()), dtype=np.float64) / 255.0
_NAMES = list(data.COLORS)
_ANCHORS = np.array(list(data.POSITIONS.values()), dtype=np.float64)
_POS_NAMES = list(data.POSITIONS)
_TEMPLATE_SS = 4


@dataclass
class Verdict:
    color: str
    shape: str
    background: str
    position: str
    features: np.ndarray  # 15 numbers, see features()
    ious: dict

    def as_dict(self) -> dict:
        return {a: getattr(self, a) for a in data.ATTRIBUTES}


def _nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


AREA_FACTOR = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}  # area / side^2
CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "cross": 0.0}  # (centroid - box centre) / side


def judge(image: np.ndarray) -> Verdict:
    """image: [SIZE, SIZE, 3] float in [0, 1] (or uint8)."""
    img = np.asarray(image, dtype=np.float64)
    if img.max() > 1.5:
        img = img / 255.0
    h, w, _ = img.shape
    b = BORDER
    border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[:, :b].reshape(-1, 3),
                             img[:, -b:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    dist = np.sqrt(((img - bg_rgb) ** 2).sum(-1))
    mask = _largest_component(dist > MASK_DIST)
    feats = np.zeros(15)
    feats[0:3] = bg_rgb
    if mask.sum() < MIN_AREA / 2:
        feats[3:6] = bg_rgb
        feats[6:8] = 0.5
        return Verdict("none", "none", _nearest_color(bg_rgb), "none", feats, {})
    core = dist >= max(np.quantile(dist[mask], 0.5), MASK_DIST)
    fg_rgb = np.median(img[core & mask], axis=0)
    axis = fg_rgb - bg_rgb
    # soft coverage: where each pixel lies between the background and the shape colour
    alpha = np.clip(((img - bg_rgb) @ axis) / max(axis @ axis, 1e-6), 0, 1)
    from scipy import ndimage

    alpha = alpha * ndimage.binary_dilation(mask, iterations=1)  # only the shape's neighbourhood
    area = float(alpha.sum())
    if area < MIN_AREA:
        feats[3:6] = fg_rgb
        feats[6:8] = 0.5
        return Verdict("none", "none", _nearest_color(bg_rgb), "none", feats, {})
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = (alpha * xs).sum() / area, (alpha * ys).sum() / area
    errors, boxes = {}, {}
    for s in data.SHAPES:
        side = np.sqrt(area / AREA_FACTOR[s])
        bx, by = cx, cy - CENTROID_DY[s] * side
        t = data.shape_mask(s, bx, by, side, size=h, ss=_TEMPLATE_SS)
        errors[s] = float(((t - alpha) ** 2).sum() / area)
        boxes[s] = (bx, by, side)
    shape = min(errors, key=errors.get)
    bx, by, side = boxes[shape]
    position = _POS_NAMES[int(np.argmin(((_ANCHORS - (bx, by)) ** 2).sum(1)))]
    feats[3:6] = fg_rgb
    feats[6:8] = (bx / w, by / h)
    feats[8] = area / (w * h) * 4
    feats[9] = side / w
    feats[10] = float(mask.sum()) / (w * h) * 4
    feats[11:15] = [errors[s] for s in data.SHAPES]
    return Verdict(_nearest_color(fg_rgb), shape, _nearest_color(bg_rgb), position, feats, errors)


def score(images, combos) -> dict:
    """Per-attribute accuracy (%), mean attribute accuracy ("alignment") and all-four-correct (%)."""
    hits = {a: [] for a in data.ATTRIBUTES}
    feats = []
    for img, c in zip(images, combos):
        v = judge(img)
        feats.append(v.features)
        for a in data.ATTRIBUTES:
            hits[a].append(getattr(v, a) == getattr(c, a))
    per = {a: 100.0 * float(np.mean(hits[a])) for a in data.ATTRIBUTES}
    all4 = 100.0 * float(np.mean(np.all([hits[a] for a in data.ATTRIBUTES], axis=0)))
    return {"per_attribute": per, "alignment": float(np.mean(list(per.values()))), "all_correct": all4,
            "features": np.stack(feats), "n": len(feats)}


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (as FID, on the judge's features)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eps = 1e-6 * np.eye(len(mu1))
    covmean, _ = linalg.sqrtm((s1 + eps) @ (s2 + eps), disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
