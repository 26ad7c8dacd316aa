"""Irregular hole masks: ratios and bins, file polarity (and its sanity check), generator and the paper's
training augmentation.

In memory a mask is ``uint8`` (or float) ``H x W`` with **1 = valid, 0 = hole** (PConv's M). Files on disk
carry an explicit polarity: readers take ``hole_color`` ("white" or "black") and never guess. Masks are
only ever resized with nearest neighbour, so they stay binary.

Paper facts (Liu et al., ECCV 2018, Sec. 4.1 and Table 1): test masks are grouped into six hole-to-image
area ratio bins (0.01, 0.1], (0.1, 0.2], ..., (0.5, 0.6], each with and without holes close to the image
border, "close" meaning within 50 pixels of the border of a 512 x 512 image. Training masks get random
dilation, rotation and cropping.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

#: Hole-to-image area ratio bins (lo, hi] of the paper's evaluation (Sec. 4.1, Table 1).
HOLE_RATIO_BINS: tuple[tuple[float, float], ...] = ((0.01, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5),
                                                     (0.5, 0.6))
#: Width in pixels of the border band of the paper's border constraint (Sec. 4.1; 512 x 512 images).
BORDER_BAND = 50

#: Above this hole ratio a mask lies beyond every paper bin (the last bin ends at 0.6, Sec. 4.1): see polarity_warning.
POLARITY_SUSPECT_RATIO = HOLE_RATIO_BINS[-1][1]

HOLE_COLORS = ("white", "black")  # the colour that marks HOLES in a mask file: its polarity, stated, never guessed
WHITE, BLACK = HOLE_COLORS
NVIDIA_HOLE_COLOR = WHITE  # NVIDIA's irregular mask sets (the paper's test masks): white = hole
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # every mask file suffix the project reads

# Generator limits: candidate shapes per attempt and attempts before giving up on a bin.
_MAX_CANDIDATES = 600
_MAX_ATTEMPTS = 8


def bin_label(bin_index: int) -> str:
    """Human-readable label of a bin, e.g. ``"(0.01, 0.1]"``; ``"other"`` for -1."""
    if bin_index == -1:
        return "other"
    lo, hi = HOLE_RATIO_BINS[bin_index]
    return f"({lo:g}, {hi:g}]"


def _holes(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    return ~m if m.dtype == bool else m < 0.5


def hole_ratio(mask: np.ndarray) -> float:
    """Fraction of hole pixels (value 0 / below 0.5) of a mask with 1 = valid."""
    m = np.asarray(mask)
    if m.size == 0:
        raise ValueError("hole_ratio of an empty mask")
    return float(_holes(m).mean())


def ratio_bin(ratio: float) -> int:
    """Index 0..5 of the paper's bin holding ``ratio`` (bins are (lo, hi]); -1 outside (0.01, 0.6]."""
    for i, (lo, hi) in enumerate(HOLE_RATIO_BINS):
        if lo < ratio <= hi:
            return i
    return -1


def touches_border(mask: np.ndarray, band: int = BORDER_BAND) -> bool:
    """True if any hole pixel lies within ``band`` pixels of the image border (row/col < band or >= size-band)."""
    h = _holes(mask)
    if h.ndim != 2:
        raise ValueError(f"touches_border expects an H x W mask, got shape {h.shape}")
    if band <= 0:
        return False
    return bool(h[:band].any() or h[-band:].any() or h[:, :band].any() or h[:, -band:].any())


# --------------------------------------------------------------------------------------------- file formats
def decode_mask(data: bytes, hole_color: str, threshold: float = 0.5, name: str = "") -> np.ndarray:
    """Decode a PNG/JPEG mask file into ``uint8 H x W`` {0, 1}, 1 = valid, oriented as the user sees it.

    EXIF orientation is applied first, as for photos (:func:`pconv.core.images.open_image`), so the holes land where
    they are displayed. The image is converted to grey; a pixel is "white" when ``value / max >= threshold``.
    With ``hole_color="white"`` white pixels are holes (NVIDIA's test masks), with ``"black"`` black pixels are.
    Transparency: when alpha is the ONLY signal (one colour everywhere, alpha varying) the alpha channel is the
    mask, transparent (``alpha / 255 < threshold``) = hole and opaque = valid whatever ``hole_color`` says (an
    eraser's and the image-edit APIs' convention); otherwise alpha is ignored and the colours carry the polarity.
    Raises ValueError (naming ``name``) for an unknown ``hole_color``, a bad threshold, unreadable bytes or more
    pixels than Pillow's decompression-bomb limit.
    """
    if hole_color not in HOLE_COLORS:
        raise ValueError(f"hole_color must be one of {list(HOLE_COLORS)}, got {hole_color!r} (mask {name!r})")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r} (mask {name!r})")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            grey = np.asarray(img, dtype=np.float64) / 65535.0
        else:
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = np.asarray(img.convert("RGBA"))
                alpha, colour = rgba[..., 3], rgba[..., :3]
                if alpha.size and alpha.min() != alpha.max() and (colour == colour[:1, :1]).all():
                    return (alpha.astype(np.float64) / 255.0 >= threshold).astype(np.uint8)
                img = Image.fromarray(colour)  # colours carry the polarity: alpha ignored
            grey = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    except Image.DecompressionBombError as exc:
        raise ValueError(f"mask {name!r}: refused, too many pixels ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot decode mask {name!r}: {exc}") from exc
    if grey.ndim != 2 or grey.size == 0:
        raise ValueError(f"mask {name!r} decoded to an unusable array of shape {grey.shape}")
    white = grey >= threshold
    hole = white if hole_color == WHITE else ~white
    return (~hole).astype(np.uint8)


