"""Inference with a trained PConv U-Net: inpaint images of any size, and the image / mask files at the edges.

Inpainting (:func:`inpaint`) returns the composite ``mask * image + (1 - mask) * output``: valid pixels are the
input's, bit for bit. Sizes that are not a multiple of ``2**layer_size`` are padded by REFLECTION (image and mask
alike, so the padded border looks like real context rather than a band of holes, which would enlarge the
hole the net has to explain) and cropped back; images larger than ``max_side`` are processed in overlapping
tiles blended with linear ramps, skipping tiles without holes. A super-resolution canvas is padded with holes instead,
keeping its grid of known pixels (:func:`raw_output`, ``grid``).

Files (:func:`pair_files`, :func:`inpaint_job`, :func:`inpaint_files`): single files or folders (local or s3://)
of images and masks paired by relative path without suffix (the one pairing rule for files, also used by
:mod:`pconv.inference.batch`); masks state their polarity (``hole_color``) and become 1 = valid here, with a warning when
the hole ratio says the polarity is probably inverted. Outputs are written losslessly (PNG, lossless WebP, TIFF,
BMP) so valid pixels stay exact on disk too; JPEG only when asked for (``allow_lossy``). In a folder, a pair that
cannot be read is skipped, counted and listed; it never stops the others. Models come from
:func:`pconv.tracking.loading.load_model` (any model URI).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pconv.storage import uris
from pconv.core.images import IMAGE_SUFFIXES, open_image
from pconv.core.config import INPAINTING_TASK
from pconv.tracking.loading import load_model, resolve_device
from pconv.core.masks import MASK_SUFFIXES, decode_mask, polarity_warning

log = logging.getLogger(__name__)

DEFAULT_MAX_SIDE = 2048
DEFAULT_TILE_OVERLAP = 128
LOSSLESS_SUFFIXES = (".png", ".webp", ".tif", ".tiff", ".bmp")  # written bit-exact (WebP in lossless mode)
LOSSY_SUFFIXES = (".jpg", ".jpeg")  # re-encoding changes valid pixels: only with allow_lossy


# ---------------------------------------------------------------------------------------------
# Inpainting
# ---------------------------------------------------------------------------------------------
def net_multiple(model: torch.nn.Module) -> int:
    """Spatial multiple the U-Net needs (2**layer_size), looking through DDP / torch.compile wrappers."""
    net: Any = model
    while getattr(net, "layer_size", None) is None:
        inner = getattr(net, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(net, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            raise ValueError("cannot tell the model's layer_size; pass multiple= explicitly")
        net = inner
    return 2 ** int(net.layer_size)


def _pad_to_multiple(x: torch.Tensor, multiple: int,
                     grid: int | None = None) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad ``x`` (the known image and the mask, stacked) to a multiple of ``multiple``: by reflection, about half
    on each side (``grid`` None), or for an SR canvas (``grid`` = K) with zeros = HOLES and a left / top pad that is a
    multiple of K, so the known pixels keep their positions mod K and none is invented. Returns the pad (left,
    right, top, bottom)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if grid is None:
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # left, right, top, bottom
    else:
        left, top = (pw // 2) // grid * grid, (ph // 2) // grid * grid
        pad = (left, pw - left, top, ph - top)
    if not any(pad):
        return x, pad
    if grid is not None:
        return torch.nn.functional.pad(x, pad, mode="constant", value=0.0), pad
    mode = "reflect" if max(pad[0], pad[1]) < w and max(pad[2], pad[3]) < h else "replicate"
    return torch.nn.functional.pad(x, pad, mode=mode), pad


@torch.no_grad()
def _forward(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, multiple: int,
             grid: int | None = None) -> torch.Tensor:
    """Raw network output for N×3×H×W / N×1×H×W at any H, W (pad, run, crop)."""
    h, w = image.shape[-2:]
    # Holes are zeroed with where(), not multiplied: whatever the input holds there (even NaN) cannot leak.
    known = torch.where(mask >= 0.5, image, torch.zeros((), dtype=image.dtype, device=image.device))
    both, pad = _pad_to_multiple(torch.cat([known, mask], dim=1), multiple, grid)
    out, _ = model(both[:, :3], both[:, 3:])
    return out[..., pad[2]:pad[2] + h, pad[0]:pad[0] + w].float()


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    r = torch.ones(length)
    if overlap > 0:
        edge = torch.linspace(1.0 / (overlap + 1), 1.0, overlap)
        if not at_start:
            r[:overlap] = edge
        if not at_end:
            r[-overlap:] = edge.flip(0)
    return r


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


@torch.no_grad()
def _forward_tiled(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, multiple: int, tile: int,
                   overlap: int, grid: int | None = None) -> torch.Tensor:
    """Overlapping tiles (each padded as needed), blended with linear ramps; tiles without holes are skipped. Tiles
    start at multiples of ``tile - overlap`` and at ``length - tile``: with ``grid`` K, all multiples of K (the
    caller's tile, overlap and sizes are)."""
    _, _, h, w = image.shape
    out = torch.zeros_like(image, dtype=torch.float32)
    weight = torch.zeros((1, 1, h, w), dtype=torch.float32, device=image.device)
    from tqdm import tqdm

    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    bar = tqdm(total=len(ys) * len(xs), desc="tiles", unit="tile", disable=None, leave=False,
               dynamic_ncols=True)  # a large image's tiles (super-resolution canvases): on stderr, off without a TTY
    for y in ys:
        for x in xs:
            bar.update()
            th, tw = min(tile, h - y), min(tile, w - x)
            m = mask[..., y:y + th, x:x + tw]
            if bool((m >= 0.5).all()):
                continue
            o = _forward(model, image[..., y:y + th, x:x + tw], m, multiple, grid)
            wy = _ramp(th, min(overlap, th), y == ys[0], y == ys[-1]).to(image.device)
            wx = _ramp(tw, min(overlap, tw), x == xs[0], x == xs[-1]).to(image.device)
            wt = (wy[:, None] * wx[None, :])[None, None]
            out[..., y:y + th, x:x + tw] += o * wt
            weight[..., y:y + th, x:x + tw] += wt
    bar.close()
    return out / weight.clamp_min(1e-8)


def _as_batch(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(image N×3×H×W float, valid N×1×H×W bool, whether image was 3×H×W)``; ValueError on shapes that differ."""
    squeeze = image.dim() == 3
    img = image.unsqueeze(0) if squeeze else image
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"image must be 3×H×W or N×3×H×W, got {tuple(image.shape)}")
    msk = mask
    while msk.dim() < 4:
        msk = msk.unsqueeze(0)
    if msk.shape[1] != 1 or msk.shape[-2:] != img.shape[-2:] or msk.shape[0] not in (1, img.shape[0]):
        raise ValueError(f"mask {tuple(mask.shape)} does not match image {tuple(image.shape)} "
                         "(expected N×1×H×W with the image's H and W)")
    return img.float(), msk.expand(img.shape[0], 1, *img.shape[-2:]) >= 0.5, squeeze


@torch.no_grad()
def raw_output(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor,
               device: str | torch.device | None = None, multiple: int | None = None,
               max_side: int = DEFAULT_MAX_SIDE, tile_overlap: int = DEFAULT_TILE_OVERLAP, batch_size: int = 8,
               grid: int | None = None) -> torch.Tensor:
    """The network's raw output (the paper's I_out, clamped to [0, 1]) for ``image`` with holes where ``mask`` is 0,
    at any size: float32, on the input's device, shaped as ``image`` (arguments as :func:`inpaint`, which composites
    it). Inputs are padded to the net's multiple and cut into overlapping tiles above ``max_side``.

    ``grid``: None for inpainting (padding by reflection, see the module doc). For a super-resolution canvas, whose
    known pixels lie on the period-K grid of :mod:`pconv.core.sr_grid`, ``grid=K``: H and W must be multiples of K,
    the padding is HOLES (image and mask 0) with a multiple of K on the left and top, and tiles start at multiples of
    K. So every known pixel of every net input sits where training put it (``K//2`` mod K in both axes) and no
    padded pixel is marked known: a reflected canvas would move or mirror the grid (issue 25).
    """
    img, valid, squeeze = _as_batch(image, mask)
    if grid is not None and (grid < 1 or img.shape[-2] % grid or img.shape[-1] % grid):
        raise ValueError(f"a {img.shape[-2]}x{img.shape[-1]} canvas is not a multiple of its grid {grid}")
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    multiple = multiple or net_multiple(model)
    unit = math.lcm(multiple, grid or 1)  # tile sizes and overlaps in units of both: tile origins stay on the grid
    tile = max(unit, (max_side // unit) * unit)
    overlap = min(tile // 2, max(unit, (tile_overlap // unit) * unit)) if tile_overlap > 0 else 0
    overlap -= overlap % (grid or 1)  # tile // 2 may not be: then the step tile - overlap would leave the grid

    outputs = []
    for i in range(0, img.shape[0], batch_size):
        x, m = img[i:i + batch_size].to(dev), valid[i:i + batch_size].to(dev).float()
        if max(x.shape[-2:]) > max_side:
            o = torch.cat([_forward_tiled(model, x[j:j + 1], m[j:j + 1], multiple, tile, overlap, grid)
                           for j in range(x.shape[0])])
        else:
            o = _forward(model, x, m, multiple, grid)
        outputs.append(o.clamp(0, 1).to(img.device))
    out = torch.cat(outputs)
    return out[0] if squeeze else out


@torch.no_grad()
def inpaint(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, device: str | torch.device | None = None,
            multiple: int | None = None, max_side: int = DEFAULT_MAX_SIDE,
            tile_overlap: int = DEFAULT_TILE_OVERLAP, batch_size: int = 8) -> torch.Tensor:
    """Fill the holes of ``image`` (3×H×W or N×3×H×W, [0, 1]) where ``mask`` (H×W, 1×H×W or N×1×H×W; 1 = valid,
    binarised at 0.5) is 0. Returns the composite on the input's device, float32, same shape as ``image``:
    valid pixels are exactly the input's, holes come from the network (clamped to [0, 1]; :func:`raw_output`).
    """
    img, valid, squeeze = _as_batch(image, mask)
    out = raw_output(model, img, valid.float(), device=device, multiple=multiple, max_side=max_side,
                     tile_overlap=tile_overlap, batch_size=batch_size)
    comp = torch.where(valid, img, out)
    return comp[0] if squeeze else comp


# ---------------------------------------------------------------------------------------------
# Files and folders
# ---------------------------------------------------------------------------------------------
def read_image(uri: str) -> torch.Tensor:
    """An image file (local or s3) as float32 3×H×W in [0, 1] (EXIF orientation applied; any mode -> RGB)."""
    arr = np.asarray(open_image(uris.read_bytes(uri), name=uri), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def read_mask(uri: str, hole_color: str, threshold: float = 0.5) -> torch.Tensor:
    """A mask file in the stated polarity as float32 1×H×W, 1 = valid (ValueError naming a file with too many
    pixels: Pillow's decompression-bomb limit)."""
    from PIL import Image

    try:
        return torch.from_numpy(decode_mask(uris.read_bytes(uri), hole_color, threshold, name=uri)).float()[None]
    except Image.DecompressionBombError as exc:
        raise ValueError(f"mask {uri}: refused, too many pixels ({exc})") from None


def output_suffix(out: str, allow_lossy: bool = False) -> str:
    """The format suffix ``out`` is written with (no suffix: PNG). A lossy one (JPEG) is refused unless
    ``allow_lossy`` (then a warning: valid pixels will not be exact); an unknown one is refused."""
    suffix = Path(out).suffix.lower() or ".png"
    if suffix in LOSSY_SUFFIXES:
        if not allow_lossy:
            raise ValueError(f"--out {out}: JPEG re-encodes the result lossily, so valid pixels would NOT be kept "
                             f"exactly; write {', '.join(LOSSLESS_SUFFIXES)} instead, or pass --allow-lossy")
        log.warning("%s: JPEG output is lossy: valid pixels will differ from the input (--allow-lossy)", out)
    elif suffix not in LOSSLESS_SUFFIXES:
        raise ValueError(f"--out {out}: unknown output format {suffix!r}; use one of "
                         f"{', '.join(LOSSLESS_SUFFIXES + LOSSY_SUFFIXES)}")
    return suffix


def encode_image(image: torch.Tensor, suffix: str = ".png") -> bytes:
    """3×H×W float in [0, 1] -> encoded bytes, rounded to 8 bit: PNG, lossless WebP, TIFF (deflate) or BMP, all
    bit-exact; JPEG (quality 95, lossy) for .jpg/.jpeg. ValueError for any other suffix."""
    from PIL import Image

    arr = (image.detach().cpu().clamp(0, 1).numpy().transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
    options: dict[str, dict[str, Any]] = {
        ".png": {"format": "PNG"}, ".webp": {"format": "WEBP", "lossless": True, "exact": True},
        ".tif": {"format": "TIFF", "compression": "tiff_deflate"}, ".bmp": {"format": "BMP"},
        ".jpg": {"format": "JPEG", "quality": 95}}
    key = {".tiff": ".tif", ".jpeg": ".jpg"}.get(suffix.lower(), suffix.lower())
    if key not in options:
        raise ValueError(f"cannot write images as {suffix!r}; use one of "
                         f"{', '.join(LOSSLESS_SUFFIXES + LOSSY_SUFFIXES)}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, **options[key])
    return buf.getvalue()


def _is_dir(uri: str) -> bool:
    if uris.is_remote(uri):
        return uri.endswith("/") or (not Path(uri).suffix and bool(uris.list_files(uri)))
    return Path(uri).expanduser().is_dir()


def _stem_map(files: list[str], base: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    base = base.rstrip("/")
    for f in files:
        rel = f[len(base):].lstrip("/") if f.startswith(base) else Path(f).name
        stem = str(Path(rel).with_suffix(""))
        if stem in out:
            raise ValueError(f"{what}: two files share the stem {stem!r}: {out[stem]} and {f}")
        out[stem] = f
    return out


@dataclass
class Job:
    """One (image, mask, output) triple."""

    image: str
    mask: str
    out: str


def pair_files(image_uri: str, mask_uri: str, out_uri: str) -> list[Job]:
    """Single files, or folders paired by relative path without suffix; unmatched files are an error."""
    if not _is_dir(image_uri):
        if _is_dir(mask_uri):
            raise ValueError(f"--image {image_uri} is a file but --mask {mask_uri} is a folder; give both as "
                             "files or both as folders")
        out = out_uri
        if _is_dir(out_uri) or out_uri.endswith("/"):
            out = uris.join(out_uri, Path(image_uri).stem + ".png")
        return [Job(image_uri, mask_uri, out)]
    if not _is_dir(mask_uri):
        raise ValueError(f"--image {image_uri} is a folder, so --mask must be a folder too (got {mask_uri})")
    images = _stem_map(uris.list_files(image_uri, IMAGE_SUFFIXES), image_uri, "images")
    masks = _stem_map(uris.list_files(mask_uri, MASK_SUFFIXES), mask_uri, "masks")
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {image_uri}")
    no_mask, no_image = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(f"{len(no_mask)} image(s) without a mask: {', '.join(no_mask[:10])}")
        if no_image:
            parts.append(f"{len(no_image)} mask(s) without an image: {', '.join(no_image[:10])}")
        raise ValueError(f"cannot pair {image_uri} with {mask_uri} by file name: " + "; ".join(parts))
    return [Job(images[s], masks[s], uris.join(out_uri, s + ".png")) for s in sorted(images)]


def inpaint_job(model: torch.nn.Module, job: Job, hole_color: str, threshold: float = 0.5,
                device: str | torch.device | None = None, max_side: int = DEFAULT_MAX_SIDE) -> dict[str, Any]:
    """Read, inpaint, write one triple; returns a summary row (sizes, hole ratio, ``warning``: the polarity
    warning of :func:`pconv.core.masks.polarity_warning` when the mask is mostly holes, else None)."""
    image = read_image(job.image)
    mask = read_mask(job.mask, hole_color, threshold)
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask {job.mask} is {mask.shape[-1]}x{mask.shape[-2]} but image {job.image} is "
                         f"{image.shape[-1]}x{image.shape[-2]} (width x height); masks must match their image")
    ratio = float((mask < 0.5).float().mean())
    warning = polarity_warning([ratio])
    if warning:
        log.warning("%s (--hole-color %s): %s", job.mask, hole_color, warning)
    comp = inpaint(model, image, mask, device=device, max_side=max_side)
    if not uris.is_remote(job.out):
        Path(job.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    uris.write_bytes_atomic(job.out, encode_image(comp, Path(job.out).suffix or ".png"))
    return {"image": job.image, "mask": job.mask, "out": job.out, "height": int(image.shape[-2]),
            "width": int(image.shape[-1]), "hole_ratio": ratio, "warning": warning}


def inpaint_files(model_uri: str, image: str, mask: str, out: str, hole_color: str, threshold: float = 0.5,
                  device: str = "auto", max_side: int = DEFAULT_MAX_SIDE, tracking_uri: str | None = None,
                  allow_lossy: bool = False) -> list[dict[str, Any]]:
    """What ``pipelines/inpaint.py`` does: load the model once, then inpaint each paired file.

    One pair (single files): its errors propagate. Folders: a pair that fails (unreadable file, size mismatch,
    too many pixels) is skipped with a row ``{"image", "mask", "out", "error"}`` and the others go on."""
    jobs = pair_files(image, mask, out)  # pairing and output-format errors before the (slow) model load
    for job in jobs:
        output_suffix(job.out, allow_lossy)
    model, info = load_model(model_uri, device=resolve_device(device), tracking_uri=tracking_uri,
                             task=INPAINTING_TASK)  # an SR model here is refused with a clear message
    log.info("loaded %s (%s, layer_size %d, trained at %d px)", model_uri, info.kind, info.layer_size,
             info.image_size)
    if len(jobs) == 1 and not _is_dir(image):
        return [inpaint_job(model, jobs[0], hole_color, threshold, max_side=max_side)]
    from tqdm import tqdm

    rows = []
    for job in tqdm(jobs, desc="inpaint", unit="image", disable=None, dynamic_ncols=True):  # stderr; off if no TTY
        try:
            rows.append(inpaint_job(model, job, hole_color, threshold, max_side=max_side))
        except (ValueError, OSError) as exc:  # one bad pair never stops the folder: skipped, counted, listed
            log.warning("skipped %s: %s", job.image, exc)
            rows.append({"image": job.image, "mask": job.mask, "out": job.out, "error": str(exc)})
    return rows


__all__ = ["DEFAULT_MAX_SIDE", "LOSSLESS_SUFFIXES", "LOSSY_SUFFIXES", "Job", "encode_image", "inpaint",
           "inpaint_files", "inpaint_job", "net_multiple", "output_suffix", "pair_files", "raw_output", "read_image",
           "read_mask"]
