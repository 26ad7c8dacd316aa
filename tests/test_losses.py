"""Tests of pconv/core/losses.py: each term of eq. 3-7 against an independent computation, and the extractor."""

from __future__ import annotations

import logging
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from pconv.core.losses import (
    PAPER_LOSS_WEIGHTS,
    InpaintingLoss,
    LossWeights,
    VGG16FeatureExtractor,
    gram_matrix,
    total_variation,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def extractor() -> VGG16FeatureExtractor:
    return VGG16FeatureExtractor("random", seed=0)


@pytest.fixture(scope="module")
def full_vgg16_state_file(tmp_path_factory) -> str:
    """A random torchvision vgg16() state dict (features + classifier) saved to a file."""
    torch.manual_seed(123)
    state = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path_factory.mktemp("vgg") / "vgg16_random.pth"
    torch.save(state, path)
    return str(path)


def _batch(seed: int, n: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, size, size, generator=g)
    out = torch.rand(n, 3, size, size, generator=g)
    mask = (torch.rand(n, 1, size, size, generator=g) > 0.4).float()
    return mask, out, gt


# ------------------------------------------------------------------------------------------- references


def _ref_pixel_terms(mask: np.ndarray, out: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """L_valid and L_hole by explicit loops, normalised by N_Igt = N*C*H*W."""
    n, c, h, w = gt.shape
    valid = hole = 0.0
    for a in range(n):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    m = mask[a, 0, i, j]
                    d = abs(out[a, ch, i, j] - gt[a, ch, i, j])
                    valid += m * d
                    hole += (1 - m) * d
    return valid / gt.size, hole / gt.size


def _ref_tv(mask: np.ndarray, comp: np.ndarray) -> float:
    """Eq. 6 by loops: P = pixels with a hole pixel in their 3x3 neighbourhood; pairs both in P."""
    n, c, h, w = comp.shape
    total = 0.0
    for a in range(n):
        region = np.zeros((h, w), dtype=bool)
        for i in range(h):
            for j in range(w):
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        ii, jj = i + di, j + dj
                        if 0 <= ii < h and 0 <= jj < w and mask[a, 0, ii, jj] == 0:
                            region[i, j] = True
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    if j + 1 < w and region[i, j] and region[i, j + 1]:
                        total += abs(comp[a, ch, i, j + 1] - comp[a, ch, i, j])
                    if i + 1 < h and region[i, j] and region[i + 1, j]:
                        total += abs(comp[a, ch, i + 1, j] - comp[a, ch, i, j])
    return total / comp.size


def _ref_gram(f: np.ndarray) -> np.ndarray:
    n, c, h, w = f.shape
    g = np.zeros((n, c, c))
    for a in range(n):
        for p in range(c):
            for q in range(c):
                g[a, p, q] = sum(f[a, p, i, j] * f[a, q, i, j] for i in range(h) for j in range(w))
    return g / (c * h * w)


# ----------------------------------------------------------------------------------------------- weights


def test_paper_weights_are_eq7():
    w = PAPER_LOSS_WEIGHTS
    assert (w.valid, w.hole, w.perceptual, w.style, w.tv) == (1.0, 6.0, 0.05, 120.0, 0.1)


# ------------------------------------------------------------------------------------------------ extractor


def test_extractor_shapes(extractor):
    feats = extractor(torch.rand(2, 3, 32, 48))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6)]


def test_extractor_rejects_non_rgb(extractor):
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        extractor(torch.rand(1, 1, 16, 16))