def polarity_warning(hole_ratios: "np.ndarray | list[float] | float") -> str | None:
    """Text saying the mask polarity is probably inverted, or None. Works for a set of masks or a single one.

    A mask with more than :data:`POLARITY_SUSPECT_RATIO` holes lies beyond every paper bin; one such mask, or a
    set in which most masks are, almost always means holes and valid pixels were swapped (the wrong hole colour).
    """
    r = np.atleast_1d(np.asarray(hole_ratios, dtype=np.float64)).ravel()
    high = r > POLARITY_SUSPECT_RATIO
    limit = f"{POLARITY_SUSPECT_RATIO:.0%}"
    advice = "the polarity is probably inverted (holes and valid pixels swapped): check the hole colour"
    if r.size == 1 and high[0]:
        return f"the mask is {r[0]:.1%} holes, more than {limit} (beyond every paper bin): {advice}"
    if r.size > 1 and high.mean() > 0.5:
        return (f"{int(high.sum())} of {r.size} masks ({high.mean():.0%}) are more than {limit} holes, beyond every "
                f"paper bin (median hole ratio {np.median(r):.1%}): {advice}")
    return None


def _check_binary_2d(mask: np.ndarray, what: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{what}: expected an H x W mask, got shape {m.shape}")
    if m.dtype.kind in "ui" and m.size:  # integers: a range check is enough (and 20x faster than isin)
        binary = int(m.max()) <= 1 and (m.dtype.kind == "u" or int(m.min()) >= 0)
    else:
        binary = m.dtype == bool or bool(np.isin(m, (0, 1)).all())
    if not binary:
        raise ValueError(f"{what}: mask must be binary {{0, 1}}, got values {np.unique(m)[:8].tolist()}")
    return m.astype(bool)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Compact 1-bit PNG of a binary mask in the INTERNAL polarity (white/1 = valid, black/0 = hole)."""
    m = _check_binary_2d(mask, "encode_mask_png")
    buf = io.BytesIO()
    Image.fromarray(m).save(buf, format="PNG", optimize=True)  # a bool array becomes a mode "1" image
    return buf.getvalue()


def decode_stored_mask(data: bytes, name: str = "") -> np.ndarray:
    """Inverse of :func:`encode_mask_png`: ``uint8 H x W`` {0, 1}, 1 = valid (white).

    Stored masks are 1-bit images, read directly (the training hot path: one per image); anything else, and
    every error, goes through :func:`decode_mask` with ``hole_color="black"``."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.mode == "1":
            img.load()
            bits = np.asarray(img)  # bool, True = white = valid (!= 0 also covers a Pillow giving 0/255)
            if bits.ndim == 2 and bits.size:
                return (bits != 0).astype(np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        pass  # decode_mask raises the error naming the mask
    return decode_mask(data, hole_color=BLACK, threshold=0.5, name=name)


# ------------------------------------------------------------------------------------------------ resizing
def resize_nearest(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``H x W`` mask to ``size`` (int = square, or (height, width)).

    Sampling uses pixel centres (source index ``floor((i + 0.5) * in / out)``); values are copied, never
    interpolated, so a binary mask stays binary and keeps its dtype.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"resize_nearest expects an H x W mask, got shape {m.shape}")
    out_h, out_w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"resize_nearest: bad target size {size!r}")
    in_h, in_w = m.shape
    rows = np.minimum(((np.arange(out_h) + 0.5) * in_h / out_h).astype(np.int64), in_h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * in_w / out_w).astype(np.int64), in_w - 1)
    return m.take(rows, axis=0).take(cols, axis=1)  # one axis at a time: 3x faster than m[rows[:, None], cols]


