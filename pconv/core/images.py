"""Image files: the accepted suffixes, decoding (EXIF orientation, any mode -> RGB, decompression bombs refused),
and the one resize-and-crop rule shared by training crops, validation and evaluation.

Every reader of an image file or an image shard row goes through :func:`open_image`, and every square view of a
photo is cut by :func:`crop_resized` with ONE resampling filter (:data:`RESAMPLE`, bilinear), so the ``val/*``
metrics logged during training and the evaluation table measure the same pixels. No Ray, no MLflow.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Every image file suffix the project reads (ingest, inference, evaluation); anything else is skipped and counted.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# The one resampling filter for photos (training crops, validation, evaluation). Masks never go through it:
# they resize nearest-neighbour only (pconv.core.masks.resize_nearest).
RESAMPLE = Image.Resampling.BILINEAR
# Super-resolution's degradation (task sr, paper Sec. 5): the HR crop shrunk K times with Pillow's BICUBIC, which
# widens its kernel by K when shrinking (antialiased, as MATLAB's imresize: the SR literature's usual LR images).
# Not RESAMPLE: an LR image is a model INPUT whose statistics inference sees again (bicubic LR photos), not a view.
SR_RESAMPLE = Image.Resampling.BICUBIC


def open_image(data: bytes, draft_size: int | None = None, name: str = "") -> Image.Image:
    """See :func:`open_image_with_format`; returns only the image."""
    return open_image_with_format(data, draft_size, name)[0]


def open_image_with_format(data: bytes, draft_size: int | None = None, name: str = "") -> tuple[Image.Image, str]:
    """Decode encoded image bytes to an RGB PIL image with EXIF orientation applied.

    ``draft_size``: JPEG only, let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) as long as both sides stay
    >= draft_size — much cheaper when training at a fraction of the stored resolution. Any mode becomes RGB
    (16-bit greys are scaled, not clipped; alpha is dropped). Returns (image, lower-case format name such as
    "jpeg"). Raises ValueError naming ``name`` on bad input.
    """
    if not data:
        raise ValueError(f"{name or 'image'}: empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = (img.format or "unknown").lower()
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
        elif img.mode in ("I", "F"):
            arr = np.asarray(img, dtype=np.float64)
            hi = arr.max() if arr.size and arr.max() > 0 else 1.0
            img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8))
        if img.mode != "RGB":
            img = img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{name or 'image'}: refused, too many pixels ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ValueError(f"{name or 'image'}: not a readable image (unknown format or corrupt header)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        kind = "truncated image" if "truncated" in str(exc) else "cannot decode image"
        raise ValueError(f"{name or 'image'}: {kind} ({type(exc).__name__}: {exc})") from exc
    if img.width < 1 or img.height < 1:
        raise ValueError(f"{name or 'image'}: decoded to an empty image")
    return img, fmt


def crop_resized(img: Image.Image, size: int, pick: Callable[[int, int], tuple[int, int]]) -> Image.Image:
    """The ``size x size`` square at ``pick(nw, nh) -> (left, top)`` of the image resized so its short side is
    ``size`` — computed by resampling ONLY that square (``resize(box=...)``), not the whole resized image."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = pick(nw, nh)
    if (nw, nh) == (w, h):
        return img.crop((left, top, left + size, top + size))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), RESAMPLE, box=box)


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    """The centre view (training validation AND the evaluation protocol, so both measure the same pixels): short side -> ``size``, centre ``size x size`` crop. uint8 ``size x size x 3``."""
    return np.asarray(crop_resized(img, size, lambda nw, nh: ((nw - size) // 2, (nh - size) // 2)), dtype=np.uint8)


def downsample(pixels: np.ndarray, scale: int) -> np.ndarray:
    """SR's LR image: uint8 ``H x W x 3`` -> uint8 ``H/K x W/K x 3`` with :data:`SR_RESAMPLE` (sides multiples of K)."""
    h, w = pixels.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"a {h}x{w} image cannot be downsampled by {scale}: its sides are not multiples of it")
    return np.asarray(Image.fromarray(pixels).resize((w // scale, h // scale), SR_RESAMPLE), dtype=np.uint8)
