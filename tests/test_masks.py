"""Tests of pconv/core/masks.py against NVIDIA's real test masks and the paper's bin/border definitions."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from pconv.core import masks
from pconv.core.masks import (
    BORDER_BAND,
    HOLE_RATIO_BINS,
    augment_mask,
    decode_mask,
    dilate_holes,
    decode_stored_mask,
    encode_mask_png,
    generate_mask,
    hole_ratio,
    polarity_warning,
    ratio_bin,
    resize_nearest,
    touches_border,
)

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
NVIDIA_ZIP = DATASETS / "nvidia_irregular_mask_test.zip"


@pytest.fixture(scope="module")
def nvidia_sample() -> list[tuple[int, str, bytes]]:
    """(index, name, bytes) of 4 files per 1000-file block (48 files), in name order."""
    assert NVIDIA_ZIP.is_file(), f"missing dataset {NVIDIA_ZIP} (see ../shared/datasets/README.md)"
    wanted = {b * 1000 + k for b in range(12) for k in (0, 321, 654, 999)}
    with zipfile.ZipFile(NVIDIA_ZIP) as zf:
        names = sorted(n for n in zf.namelist() if not n.endswith("/"))
        sample = [(i, name, zf.read(name)) for i, name in enumerate(names) if i in wanted]
    assert len(names) == 12000
    assert names == sorted(names) and all(n.endswith(".png") for n in names)
    assert names[0].endswith("00000.png") and names[-1].endswith("11999.png")
    return sample


# ------------------------------------------------------------------------------------------- real masks


def test_nvidia_masks_match_documented_bins_and_border(nvidia_sample):
    assert len(nvidia_sample) == 48
    for index, name, data in nvidia_sample:
        m = decode_mask(data, hole_color="white", name=name)
        assert m.dtype == np.uint8 and m.shape == (512, 512), name
        assert set(np.unique(m).tolist()) <= {0, 1}, name
        # polarity: white (255) in the file = hole = 0 in the mask
        raw = np.asarray(Image.open(io.BytesIO(data)))
        assert np.array_equal(m == 0, raw == 255), name
        block = index // 1000
        assert ratio_bin(hole_ratio(m)) == index // 2000, (name, hole_ratio(m))
        assert touches_border(m) == (block % 2 == 1), name


def test_nvidia_black_polarity_is_the_complement(nvidia_sample):
    for _, name, data in nvidia_sample[::6]:
        white = decode_mask(data, hole_color="white", name=name)
        black = decode_mask(data, hole_color="black", name=name)
        assert np.array_equal(black, 1 - white), name


# -------------------------------------------------------------------------------------- decode / encode


def _png(arr: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_threshold_rule():
    grey = np.array([[0, 100, 127, 128], [150, 153, 200, 255]], dtype=np.uint8)
    for threshold in (0.5, 0.6, 0.9):
        m = decode_mask(_png(grey), hole_color="white", threshold=threshold)
        expected_hole = grey / 255.0 >= threshold
        assert np.array_equal(m, (~expected_hole).astype(np.uint8)), threshold


def test_decode_converts_multichannel_to_grey():
    grey = np.zeros((20, 30), dtype=np.uint8)
    grey[5:10, 3:25] = 255
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    for mode in ("RGB", "RGBA"):
        data = _png(rgb, mode)
        assert np.array_equal(decode_mask(data, "white"), decode_mask(_png(grey), "white")), mode


def test_decode_jpeg_mask():
    grey = np.zeros((64, 64), dtype=np.uint8)
    grey[10:40, 20:50] = 255
    m = decode_mask(_png(grey, fmt="JPEG"), hole_color="white")
    assert set(np.unique(m).tolist()) <= {0, 1}
    assert (m == (grey < 128)).mean() > 0.99


def test_decode_errors_name_the_record():
    with pytest.raises(ValueError, match=r"white.*black"):
        decode_mask(_png(np.zeros((4, 4), np.uint8)), hole_color="gray", name="m1.png")
    with pytest.raises(ValueError, match="broken.png"):
        decode_mask(b"\x89PNG not really", hole_color="white", name="broken.png")
    with pytest.raises(ValueError, match="threshold"):
        decode_mask(_png(np.zeros((4, 4), np.uint8)), hole_color="white", threshold=0.0)


def test_stored_png_round_trip_is_exact_and_compact():
    m = generate_mask(256, np.random.default_rng(3), bin_index=2)
    data = encode_mask_png(m)
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.mode == "1"
    assert len(data) < m.size / 8  # smaller than the raw 1-bit bitmap
    # internal polarity on disk: white = valid
    assert np.array_equal(np.asarray(img.convert("L")) == 255, m == 1)
    back = decode_stored_mask(data)
    assert back.dtype == np.uint8 and np.array_equal(back, m)


def test_decode_stored_mask_reads_other_modes_and_names_broken_data():
    """The 1-bit fast path gives way to decode_mask for other stored modes (grey 0/255) and for errors."""
    m = generate_mask(64, np.random.default_rng(5), bin_index=1)
    buf = io.BytesIO()
    Image.fromarray(m * 255).save(buf, format="PNG")  # mode "L", white = valid
    assert np.array_equal(decode_stored_mask(buf.getvalue()), m)
    with pytest.raises(ValueError, match="cannot decode mask 'bad.png'"):
        decode_stored_mask(encode_mask_png(m)[:40], name="bad.png")


def test_encode_rejects_non_binary():
    with pytest.raises(ValueError, match="binary"):
        encode_mask_png(np.array([[0, 2], [1, 1]], dtype=np.uint8))
    for bad in (np.array([[0, -1], [1, 1]], dtype=np.int16), np.array([[0.0, 0.5], [1.0, 1.0]])):
        with pytest.raises(ValueError, match="binary"):
            encode_mask_png(bad)
    assert decode_stored_mask(encode_mask_png(np.array([[0, 1], [1, 0]], dtype=np.int64))).tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ValueError, match="H x W"):
        encode_mask_png(np.ones((1, 4, 4), dtype=np.uint8))


def test_decode_applies_exif_orientation_like_images():
    """A mask photographed/exported with an EXIF orientation is read as displayed, like its image (issue 19.4)."""
    from pconv.core.images import open_image

    grey = np.zeros((20, 40), dtype=np.uint8)  # stored 40 wide x 20 high, hole in the top-left corner
    grey[:5, :10] = 255
    img = Image.fromarray(grey)
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    m = decode_mask(buf.getvalue(), hole_color="white")
    assert m.shape == (40, 20)  # as displayed: 20 wide x 40 high
    assert m.shape == open_image(buf.getvalue()).size[::-1]  # the same orientation as an image file gets
    assert (m[:10, -5:] == 0).all() and (m == 0).sum() == 50  # the hole moved to the top-right, as displayed


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
@pytest.mark.parametrize("hole_color", ["white", "black"])
def test_decode_reads_alpha_when_it_is_the_only_signal(mode, hole_color):
    """Holes marked only by transparency (one colour everywhere) were stored as 0 % holes (issue 19.3)."""
    alpha = np.full((16, 16), 255, dtype=np.uint8)
    alpha[4:8, 2:10] = 0  # transparent = hole
    alpha[0, 0] = 100  # below the threshold: a hole too
    for colour in (0, 255):
        rgba = np.dstack([np.full((16, 16), colour, np.uint8)] * 3 + [alpha])
        img = Image.fromarray(rgba, "RGBA").convert(mode)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        m = decode_mask(buf.getvalue(), hole_color=hole_color)
        assert np.array_equal(m, (alpha >= 128).astype(np.uint8)), (mode, colour)
        assert hole_ratio(m) == 33 / 256


def test_decode_ignores_alpha_when_the_colours_carry_the_mask():
    grey = np.zeros((8, 8), dtype=np.uint8)
    grey[:, :2] = 255  # white = hole
    alpha = np.full((8, 8), 255, dtype=np.uint8)
    alpha[4:, :] = 0  # a transparent half that is NOT the mask: colour varies, so colour wins
    buf = io.BytesIO()
    Image.fromarray(np.dstack([grey] * 3 + [alpha]), "RGBA").save(buf, format="PNG")
    assert np.array_equal(decode_mask(buf.getvalue(), "white"), (grey < 128).astype(np.uint8))


def test_decompression_bomb_mask_is_a_value_error_naming_it(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 64 x 64 mask is then > 2x the limit: a "bomb"
    with pytest.raises(ValueError, match=r"mask 'bomb.png': refused, too many pixels"):
        decode_mask(_png(np.zeros((64, 64), np.uint8)), hole_color="white", name="bomb.png")


def test_polarity_warning_for_one_mask_and_for_a_set():
    assert polarity_warning(0.3) is None and polarity_warning([0.6]) is None  # 0.6 is still in the last bin
    one = polarity_warning(0.94)
    assert one and "94.0%" in one and "inverted" in one and "60%" in one
    assert polarity_warning([]) is None
    paper_like = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55]
    assert polarity_warning(paper_like) is None
    inverted = [1 - r for r in paper_like]  # 0.95 ... 0.45: four of six beyond every bin
    text = polarity_warning(inverted)
    assert text and "4 of 6 masks" in text and "inverted" in text
    assert polarity_warning([0.9, 0.95, 0.1, 0.2]) is None  # half is not "most"
    assert polarity_warning(np.array([0.99, 1.0, 0.7])) is not None


# ------------------------------------------------------------------------------------- ratios and border


def test_ratio_bins_are_half_open():
    assert len(HOLE_RATIO_BINS) == 6 and HOLE_RATIO_BINS[0] == (0.01, 0.1) and HOLE_RATIO_BINS[-1] == (0.5, 0.6)
    assert ratio_bin(0.0) == -1 and ratio_bin(0.01) == -1
    assert ratio_bin(0.0100001) == 0 and ratio_bin(0.1) == 0 and ratio_bin(0.1000001) == 1
    assert ratio_bin(0.6) == 5 and ratio_bin(0.6000001) == -1


def test_hole_ratio_counts_zeros():
    m = np.ones((10, 10), dtype=np.uint8)
    m[:3, :5] = 0
    assert hole_ratio(m) == pytest.approx(0.15)
    assert hole_ratio(m.astype(np.float32)) == pytest.approx(0.15)


def test_touches_border_band_edges():
    assert BORDER_BAND == 50
    size = 512
    for (r, c), expected in {
        (49, 256): True, (50, 256): False, (462, 256): True, (461, 256): False,
        (256, 49): True, (256, 50): False, (256, 462): True, (256, 461): False,
    }.items():
        m = np.ones((size, size), dtype=np.uint8)
        m[r, c] = 0
        assert touches_border(m) is expected, (r, c)
    assert touches_border(np.ones((size, size), np.uint8)) is False


# ---------------------------------------------------------------------------------------------- generator


@pytest.mark.parametrize("size", [128, 256])
@pytest.mark.parametrize("border", [True, False, None])
def test_generator_hits_every_bin(size, border):
    band = BORDER_BAND * size // 512  # the paper's 50 px at 512, scaled to the test size
    rng = np.random.default_rng(size * 10 + {True: 1, False: 2, None: 3}[border])
    for b in range(len(HOLE_RATIO_BINS)):
        for _ in range(2):
            m = generate_mask(size, rng, bin_index=b, border=border, band=band)
            assert m.dtype == np.uint8 and m.shape == (size, size)
            assert set(np.unique(m).tolist()) <= {0, 1}
            assert ratio_bin(hole_ratio(m)) == b, (b, hole_ratio(m))
            if border is not None:
                assert touches_border(m, band) is border


def test_generator_paper_band_at_512():
    rng = np.random.default_rng(11)
    for b, border in ((5, False), (0, True), (3, False)):
        m = generate_mask(512, rng, bin_index=b, border=border)
        assert ratio_bin(hole_ratio(m)) == b
        assert touches_border(m) is border


def test_generator_is_reproducible_and_seed_dependent():
    a = generate_mask(128, np.random.default_rng(5), bin_index=2)
    b = generate_mask(128, np.random.default_rng(5), bin_index=2)
    c = generate_mask(128, np.random.default_rng(6), bin_index=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_generator_without_bin_covers_bins():
    rng = np.random.default_rng(9)
    bins = {ratio_bin(hole_ratio(generate_mask(96, rng))) for _ in range(30)}
    assert -1 not in bins and len(bins) >= 4


def test_generator_errors(monkeypatch):
    with pytest.raises(ValueError, match="bin_index"):
        generate_mask(64, np.random.default_rng(0), bin_index=6)
    with pytest.raises(ValueError, match="border=False"):
        generate_mask(128, np.random.default_rng(0), bin_index=5, border=False)  # 28x28 px inner box
    monkeypatch.setattr(masks, "_MAX_CANDIDATES", 1)
    with pytest.raises(RuntimeError, match=r"bin 5 \(0.5, 0.6\]"):
        generate_mask(64, np.random.default_rng(0), bin_index=5)


# ------------------------------------------------------------------------------------ augment / resize


def test_augment_mask_stays_binary_and_sized():
    rng = np.random.default_rng(4)
    src = generate_mask(200, rng, bin_index=2)
    outs = [augment_mask(src, rng, out_size=96) for _ in range(6)]
    for out in outs:
        assert out.dtype == np.uint8 and out.shape == (96, 96)
        assert set(np.unique(out).tolist()) <= {0, 1}
        assert 0 < hole_ratio(out) < 1
    assert len({out.tobytes() for out in outs}) == len(outs)  # random each time
    same = [augment_mask(src, np.random.default_rng(1), 96) for _ in range(2)]
    assert np.array_equal(*same)


def test_augment_mask_adds_no_holes_to_a_full_mask():
    full = np.ones((128, 128), dtype=np.uint8)
    rng = np.random.default_rng(2)
    for _ in range(5):
        assert augment_mask(full, rng, 64).min() == 1  # rotation fills corners as valid


def test_augment_mask_varies_and_keeps_a_hole():
    """A single 10x20 hole survives every augmentation (it sits well inside any 75 % crop), in varied shapes."""
    m = np.ones((256, 256), dtype=np.uint8)
    m[123:133, 118:138] = 0
    seen = set()
    for seed in range(30):
        out = augment_mask(m, np.random.default_rng(seed), 256)
        seen.add(out.tobytes())
        assert (out == 0).sum() > 0, seed
    assert len(seen) == 30


def _pil_max_filter(hole: np.ndarray, k: int) -> np.ndarray:
    """Oracle: the former PIL dilation of a bool hole map (0/255 image, MaxFilter(2k+1))."""
    img = Image.fromarray(hole.astype(np.uint8) * 255)
    if k > 0:
        img = img.filter(ImageFilter.MaxFilter(2 * k + 1))
    return np.asarray(img) >= 128


def _augment_mask_pil_oracle(mask: np.ndarray, rng: np.random.Generator, out_size: int) -> np.ndarray:
    """Verbatim copy of augment_mask before the numpy dilation (PIL MaxFilter), kept as the oracle."""
    m = masks._check_binary_2d(mask, "augment_mask")
    hole = Image.fromarray((~m).astype(np.uint8) * 255)
    h, w = m.shape
    k_max = max(1, min(h, w) // 128)
    k = int(rng.integers(0, k_max + 1))
    if k > 0:
        hole = hole.filter(ImageFilter.MaxFilter(2 * k + 1))
    angle = float(rng.uniform(0.0, 360.0))
    hole = hole.rotate(angle, resample=Image.Resampling.NEAREST, expand=False, fillcolor=0)
    if rng.random() < 0.5:
        hole = hole.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        hole = hole.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    arr = np.asarray(hole) >= 128
    side = max(1, int(round(rng.uniform(0.75, 1.0) * min(h, w))))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = arr[top:top + side, left:left + side]
    return resize_nearest((~crop).astype(np.uint8), out_size)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 3), (20, 20), (33, 47), (128, 96)])
def test_dilate_holes_matches_pil_max_filter(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    n = max(shape)
    # k = 0, small k (shifted-OR path), k > 16 (cumulative-sum path), k near and beyond the image size
    ks = sorted({0, 1, 2, 3, 4, 7, 17, max(n - 2, 0), max(n - 1, 0), n, n + 3})
    for density in (0.002, 0.03, 0.3):
        hole = rng.random(shape) < density
        hole[rng.integers(shape[0]), rng.integers(shape[1])] = True  # at least one hole
        for k in ks:
            got = dilate_holes(hole, k)
            assert got.dtype == bool and got.shape == hole.shape
            assert np.array_equal(got, _pil_max_filter(hole, k)), (shape, density, k)
    for k in (0, 3, 20):  # no holes stays no holes (out-of-image pixels never add holes)
        assert not dilate_holes(np.zeros(shape, dtype=bool), k).any()
    edge = np.zeros(shape, dtype=bool)
    edge[0, 0] = True
    for k in (1, 5):
        assert np.array_equal(dilate_holes(edge, k), _pil_max_filter(edge, k))


def test_augment_mask_unchanged_versus_pil_oracle():
    """Seeded outputs (and the RNG stream left behind) equal those of the former PIL-based implementation."""
    cases = [(64, 64), (130, 130), (257, 300), (512, 512)]  # k_max = 1, 1, 2, 4
    for h, w in cases:
        src = generate_mask(min(h, w), np.random.default_rng(h + w), bin_index=3)
        src = resize_nearest(src, (h, w))
        for seed in range(12 if h < 512 else 6):
            rng_new, rng_old = np.random.default_rng(seed), np.random.default_rng(seed)
            for out_size in (48, 256):
                new = augment_mask(src, rng_new, out_size)
                old = _augment_mask_pil_oracle(src, rng_old, out_size)
                assert new.dtype == old.dtype and np.array_equal(new, old), (h, w, seed, out_size)
            assert rng_new.integers(1 << 62) == rng_old.integers(1 << 62)


def test_resize_nearest_matches_torch_nearest_exact_and_stays_binary():
    m = generate_mask(100, np.random.default_rng(8), bin_index=3)
    for size in (37, 100, 256, (64, 150)):
        out = resize_nearest(m, size)
        h, w = (size, size) if isinstance(size, int) else size
        assert out.shape == (h, w) and out.dtype == np.uint8
        assert set(np.unique(out).tolist()) <= {0, 1}
        # oracle: torch's "nearest-exact" (pixel-centre sampling, the same convention)
        ref = F.interpolate(torch.from_numpy(m)[None, None].float(), size=(h, w), mode="nearest-exact")
        assert np.array_equal(out, ref[0, 0].numpy().astype(np.uint8)), size
    assert np.array_equal(resize_nearest(m, 200), np.repeat(np.repeat(m, 2, axis=0), 2, axis=1))
