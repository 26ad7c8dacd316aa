"""pconv.inference.baseline: the non-learned fill of the evaluation table (push-pull diffusion; OpenCV Telea when present)."""

from __future__ import annotations

import numpy as np

from pconv.inference.baseline import baseline_inpaint, baseline_name, pushpull_fill


def smooth_ramp(h: int = 37, w: int = 50) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([xx / w, yy / h, np.full_like(xx, 0.3)], axis=-1)


def test_pushpull_baseline_fills_holes_sensibly():
    ramp = smooth_ramp()
    h, w = ramp.shape[:2]
    valid = np.ones((h, w), np.float32)
    valid[10:25, 15:40] = 0
    filled = pushpull_fill(ramp, valid)
    np.testing.assert_array_equal(filled[valid > 0], ramp[valid > 0])
    hole = valid == 0
    err = np.abs(filled[hole] - ramp[hole]).mean()
    mean_fill_err = np.abs(ramp[hole] - ramp[~hole].mean(axis=0)).mean()
    assert err < 0.3 * mean_fill_err  # a smooth field is recovered far better than by a mean fill
    const = np.full((h, w, 3), 0.6, np.float32)
    np.testing.assert_allclose(baseline_inpaint(const, valid), const, atol=1e-6)


def test_pushpull_edge_cases():
    ramp = smooth_ramp(5, 7)
    np.testing.assert_array_equal(pushpull_fill(ramp, np.ones((5, 7))), ramp)           # nothing to fill
    np.testing.assert_array_equal(pushpull_fill(ramp, np.zeros((5, 7))), np.zeros_like(ramp))  # nothing known
    row = ramp[:1]
    valid = np.array([[1, 0, 0, 1, 1, 0, 1]], np.float32)
    filled = pushpull_fill(row, valid)  # a 1-px-high image: holes take the mean of the known pixels
    np.testing.assert_allclose(filled[0, 1], row[0, valid[0] > 0].mean(axis=0), rtol=1e-6)


def test_baseline_keeps_valid_pixels_and_stays_in_range():
    rng = np.random.default_rng(0)
    image = rng.random((32, 32, 3), dtype=np.float32)
    valid = (rng.random((32, 32)) > 0.3).astype(np.float32)
    out = baseline_inpaint(image, valid)
    assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out[valid > 0.5], image[valid > 0.5])
    assert baseline_name() in ("OpenCV Telea inpainting", "push-pull diffusion fill")
