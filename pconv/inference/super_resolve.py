"""Super-resolution with a PConv U-Net trained for it (``task: sr``): LR image -> K-times larger HR image.

The paper's Sec. 5 ("Extension to Image Super Resolution") recasts SR as inpainting: the LR pixels are placed on
the K-times larger canvas at their grid positions (:mod:`pconv.core.sr_grid`, offset floor(K/2)), every other canvas
pixel is a hole, and the net fills the holes. The result is the COMPOSITE: the net's output in the holes and the LR
pixels, bit for bit, at their grid positions (``take_from_grid(out, K) == lr``; the paste of
:func:`pconv.core.sr_grid.paste_on_grid`, which the SR protocol of docs/variants.md applies to every method);
``paste=False`` gives the raw output. Any input size works: the canvas goes through
:func:`pconv.inference.inpaint.raw_output` with ``grid=K`` (padding to the net's multiple with holes, a multiple of K
on the left and top; tiles above ``max_side`` starting at multiples of K), so every net input holds the LR pixels
where training put them.

Size limit (the same rule as inpainting's inputs): an output with more pixels than Pillow's decompression-bomb
limit (``PIL.Image.MAX_IMAGE_PIXELS``; an inpainting input that large is refused the same way) is refused before
any work, naming the file. Models load through :func:`pconv.tracking.loading.load_model` with ``task="sr"``, so an
inpainting model (and a scale that disagrees with the model's ``sr_scale``) is a clear error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pconv.storage import uris
from pconv.inference.inpaint import DEFAULT_MAX_SIDE, encode_image, output_suffix, raw_output, read_image
from pconv.core.config import SR_TASK
from pconv.tracking.loading import ModelInfo, load_model, resolve_device
from pconv.core.sr_grid import check_scale, paste_on_grid, place_on_grid

log = logging.getLogger(__name__)


def max_output_pixels() -> int:
    """The largest HR output accepted: Pillow's decompression-bomb limit, read at call time (as inpainting's)."""
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 2**62)


def check_size(width: int, height: int, scale: int, name: str = "image", limit: int | None = None) -> None:
    """ValueError naming ``name`` when the ``scale``-times larger output of a ``width x height`` LR image has more
    than ``limit`` pixels (default :func:`max_output_pixels`)."""
    limit = max_output_pixels() if limit is None else int(limit)
    out = width * height * scale * scale
    if out > limit:
        raise ValueError(f"{name}: {width}x{height} at scale {scale} gives a {width * scale}x{height * scale} output "
                         f"= {out:,} pixels, above the limit of {limit:,}; crop the LR image into parts first")


def resolve_scale(info: ModelInfo, scale: int | None) -> int:
    """The scale to run an SR model at: the model's ``sr_scale`` when ``scale`` is None; ValueError when a given
    ``scale`` is unsupported or disagrees with the model (its grid spacing is fixed by training)."""
    if scale is not None:
        scale = check_scale(scale)
    if info.sr_scale is None:
        if scale is None:
            raise ValueError(f"{info.uri}: its config has no sr_scale; pass --scale")
        return scale
    have = check_scale(info.sr_scale)
    if scale is not None and scale != have:
        raise ValueError(f"--scale {scale} disagrees with the model {info.uri}, which was trained for "
                         f"scale {have} (sr_scale: {have}); drop --scale or use a x{scale} model")
    return have


def load_sr_model(uri: str, scale: int | None = None, device: str | torch.device = "cpu",
                  tracking_uri: str | None = None) -> tuple[torch.nn.Module, ModelInfo, int]:
    """``(model, info, scale)`` of an SR model; an inpainting model or a disagreeing ``scale`` is a ValueError."""
    if scale is not None:
        check_scale(scale)  # before the (slow) load
    model, info = load_model(uri, device=device, tracking_uri=tracking_uri, task=SR_TASK)
    return model, info, resolve_scale(info, scale)


def _as_batch(lr: Any) -> tuple[torch.Tensor, bool, str]:
    """``N x 3 x h x w`` float in [0, 1], whether the input was a single image, and its kind (uint8 / float /
    numpy)."""
    if isinstance(lr, np.ndarray):
        if lr.ndim != 3 or lr.shape[2] != 3 or lr.dtype != np.uint8:
            raise ValueError(f"a numpy LR image must be uint8 h x w x 3, got {lr.dtype} {lr.shape}")
        return torch.from_numpy(lr.transpose(2, 0, 1).copy())[None].float() / 255.0, True, "numpy"
    if not isinstance(lr, torch.Tensor) or lr.dim() not in (3, 4) or lr.shape[-3] != 3:
        raise ValueError(f"the LR image must be 3 x h x w or N x 3 x h x w, got {getattr(lr, 'shape', type(lr))}")
    single = lr.dim() == 3
    batch = lr[None] if single else lr
    if lr.dtype == torch.uint8:
        return batch.float() / 255.0, single, "uint8"
    return batch.float(), single, "float"


@torch.no_grad()
def super_resolve(model: torch.nn.Module, lr: Any, scale: int, device: str | torch.device | None = None,
                  max_side: int = DEFAULT_MAX_SIDE, batch_size: int = 8, paste: bool = True) -> Any:
    """The ``scale``-times larger image of ``lr``: a uint8 tensor / numpy ``h x w x 3`` array gives the same kind
    (uint8), a float tensor in [0, 1] gives float32. ``3 x h x w`` or ``N x 3 x h x w``.

    The net's output (clamped to [0, 1]) with, when ``paste`` (the default: what every use returns), the LR pixels
    kept exactly at their grid positions (``take_from_grid(out, scale) == lr``); ``paste=False``: the raw output,
    grid positions included (the SR evaluation scores both). Canvases larger than ``max_side`` are tiled.
    """
    k = check_scale(scale)
    x, single, kind = _as_batch(lr)
    canvas, mask = place_on_grid(x, k)
    hr = raw_output(model, canvas, mask, device=device, max_side=max_side, batch_size=batch_size, grid=k)
    if kind != "float":
        hr = (hr * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)
        x = (x * 255.0 + 0.5).to(torch.uint8)  # the LR bytes, exactly (no float round trip)
    if paste:
        hr = paste_on_grid(hr, x, k)
    if kind == "numpy":
        return hr[0].permute(1, 2, 0).numpy()
    return hr[0] if single else hr


def super_resolve_file(model_uri: str, image: str, out: str, scale: int | None = None, device: str = "auto",
                       max_side: int = DEFAULT_MAX_SIDE, tracking_uri: str | None = None,
                       allow_lossy: bool = False) -> dict[str, Any]:
    """What ``pipelines/super_resolve.py`` does: read the LR image (local or s3://), super-resolve, write ``out``.

    Checks come before the model load where they can: the scale, the output format, the input's readability and
    its size (with ``scale`` given; otherwise after the load, with the model's scale). Returns a summary row.
    """
    if scale is not None:
        check_scale(scale)
    suffix = output_suffix(out, allow_lossy)
    lr = read_image(image)  # a decompression bomb is a ValueError naming the file
    h, w = int(lr.shape[-2]), int(lr.shape[-1])
    if scale is not None:
        check_size(w, h, scale, image)
    model, info, k = load_sr_model(model_uri, scale, device=resolve_device(device), tracking_uri=tracking_uri)
    check_size(w, h, k, image)
    log.info("loaded %s (%s, x%d, layer_size %d)", model_uri, info.kind, k, info.layer_size)
    hr = super_resolve(model, lr, k, max_side=max_side)
    if not uris.is_remote(out):
        Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    uris.write_bytes_atomic(out, encode_image(hr, suffix))
    return {"image": image, "out": out, "scale": k, "width": w, "height": h, "out_width": w * k,
            "out_height": h * k, "model": model_uri}


__all__ = ["check_size", "load_sr_model", "max_output_pixels", "resolve_scale", "super_resolve",
           "super_resolve_file"]
