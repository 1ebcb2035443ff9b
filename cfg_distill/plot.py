"""A loss curve rendered with numpy alone (no plotting library): an [H, W, 3] float image in [0, 1]
that ComfyUI shows as an IMAGE and gradio as a picture."""
from __future__ import annotations

import numpy as np


def _line(img, x0, y0, x1, y1, color):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    ok = (xs >= 0) & (xs < img.shape[1]) & (ys >= 0) & (ys < img.shape[0])
    img[ys[ok], xs[ok]] = color


def loss_curve_image(losses, width: int = 512, height: int = 256, smooth: int = 0) -> np.ndarray:
    """Raw losses in light blue, a moving average in dark blue, log-scaled y when losses span
    more than a factor of 20. Axes frame in grey."""
    img = np.ones((height, width, 3), dtype=np.float32)
    m = 24  # margin
    _line(img, m, height - m, width - m, height - m, (0.5, 0.5, 0.5))
    _line(img, m, m, m, height - m, (0.5, 0.5, 0.5))
    y = np.asarray([v for v in losses if np.isfinite(v)], dtype=np.float64)
    if y.size < 2:
        return img
    log = y.min() > 0 and y.max() / y.min() > 20
    yv = np.log10(y) if log else y
    lo, hi = yv.min(), yv.max()
    span = hi - lo if hi > lo else 1.0

    def px(i, v, n):
        return m + i * (width - 2 * m) / max(n - 1, 1), height - m - (v - lo) / span * (height - 2 * m)

    def polyline(values, color):
        pts = [px(i, v, len(values)) for i, v in enumerate(values)]
        for (a, b), (c, d) in zip(pts, pts[1:]):
            _line(img, a, b, c, d, color)

    polyline(yv, (0.65, 0.78, 0.95))
    k = smooth or max(1, y.size // 20)
    if k > 1 and y.size > k:
        avg = np.convolve(yv, np.ones(k) / k, mode="valid")
        pts = [px(i + k - 1, v, y.size) for i, v in enumerate(avg)]
        for (a, b), (c, d) in zip(pts, pts[1:]):
            _line(img, a, b, c, d, (0.1, 0.25, 0.7))
    return img