# ----------------------------------------------------------------------------------------------- generator
def _draw_stroke(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, scale: float,
                 start: tuple[float, float] | None) -> None:
    """A free-form stroke: random-walk polyline of varying width with round joints (circles)."""
    side = min(w, h)
    x, y = start if start is not None else (rng.uniform(0, w), rng.uniform(0, h))
    angle = rng.uniform(0, 2 * math.pi)
    width = max(2.0, rng.uniform(0.015, 0.06) * side * scale)
    pts = [(x, y)]
    for _ in range(int(rng.integers(2, 9))):
        angle += rng.uniform(-0.6 * math.pi, 0.6 * math.pi)
        step = rng.uniform(0.04, 0.16) * side * max(scale, 0.25)
        x, y = x + step * math.cos(angle), y + step * math.sin(angle)
        pts.append((x, y))
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        width = float(np.clip(width * rng.uniform(0.8, 1.25), 2.0, max(2.0, 0.08 * side * scale)))
        r = width / 2.0
        draw.line([(x0, y0), (x1, y1)], fill=1, width=int(round(width)))
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=1)
        draw.ellipse([x1 - r, y1 - r, x1 + r, y1 + r], fill=1)


def _draw_ellipse(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, scale: float,
                  start: tuple[float, float] | None) -> None:
    """A rotated filled ellipse (as a 32-gon)."""
    side = min(w, h)
    cx, cy = start if start is not None else (rng.uniform(0, w), rng.uniform(0, h))
    a = max(1.5, rng.uniform(0.02, 0.12) * side * scale)
    b = max(1.5, a * rng.uniform(0.3, 1.0))
    rot = rng.uniform(0, math.pi)
    t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
    xs = cx + a * np.cos(t) * math.cos(rot) - b * np.sin(t) * math.sin(rot)
    ys = cy + a * np.cos(t) * math.sin(rot) + b * np.sin(t) * math.cos(rot)
    draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=1)


def _band_point(rng: np.random.Generator, size: int, band: int) -> tuple[float, float]:
    """A random point inside the border band of a size x size image."""
    b = min(band, size)
    edge = int(rng.integers(4))
    along = rng.uniform(0, size)
    across = rng.uniform(0, b)
    return ((along, across), (along, size - 1 - across), (across, along), (size - 1 - across, along))[edge]


def _try_generate(size: int, rng: np.random.Generator, lo: float, hi: float, border: bool | None,
                  band: int) -> np.ndarray | None:
    """One attempt: add shapes until the hole ratio reaches a target in (lo, hi], rejecting overshoots."""
    total = float(size * size)
    offset = band if border is False else 0
    canvas_side = size - 2 * offset
    target = rng.uniform(lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo))
    img = Image.new("L", (canvas_side, canvas_side), 0)  # 1 = hole while drawing
    holes = 0
    scale = 1.0
    rejected_in_row = 0
    for _ in range(_MAX_CANDIDATES):
        if holes / total > lo and holes / total >= target:
            break
        need_band = border is True and holes == 0
        start = _band_point(rng, size, band) if need_band else None
        cand = img.copy()
        draw = ImageDraw.Draw(cand)
        if rng.random() < 0.75:
            _draw_stroke(draw, rng, canvas_side, canvas_side, scale, start)
        else:
            _draw_ellipse(draw, rng, canvas_side, canvas_side, scale, start)
        cand_holes = int(np.count_nonzero(np.asarray(cand)))
        if cand_holes / total > hi:  # overshoot: reject, and after repeated rejections draw smaller shapes
            rejected_in_row += 1
            if rejected_in_row >= 3:
                scale = max(scale * 0.6, 0.02)
                rejected_in_row = 0
            continue
        rejected_in_row = 0
        img, holes = cand, cand_holes
    ratio = holes / total
    if not lo < ratio <= hi:
        return None
    hole_map = np.zeros((size, size), dtype=bool)
    hole_map[offset:offset + canvas_side, offset:offset + canvas_side] = np.asarray(img) > 0
    mask = (~hole_map).astype(np.uint8)
    if border is True and not touches_border(mask, band):
        return None
    return mask


