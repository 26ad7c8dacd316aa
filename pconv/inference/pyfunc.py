"""The byte-level inpainting contract (encoded image + mask files -> PNG of the composite), and the MLflow pyfunc
model that every registered version carries.

Contract (../shared/ARCHITECTURE.md, "Contracts"): a DataFrame with columns ``image`` and ``mask`` (the bytes of
encoded image files of any size; base64 strings when they arrive as JSON) and an optional ``hole_color``
(``white``, the default, or ``black``) -> a DataFrame with column ``image``: PNG bytes of the composite at the
input's size, valid pixels unchanged. A super-resolution model (``task: sr``) takes only column ``image`` (the LR
file) and returns column ``image``: PNG bytes of the K-times larger composite (:func:`decode_lr_request`,
:func:`pconv.inference.super_resolve.super_resolve`). The Ray Serve app (:mod:`pconv.inference.serve`) uses the same
decoding and checks (:func:`decode_request`), so both front doors refuse the same bad inputs with the same messages.

Why it lives in ``inference/`` and not ``tracking/``: answering a request calls the inpainting and super-resolution
code (:mod:`pconv.inference.inpaint`, :mod:`pconv.inference.super_resolve`), and ``tracking`` may not import
``inference`` (../shared/ARCHITECTURE.md). So :mod:`pconv.tracking.registry` only NAMES this module
(``registry.PYFUNC_LOADER``, the one place the string is written) and never imports it.

How MLflow finds it: the registry adds a ``python_function`` flavour with ``loader_module`` =
``pconv.inference.pyfunc`` and ``data`` = ``extra_files`` to each logged model, and ships the ``pconv`` package in
the model's ``code/`` folder. ``mlflow.pyfunc.load_model`` (MLflow 3.17) prepends ``code/`` to ``sys.path``, imports
the loader module and calls its ``_load_pyfunc`` (MLflow's fixed entry-point name) with the path of
``extra_files/`` (state dict + config): the net is rebuilt by :func:`pconv.tracking.loading.load_model`, no pickle
is run, and a consumer needs neither this repository nor ``pip install`` of it. Runs on the GPU when one is present.

Versions registered before the package layout name the old loader module ``pconv.pyfunc_model`` and ship the old
flat ``pconv`` package in their own ``code/``; in a fresh interpreter MLflow imports that code and they answer as
they did (tests/test_legacy_model.py). MLflow does not evict modules that are already imported, so in a process that
has imported this ``pconv`` the old loader module is not found (``ModuleNotFoundError: pconv.pyfunc_model``), and a
process that loaded an old version keeps the old ``pconv`` for good. Inside a pconv process, load any version, old or
new, with :func:`pconv.tracking.loading.load_model` (state dict + config only) and wrap it in :class:`PConvPyfunc`.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pconv.core.images import open_image
from pconv.inference.inpaint import encode_image, inpaint
from pconv.core.config import SR_TASK
from pconv.core.masks import HOLE_COLORS, decode_mask, polarity_warning
from pconv.inference.super_resolve import check_size, resolve_scale, super_resolve
from pconv.tracking.loading import ModelInfo, load_model

log = logging.getLogger(__name__)

DEFAULT_HOLE_COLOR = "white"  # NVIDIA's test masks: white = hole
DEFAULT_MAX_PIXELS = 16_000_000  # larger images are refused (413), not tiled for minutes
GREY_BAND = (0.1, 0.9)  # a mask pixel whose grey level (of the max) lies strictly inside this band is "grey"
MAX_GREY_FRACTION = 0.01  # up to 1 % grey pixels (JPEG ringing, anti-aliased edges) still counts as binary


class BadInput(ValueError):
    """A request the caller must fix; ``status`` is the HTTP code (400 missing/undecodable, 413 too large, 422
    unusable mask)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Decoded:
    """One decoded request: image float32 3×H×W in [0, 1] and mask float32 1×H×W (1 = valid)."""

    image: torch.Tensor
    mask: torch.Tensor
    warning: str | None = None  # masks.polarity_warning: the mask is probably inverted (logged, sent as a header)

    def pack(self) -> "PackedDecoded":
        """This request as uint8, a quarter of the bytes (the image's values are ``k / 255``, the mask's 0 or 1)."""
        return PackedDecoded((self.image * 255.0).round().to(torch.uint8), self.mask.to(torch.uint8), self.warning)


@dataclass
class PackedDecoded:
    """A :class:`Decoded` request as uint8 3×H×W image and 1×H×W mask: what the Serve ingress sends to a model
    replica (at 512 px 1 MB instead of 4 MB through the object store). :meth:`unpack` gives back the identical
    float32 tensors: ``k / 255`` computed in float32 as :func:`decode_request` does."""

    image: torch.Tensor
    mask: torch.Tensor
    warning: str | None = None

    def unpack(self) -> Decoded:
        return Decoded(self.image.float() / 255.0, self.mask.float(), self.warning)