def test_extractor_frozen_but_grads_reach_input(extractor):
    extractor.train()
    assert not extractor.training and not any(m.training for m in extractor.modules())
    assert all(not p.requires_grad for p in extractor.parameters())
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    sum(f.sum() for f in extractor(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in extractor.parameters())


def test_extractor_matches_torchvision_with_imagenet_normalisation(extractor):
    """Same weights in torchvision's own VGG16 applied to (x - mean) / std give the same pool1..3."""
    tv_features = torchvision.models.vgg16(weights=None).features.eval()
    tv_features.load_state_dict(extractor.features.state_dict(), strict=False)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    h = (x - mean) / std
    expected = []
    with torch.no_grad():
        for i, layer in enumerate(tv_features):
            h = layer(h)
            if i in (4, 9, 16):
                expected.append(h.clone())
            if i == 16:
                break
        got = extractor(x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_random_weights_warn_and_are_seeded(caplog):
    with caplog.at_level(logging.WARNING, logger="pconv.core.losses"):
        a = VGG16FeatureExtractor("random", seed=7)
    assert any("RANDOM" in r.getMessage() for r in caplog.records)
    b = VGG16FeatureExtractor("random", seed=7)
    c = VGG16FeatureExtractor("random", seed=8)
    wa, wb, wc = (m.features[0].weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_load_full_torchvision_state_dict_from_file(full_vgg16_state_file):
    ext = VGG16FeatureExtractor(full_vgg16_state_file)
    state = torch.load(full_vgg16_state_file, weights_only=True)
    assert any(k.startswith("classifier.") for k in state)  # extra keys were present and ignored
    for idx in (0, 2, 5, 7, 10, 12, 14):
        assert torch.equal(ext.features[idx].weight, state[f"features.{idx}.weight"])
        assert torch.equal(ext.features[idx].bias, state[f"features.{idx}.bias"])
    ref = torchvision.models.vgg16(weights=None).features[:17].eval()
    ref.load_state_dict({k[len("features."):]: v for k, v in state.items()
                         if k.startswith("features.") and int(k.split(".")[1]) < 17})
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        expected = ref((x - ext.mean) / ext.std)
        got = ext(x)[2]
    torch.testing.assert_close(got, expected)


def test_missing_feature_keys_is_an_error(tmp_path, full_vgg16_state_file):
    state = torch.load(full_vgg16_state_file, weights_only=True)
    del state["features.14.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"features\.14\.weight"):
        VGG16FeatureExtractor(str(path))


def test_bad_weights_sources(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        VGG16FeatureExtractor(str(missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        VGG16FeatureExtractor(str(garbage))
    wrong = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), wrong)
    with pytest.raises(ValueError, match="state dict"):
        VGG16FeatureExtractor(str(wrong))


def test_weights_by_uri_go_through_storage_read_bytes(monkeypatch, full_vgg16_state_file):
    """An s3:// URI is read with the ``read_bytes`` it is given (training passes pconv.storage.uris.read_bytes: the
    core imports no storage); unreadable URIs name the URI, and a URI without a reader is a clear error.

    The object-storage round trip itself is covered by the storage integration tests (real S3 server);
    here a reader records the call.
    """
    blob = open(full_vgg16_state_file, "rb").read()
    seen: list[str] = []

    def read_bytes(uri: str) -> bytes:
        seen.append(uri)
        if uri.endswith("missing.pth"):
            raise FileNotFoundError(uri)
        return blob

    with pytest.raises(ValueError, match="are a URI: pass read_bytes"):
        VGG16FeatureExtractor("s3://weights/vgg16.pth")
    ext = VGG16FeatureExtractor("s3://weights/vgg16.pth", read_bytes=read_bytes)
    assert seen == ["s3://weights/vgg16.pth"]
    state = torch.load(full_vgg16_state_file, weights_only=True)
    assert torch.equal(ext.features[12].weight, state["features.12.weight"])
    with pytest.raises(FileNotFoundError, match="s3://weights/missing.pth"):
        VGG16FeatureExtractor("s3://weights/missing.pth", read_bytes=read_bytes)


def test_imagenet_download_failure_says_how_to_supply_weights(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as info:
        VGG16FeatureExtractor("imagenet")
    msg = str(info.value)
    assert "TORCH_HOME" in msg and "weights=" in msg and "s3://" in msg


def test_imagenet_from_populated_torch_cache(monkeypatch, tmp_path, full_vgg16_state_file):
    """'imagenet' loads torchvision's file from the hub cache without network access."""
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    cached = checkpoints / "vgg16-397923af.pth"
    cached.symlink_to(full_vgg16_state_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ext = VGG16FeatureExtractor("imagenet")
    state = torch.load(full_vgg16_state_file, weights_only=True)
    assert torch.equal(ext.features[0].weight, state["features.0.weight"])


# -------------------------------------------------------------------------------------------- loss terms


def test_pixel_and_tv_terms_match_loops(extractor):
    mask, out, gt = _batch(1, n=2, size=8)  # 8 px: the smallest size VGG pool3 accepts
    res = InpaintingLoss(extractor)(mask, out, gt)
    m, o, g = (t.double().numpy() for t in (mask, out, gt))
    valid, hole = _ref_pixel_terms(m, o, g)
    comp = m * g + (1 - m) * o
    assert res["valid"].item() == pytest.approx(valid, rel=1e-5)
    assert res["hole"].item() == pytest.approx(hole, rel=1e-5)
    assert res["tv"].item() == pytest.approx(_ref_tv(m, comp), rel=1e-5)


def test_tv_hand_made_mask():
    """One hole pixel at (2, 2) of a 6x6 image: P is the 3x3 block rows/cols 1..3.

    With comp[i, j] = 10 i + j, the block has 3 rows x 2 horizontal pairs of difference 1 and 2 x 3 vertical
    pairs of difference 10: 6 + 60 = 66 per channel, over N*C*H*W = 3 * 36 elements.
    """
    mask = torch.ones(1, 1, 6, 6)
    mask[0, 0, 2, 2] = 0
    ramp = (10 * torch.arange(6).view(6, 1) + torch.arange(6).view(1, 6)).float()
    comp = ramp.expand(1, 3, 6, 6)
    assert total_variation(comp, mask).item() == pytest.approx(3 * 66 / (3 * 36))
    # the hand-made case also agrees with the loop reference
    assert total_variation(comp, mask).item() == pytest.approx(_ref_tv(mask.numpy(), comp.numpy()))


def test_tv_zero_without_holes_and_counts_only_region():
    mask = torch.ones(1, 1, 8, 8)
    comp = torch.rand(1, 3, 8, 8)
    assert total_variation(comp, mask).item() == 0.0
    mask[0, 0, 0, 0] = 0  # region = rows/cols 0..1; changing a far pixel must not matter
    before = total_variation(comp, mask).item()
    comp2 = comp.clone()
    comp2[0, :, 6, 6] += 0.7
    assert total_variation(comp2, mask).item() == pytest.approx(before)


def test_gram_matrix_matches_loops_and_einsum():
    f = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    g = gram_matrix(f)
    assert g.dtype == torch.float32
    np.testing.assert_allclose(g.numpy(), _ref_gram(f.numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        g.numpy(), torch.einsum("nchw,ndhw->ncd", f, f).numpy() / (4 * 3 * 5), rtol=1e-5, atol=1e-6
    )


def test_perceptual_and_style_terms_match_formula(extractor):
    mask, out, gt = _batch(2, n=2, size=32)
    res = InpaintingLoss(extractor)(mask, out, gt)
    comp = mask * gt + (1 - mask) * out
    with torch.no_grad():
        f_out, f_comp, f_gt = extractor(out), extractor(comp), extractor(gt)
    perc = style_out = style_comp = 0.0
    for fo, fc, fg in zip(f_out, f_comp, f_gt):
        fo, fc, fg = (t.double().numpy() for t in (fo, fc, fg))
        perc += np.abs(fo - fg).sum() / fg.size + np.abs(fc - fg).sum() / fg.size
        n, c, h, w = fg.shape
        gram = lambda f: np.einsum("nci,ndi->ncd", f.reshape(n, c, -1), f.reshape(n, c, -1)) / (c * h * w)
        # eq. 4/5: (1 / C_p^2) * ||K_p (G - G_gt)||_1, averaged over the batch
        style_out += np.abs(gram(fo) - gram(fg)).sum() / (c * c) / n
        style_comp += np.abs(gram(fc) - gram(fg)).sum() / (c * c) / n
    assert res["perceptual"].item() == pytest.approx(perc, rel=1e-4)
    assert res["style_out"].item() == pytest.approx(style_out, rel=1e-4)
    assert res["style_comp"].item() == pytest.approx(style_comp, rel=1e-4)
    assert res["style_out"].item() > 0 and res["style_comp"].item() > 0


@pytest.mark.parametrize("weights", [PAPER_LOSS_WEIGHTS, LossWeights(2.0, 3.0, 0.5, 7.0, 0.25)])
def test_total_is_weighted_sum(extractor, weights):
    mask, out, gt = _batch(3)
    res = InpaintingLoss(extractor, weights)(mask, out, gt)
    expected = (
        weights.valid * res["valid"]
        + weights.hole * res["hole"]
        + weights.perceptual * res["perceptual"]
        + weights.style * (res["style_out"] + res["style_comp"])
        + weights.tv * res["tv"]
    )
    assert set(res) == {"valid", "hole", "perceptual", "style_out", "style_comp", "tv", "total"}
    assert res["total"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_terms_vanish_where_they_must(extractor):
    mask, out, gt = _batch(4)
    loss = InpaintingLoss(extractor)
    right_on_valid = mask * gt + (1 - mask) * out
    res = loss(mask, right_on_valid, gt)
    assert res["valid"].item() == 0.0 and res["hole"].item() > 0
    right_on_hole = (1 - mask) * gt + mask * out
    res = loss(mask, right_on_hole, gt)
    assert res["hole"].item() == 0.0 and res["valid"].item() > 0
    res = loss(mask, gt.clone(), gt)
    for key in ("valid", "hole", "perceptual", "style_out", "style_comp"):
        assert res[key].item() == pytest.approx(0.0, abs=1e-7), key
    assert res["tv"].item() == pytest.approx(total_variation(gt, mask).item())


def test_comp_terms_ignore_output_on_valid_pixels(extractor):
    """I_comp takes valid pixels from gt, so style_comp and tv do not see the output there."""
    mask, out, gt = _batch(5)
    loss = InpaintingLoss(extractor)
    a = loss(mask, out, gt)
    b = loss(mask, out + 0.3 * mask, gt)
    assert b["style_comp"].item() == pytest.approx(a["style_comp"].item(), rel=1e-6)
    assert b["tv"].item() == pytest.approx(a["tv"].item(), rel=1e-6)
    assert b["valid"].item() != pytest.approx(a["valid"].item())


def test_one_no_grad_gt_call_and_one_joint_call(extractor):
    calls: list[tuple[int, bool]] = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            calls.append((x.shape[0], torch.is_grad_enabled()))
            return extractor(x)

    mask, out, gt = _batch(6, n=3)
    out.requires_grad_(True)
    res = InpaintingLoss(Spy())(mask, out, gt)
    assert calls == [(3, False), (6, True)]
    res["total"].backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


def test_shape_errors(extractor):
    mask, out, gt = _batch(7)
    loss = InpaintingLoss(extractor)
    with pytest.raises(ValueError, match="differ"):
        loss(mask, out[:, :, :8], gt)
    with pytest.raises(ValueError, match="mask"):
        loss(mask[:, :, :8], out, gt)


def test_works_under_bf16_autocast(extractor):
    mask, out, gt = _batch(8, size=32)
    loss = InpaintingLoss(extractor)
    ref = loss(mask, out, gt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = loss(mask, out, gt)
    for key, value in res.items():
        assert value.dtype == torch.float32, key
        assert torch.isfinite(value), key
        assert value.item() == pytest.approx(ref[key].item(), rel=0.05), key


def test_core_modules_import_no_ray_mlflow_or_storage():
    """losses/masks/metrics are core modules: importing them pulls in neither ray, mlflow nor pconv.storage.uris."""
    import subprocess
    import sys

    code = (
        "import sys, pconv.core.losses, pconv.core.masks, pconv.core.metrics; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow') or m == 'pconv.storage.uris'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