def generate_mask(size: int, rng: np.random.Generator, bin_index: int | None = None,
                  border: bool | None = None, *, band: int = BORDER_BAND) -> np.ndarray:
    """Random irregular mask ``uint8 size x size`` {0, 1}, 1 = valid: free-form strokes plus ellipses.

    Everything random comes from ``rng``, so the same seed gives the same mask. ``bin_index`` (0..5) asks for
    a hole ratio inside ``HOLE_RATIO_BINS[bin_index]``; ``None`` picks a bin uniformly at random from ``rng``.
    ``border=True``: at least one hole pixel lies within ``band`` px of the border; ``border=False``: none
    does (shapes are drawn inside the inner box); ``None``: no constraint. Shapes that would overshoot the
    bin are rejected (and later shapes drawn smaller); after bounded attempts RuntimeError names the bin.
    ``band`` defaults to the paper's 50 px (defined for 512 x 512 images).
    """
    if size <= 0:
        raise ValueError(f"generate_mask: size must be positive, got {size}")
    if bin_index is None:
        bin_index = int(rng.integers(len(HOLE_RATIO_BINS)))
    if not 0 <= bin_index < len(HOLE_RATIO_BINS):
        raise ValueError(f"bin_index must be in 0..{len(HOLE_RATIO_BINS) - 1} or None, got {bin_index}")
    lo, hi = HOLE_RATIO_BINS[bin_index]
    if border is not None and band <= 0:
        raise ValueError(f"generate_mask: band must be positive with a border constraint, got {band}")
    if border is False:
        inner = max(size - 2 * band, 0)
        if (inner / size) ** 2 <= lo + 0.25 * (hi - lo):
            raise ValueError(f"bin {bin_index} {bin_label(bin_index)} cannot be reached with border=False: a "
                             f"{size}-px image with a {band}-px band leaves only {inner}x{inner} px for holes")
    for _ in range(_MAX_ATTEMPTS):
        mask = _try_generate(size, rng, lo, hi, border, band)
        if mask is not None:
            return mask
    raise RuntimeError(f"generate_mask could not reach bin {bin_index} {bin_label(bin_index)} (size {size}, "
                       f"border={border}) in {_MAX_ATTEMPTS} attempts")


# ---------------------------------------------------------------------------------------------- augmentation
def _max_filter_1d(a: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Running OR of a bool array over a window of ``2k+1`` along ``axis``; pixels outside the array count
    as False (for a max filter this equals PIL's edge replication)."""
    n = a.shape[axis]
    k = min(k, n - 1)
    if k <= 0:
        return a.copy()
    if k <= 16:  # O(k) vectorised shifted ORs, slicing along ``axis`` in place (keeps memory order)
        def sl(start, stop):
            return (slice(None),) * axis + (slice(start, stop),)
        out = a.copy()
        for s in range(1, k + 1):
            out[sl(s, None)] |= a[sl(None, -s)]
            out[sl(None, -s)] |= a[sl(s, None)]
        return out
    # large k: window sums from a cumulative sum, O(1) per pixel
    a = np.moveaxis(a, axis, 0)
    c = np.zeros((n + 1,) + a.shape[1:], dtype=np.int64)
    np.cumsum(a, axis=0, out=c[1:])
    idx = np.arange(n)
    out = (c[np.minimum(idx + k + 1, n)] - c[np.maximum(idx - k, 0)]) > 0
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def dilate_holes(hole: np.ndarray, k: int) -> np.ndarray:
    """Square ``(2k+1) x (2k+1)`` max filter of a bool ``H x W`` hole map (True = hole).

    Bit-for-bit equal to PIL's ``ImageFilter.MaxFilter(2k+1)`` on the 0/255 image: separable (rows, then
    columns), and out-of-image pixels never add holes. ``k = 0`` returns a copy.
    """
    h = np.asarray(hole, dtype=bool)
    if h.ndim != 2:
        raise ValueError(f"dilate_holes expects an H x W map, got shape {h.shape}")
    if k < 0:
        raise ValueError(f"dilate_holes: k must be >= 0, got {k}")
    return _max_filter_1d(_max_filter_1d(h, k, 1), k, 0)


def augment_mask(mask: np.ndarray, rng: np.random.Generator, out_size: int) -> np.ndarray:
    """The paper's training-mask augmentation (Sec. 4.1): random dilation, rotation, flips, translation/crop.

    Steps: dilate the holes by 0..k px (k = max(1, min(H, W) // 128)), rotate by a random angle (nearest,
    corners filled as valid), flip horizontally/vertically with p = 0.5 each, crop a random square of
    75-100 % of the short side at a random offset (translation), and resize it to ``out_size`` with
    nearest neighbour. Returns ``uint8 out_size x out_size`` {0, 1}, 1 = valid.
    """
    m = _check_binary_2d(mask, "augment_mask")
    h, w = m.shape
    k_max = max(1, min(h, w) // 128)
    k = int(rng.integers(0, k_max + 1))
    hole_map = dilate_holes(~m, k) if k > 0 else ~m
    hole = Image.fromarray(hole_map.astype(np.uint8) * 255)  # 255 = hole while transforming
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