def as_bytes(value: Any, field: str) -> bytes:
    """Raw bytes, or a base64 string (JSON) decoded; BadInput for anything else."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadInput(f"{field}: a string must be base64-encoded file bytes ({exc})") from exc
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise BadInput(f"missing {field}: send the encoded {field} file")
    raise BadInput(f"{field}: expected file bytes, got {type(value).__name__}")


def _size(data: bytes, field: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"{field}: not a readable image (unknown format or corrupt header)") from exc


def _check_binary(data: bytes) -> None:
    """Refuse a mask with more than MAX_GREY_FRACTION grey pixels: it is a photo or a soft matte, not a mask."""
    grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32)
    top = float(grey.max()) or 1.0
    lo, hi = GREY_BAND
    fraction = float(((grey > lo * top) & (grey < hi * top)).mean())
    if fraction > MAX_GREY_FRACTION:
        raise BadInput(f"mask is not binary: {fraction:.1%} of its pixels are grey (a mask is black and white; at "
                       f"most {MAX_GREY_FRACTION:.0%} grey pixels are tolerated)", status=422)


def decode_request(image: Any, mask: Any, hole_color: Any = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Check and decode one (image, mask, hole_color) request; BadInput names the problem.

    The mask must have the image's exact size (it is refused, not resized: a resized mask would move the holes the
    user drew); images above ``max_pixels`` are refused before they are decoded.
    """
    color = DEFAULT_HOLE_COLOR if hole_color is None or hole_color == "" or (
        isinstance(hole_color, float) and np.isnan(hole_color)) else str(hole_color).strip().lower()
    if color not in HOLE_COLORS:
        raise BadInput(f"hole_color must be one of {list(HOLE_COLORS)}, got {hole_color!r}")
    image_bytes, mask_bytes = as_bytes(image, "image"), as_bytes(mask, "mask")
    if not image_bytes:
        raise BadInput("image: empty file (0 bytes)")
    if not mask_bytes:
        raise BadInput("mask: empty file (0 bytes)")
    (w, h), _ = _size(image_bytes, "image"), _size(mask_bytes, "mask")
    if w * h > max_pixels:
        raise BadInput(f"image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}", status=413)
    try:
        img = open_image(image_bytes, name="image")
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    _check_binary(mask_bytes)
    try:
        valid = decode_mask(mask_bytes, color, name="mask")  # EXIF orientation applied, as for the image
    except ValueError as exc:
        raise BadInput(str(exc), status=422) from exc
    mh, mw = valid.shape
    if (mw, mh) != img.size:  # both compared after EXIF rotation, as the user sees them
        raise BadInput(f"mask is {mw}x{mh} but image is {img.width}x{img.height} (width x height); the mask must "
                       "have the image's size", status=422)
    warning = polarity_warning(float(1.0 - valid.mean()))
    if warning:
        log.warning("hole_color=%s: %s", color, warning)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return Decoded(torch.from_numpy(arr.transpose(2, 0, 1).copy()), torch.from_numpy(valid).float()[None], warning)


def decode_lr_request(image: Any, scale: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An SR request's LR image as float32 3×h×w in [0, 1]; BadInput (413) when its ``scale``-times larger output
    would have more than ``max_pixels`` pixels (checked on the header, before decoding)."""
    data = as_bytes(image, "image")
    if not data:
        raise BadInput("image: empty file (0 bytes)")
    w, h = _size(data, "image")
    try:
        check_size(w, h, scale, "image", limit=max_pixels)  # the file path's check, at the HTTP edge's limit
    except ValueError as exc:
        raise BadInput(str(exc), status=413) from None
    try:
        arr = np.asarray(open_image(data, name="image"), dtype=np.float32) / 255.0
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def inpaint_decoded(model: torch.nn.Module, items: list[Decoded]) -> list[torch.Tensor]:
    """Composites for several requests: requests of the same size run as one batch, others one by one."""
    out: list[torch.Tensor | None] = [None] * len(items)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(item.image.shape[-2:]), []).append(i)
    for idx in groups.values():
        comps = inpaint(model, torch.stack([items[i].image for i in idx]), torch.stack([items[i].mask for i in idx]))
        for i, comp in zip(idx, comps):
            out[i] = comp
    return out  # type: ignore[return-value]


class PConvPyfunc:
    """What ``mlflow.pyfunc.load_model(...)`` wraps: ``predict(DataFrame) -> DataFrame`` (see the module doc)."""

    def __init__(self, model: torch.nn.Module, info: ModelInfo, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.model, self.info, self.max_pixels = model, info, max_pixels

    def predict(self, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if self.info.task == SR_TASK:
            return pd.DataFrame({"image": self._super_resolve(df)})
        missing = [c for c in ("image", "mask") if c not in df.columns]
        if missing:
            raise BadInput(f"input is missing column(s) {missing}; expected image, mask and optional hole_color")
        colors = df["hole_color"] if "hole_color" in df.columns else [None] * len(df)
        items = [decode_request(i, m, c, self.max_pixels) for i, m, c in zip(df["image"], df["mask"], colors)]
        comps = inpaint_decoded(self.model, items)
        return pd.DataFrame({"image": [encode_image(c) for c in comps]})

    def _super_resolve(self, df) -> list[bytes]:
        k = resolve_scale(self.info, None)
        if "image" not in df.columns or ("mask" in df.columns and df["mask"].notna().any()):
            raise BadInput(f"this is a super-resolution model (x{k}): send only column image (the low-resolution "
                           "file), no mask")
        return [encode_image(super_resolve(self.model, decode_lr_request(i, k, self.max_pixels), k))
                for i in df["image"]]


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> PConvPyfunc:
    """MLflow's entry point (the name MLflow calls on a loader module): ``data_path`` is the logged model's
    ``extra_files/`` folder; ``model_config`` may set ``device`` (default ``auto``)."""
    device = (model_config or {}).get("device") or "auto"
    model, info = load_model(data_path, device=device)
    log.info("pyfunc: loaded %s on %s", data_path, next(model.parameters()).device)
    return PConvPyfunc(model, info)


__all__ = ["BadInput", "DEFAULT_HOLE_COLOR", "DEFAULT_MAX_PIXELS", "Decoded", "PConvPyfunc", "PackedDecoded",
           "decode_lr_request", "decode_request", "inpaint_decoded"]
