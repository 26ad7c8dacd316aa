"""The non-learned inpainting baseline of the evaluation table: OpenCV's Telea inpainting when ``cv2`` is
importable, otherwise a push-pull diffusion fill (mask-weighted image pyramid + Jacobi smoothing of the holes) in
numpy. No learning, no torch, no pconv imports: images are H×W×3 float arrays in [0, 1], ``valid`` is H×W with
1 = valid pixel, 0 = hole (the project's mask polarity).
"""

from __future__ import annotations

import numpy as np

TELEA_RADIUS = 3  # px around each hole pixel that cv2.inpaint considers
SMOOTH_ITERS = 6  # Jacobi steps per pyramid level of the push-pull fill


def _smooth_holes(img: np.ndarray, hole: np.ndarray, iters: int) -> np.ndarray:
    """Jacobi iterations of Laplace's equation inside the holes (valid pixels are boundary values)."""
    for _ in range(iters):
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        avg = 0.25 * (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:])
        img = np.where(hole[..., None], avg, img)
    return img


def pushpull_fill(image: np.ndarray, valid: np.ndarray, smooth_iters: int = SMOOTH_ITERS) -> np.ndarray:
    """Fill holes (valid == 0) of an H×W×C float image by a mask-weighted image pyramid: each coarser level
    averages the known pixels, holes take the upsampled coarser fill, then a few Jacobi steps smooth them."""
    w = (np.asarray(valid) > 0.5).astype(np.float32)
    img = np.asarray(image, dtype=np.float32) * w[..., None]
    h, wd = w.shape
    if w.all():
        return img
    if not w.any():
        return np.zeros_like(img)
    if h <= 1 or wd <= 1:
        mean = img.sum(axis=(0, 1)) / w.sum()
        return np.where(w[..., None] > 0, img, mean)
    ph, pw = h % 2, wd % 2
    iw = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge")
    ww = np.pad(w, ((0, ph), (0, pw)), mode="edge")
    H2, W2 = iw.shape[0] // 2, iw.shape[1] // 2
    sum_iw = iw.reshape(H2, 2, W2, 2, -1).sum(axis=(1, 3))
    sum_w = ww.reshape(H2, 2, W2, 2).sum(axis=(1, 3))
    coarse = sum_iw / np.maximum(sum_w, 1e-8)[..., None]
    filled = pushpull_fill(coarse, sum_w > 0, smooth_iters)
    up = np.repeat(np.repeat(filled, 2, axis=0), 2, axis=1)[:h, :wd]
    out = np.where(w[..., None] > 0, img, up)
    return _smooth_holes(out, w == 0, smooth_iters)


def baseline_name() -> str:
    """What :func:`baseline_inpaint` runs in this environment (for tables and MLflow params)."""
    try:
        import cv2  # noqa: F401
        return "OpenCV Telea inpainting"
    except ImportError:
        return "push-pull diffusion fill"


def baseline_inpaint(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Non-learned inpainting of an H×W×3 float image in [0, 1]; valid pixels are returned unchanged."""
    try:
        import cv2
    except ImportError:
        out = pushpull_fill(image, valid)
    else:
        u8 = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
        out = cv2.inpaint(u8, (valid < 0.5).astype(np.uint8), TELEA_RADIUS,
                          cv2.INPAINT_TELEA).astype(np.float32) / 255.0
    return np.where(valid[..., None] > 0.5, image, np.clip(out, 0, 1))


__all__ = ["baseline_inpaint", "baseline_name", "pushpull_fill"]
