"""Tests of pconv/core/metrics.py: PSNR/SSIM against scikit-image on real photos, L1, and per-bin aggregation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pconv.core.masks import HOLE_RATIO_BINS
from pconv.core.metrics import BinnedMetrics, l1_percent, psnr, ssim

CBSD68 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cbsd68"


def _sk_ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    return structural_similarity(
        gt, pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=1.0
    )


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, pred, gt) float64 H x W x 3 in [0, 1]: real photos with noise, blur, or both."""
    files = sorted(CBSD68.glob("*.png"))
    assert len(files) == 68, f"expected the 68 CBSD68 images in {CBSD68}"
    rng = np.random.default_rng(0)
    out = []
    for k, path in enumerate(files[:4]):
        img = Image.open(path).convert("RGB")
        gt = np.asarray(img, dtype=np.float64) / 255.0
        if k % 2 == 0:
            pred = np.clip(gt + rng.normal(0, 0.04 + 0.03 * k, gt.shape), 0, 1)
        else:
            blurred = img.filter(ImageFilter.GaussianBlur(radius=1 + k))
            pred = np.asarray(blurred, dtype=np.float64) / 255.0
            if k == 3:
                pred = np.clip(pred + rng.normal(0, 0.02, gt.shape), 0, 1)
        out.append((path.name, pred, gt))
    return out


def test_psnr_ssim_match_scikit_image_numpy(pairs):
    for name, pred, gt in pairs:
        ref_psnr = peak_signal_noise_ratio(gt, pred, data_range=1.0)
        assert psnr(pred, gt) == pytest.approx(ref_psnr, rel=1e-4), name
        value = ssim(pred, gt)
        assert isinstance(value, float)
        assert value == pytest.approx(_sk_ssim(pred, gt), abs=1e-6), name


def test_torch_batch_matches_scikit_image(pairs):
    # crop to a common size and stack into one N x 3 x H x W float32 batch
    h = min(p.shape[0] for _, p, _ in pairs)
    w = min(p.shape[1] for _, p, _ in pairs)
    preds = np.stack([p[:h, :w] for _, p, _ in pairs]).astype(np.float32)
    gts = np.stack([g[:h, :w] for _, _, g in pairs]).astype(np.float32)
    tp = torch.from_numpy(preds).permute(0, 3, 1, 2)
    tg = torch.from_numpy(gts).permute(0, 3, 1, 2)
    got_ssim, got_psnr, got_l1 = ssim(tp, tg), psnr(tp, tg), l1_percent(tp, tg)
    assert got_ssim.shape == (len(pairs),) and got_psnr.shape == (len(pairs),)
    for i in range(len(pairs)):
        p64, g64 = preds[i].astype(np.float64), gts[i].astype(np.float64)
        assert got_ssim[i].item() == pytest.approx(_sk_ssim(p64, g64), abs=1e-5)
        assert got_psnr[i].item() == pytest.approx(peak_signal_noise_ratio(g64, p64, data_range=1.0), rel=1e-4)
        assert got_l1[i].item() == pytest.approx(np.abs(p64 - g64).mean() * 100, rel=1e-6)
    # a numpy N x H x W x 3 batch gives the same values as an array
    np.testing.assert_allclose(ssim(preds, gts), got_ssim.numpy(), rtol=1e-9)


def test_l1_percent_against_numpy(pairs):
    for name, pred, gt in pairs:
        assert l1_percent(pred, gt) == pytest.approx(np.mean(np.abs(pred - gt)) * 100, rel=1e-12), name


def test_identical_images():
    img = np.random.default_rng(1).random((32, 40, 3))
    assert ssim(img, img) == pytest.approx(1.0)
    assert psnr(img, img) == math.inf
    assert l1_percent(img, img) == 0.0


def test_input_errors():
    a = np.zeros((32, 32, 3))
    with pytest.raises(ValueError, match="differ"):
        psnr(a, np.zeros((32, 31, 3)))
    with pytest.raises(ValueError, match="11 x 11"):
        ssim(np.zeros((10, 32, 3)), np.zeros((10, 32, 3)))
    with pytest.raises(TypeError):
        l1_percent(torch.zeros(1, 3, 16, 16), np.zeros((16, 16, 3)))


# ------------------------------------------------------------------------------------------ aggregation


def _records(n: int, seed: int):
    rng = np.random.default_rng(seed)
    bins = rng.integers(0, len(HOLE_RATIO_BINS), n)
    bins[:3] = -1  # masks outside the paper's bins land in "other"
    borders = rng.random(n) < 0.5
    return bins, borders, rng.uniform(1, 20, n), rng.uniform(15, 35, n), rng.uniform(0.3, 1.0, n)


def test_binned_metrics_means_and_counts():
    bins, borders, l1s, psnrs, ssims = _records(200, 0)
    agg = BinnedMetrics()
    for row in zip(bins, borders, l1s, psnrs, ssims):
        agg.add(*row)
    assert agg.count == 200
    rows = agg.table()
    assert [(r["bin"], r["border"]) for r in rows[:12]] == [(b, f) for b in range(6) for f in (False, True)]
    for r in rows:
        sel = (bins == r["bin"]) & (borders == r["border"])
        assert r["count"] == int(sel.sum())
        if r["count"]:
            assert r["l1"] == pytest.approx(l1s[sel].mean())
            assert r["psnr"] == pytest.approx(psnrs[sel].mean())
            assert r["ssim"] == pytest.approx(ssims[sel].mean())
    assert sum(r["count"] for r in rows) == 200  # the "other" rows included
    overall = agg.as_dict()["overall"]
    assert overall["count"] == 200 and overall["psnr"] == pytest.approx(psnrs.mean())


def test_add_batch_equals_add_and_accepts_tensors():
    bins, borders, l1s, psnrs, ssims = _records(50, 1)
    a, b = BinnedMetrics(), BinnedMetrics()
    for row in zip(bins, borders, l1s, psnrs, ssims):
        a.add(*row)
    b.add_batch(torch.from_numpy(bins), torch.from_numpy(borders), torch.from_numpy(l1s), psnrs.tolist(), ssims)
    assert a.as_dict() == b.as_dict()
    with pytest.raises(ValueError, match="lengths"):
        b.add_batch([0, 1], [True], [1.0, 2.0], [20.0, 21.0], [0.5, 0.6])
    with pytest.raises(ValueError, match="bin_index"):
        b.add(6, False, 1.0, 20.0, 0.5)


def test_empty_cells_and_markdown():
    agg = BinnedMetrics()
    agg.add(2, True, 4.0, 25.0, 0.8)
    agg.add(2, True, 6.0, 27.0, 0.9)
    empty = [r for r in agg.table() if r["count"] == 0]
    assert len(empty) == 11 and all(math.isnan(r["ssim"]) for r in empty)
    assert [r["count"] for r in agg.table(include_empty=False)] == [2]
    md = agg.to_markdown()
    assert "| (0.2, 0.3] | yes | 2 | 5.00 | 26.00 | 0.8500 |" in md
    assert "(0.01, 0.1]" not in md  # empty cells are left out of the markdown
    assert md.splitlines()[-1].startswith("| all | - | 2 |")
