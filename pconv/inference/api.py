"""The Python API: a trained model as a callable on PIL images or numpy arrays, with the ecosystem's mask default.

    from pconv import Inpainter
    inpainter = Inpainter.from_uri("models:/pconv-unet@champion", device="auto")
    filled = inpainter(photo, mask)                     # PIL images or numpy arrays; mask: WHITE = hole
    filled = inpainter(photo, mask, hole_color="black")  # masks drawn the other way round

    from pconv import SuperResolver
    upscaled = SuperResolver.from_uri("models:/pconv-sr@champion")(small_photo)

Masks follow diffusers and LaMa: white (or True, or non-zero) marks the HOLES, unless ``hole_color="black"``; every
edge of pconv has the same default (CLI ``--hole-color``, HTTP and pyfunc ``hole_color``). A mask that is mostly
holes (beyond every bin of the paper) is probably inverted: it is inpainted with a warning, like at the HTTP edge.
Images of any size are padded, and tiled above ``max_side`` (:func:`pconv.inference.inpaint.inpaint`); the result
is a PIL RGB image of the input's size whose valid pixels are the input's.

``Inpainter.model`` is the bare network with the contract of ``pconv export`` (:mod:`pconv.inference.export`):
``model(image, mask) -> raw prediction`` on tensors, image holes zeroed, mask 1 = valid, sizes multiples of
``Inpainter.stride``.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps

from pconv.core.config import INPAINTING_TASK, SR_TASK
from pconv.core.masks import HOLE_COLORS, decode_mask, hole_ratio, polarity_warning
from pconv.inference.export import RawPrediction
from pconv.inference.inpaint import DEFAULT_MAX_SIDE, inpaint
from pconv.inference.super_resolve import resolve_scale, super_resolve
from pconv.tracking.loading import ModelInfo, load_model, resolve_device

log = logging.getLogger(__name__)

ImageLike = Union[Image.Image, np.ndarray]
DEFAULT_HOLE_COLOR = "white"  # diffusers' and LaMa's convention: white marks the holes


def _to_image_tensor(image: ImageLike, what: str = "image") -> torch.Tensor:
    """``3×H×W`` float32 in [0, 1] from a PIL image (EXIF orientation applied, any mode) or a numpy array
    (``H×W×3`` or ``H×W``; uint8 0..255, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        pixels = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.float32) / 255.0
    elif isinstance(image, np.ndarray):
        array = image[..., None].repeat(3, axis=-1) if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise ValueError(f"{what}: expected an H×W×3 (or H×W) array, got shape {image.shape}")
        array = array[..., :3]
        if array.dtype == np.uint8:
            pixels = array.astype(np.float32) / 255.0
        elif np.issubdtype(array.dtype, np.floating):
            if array.size and (np.nanmin(array) < 0.0 or np.nanmax(array) > 1.0 or not np.isfinite(array).all()):
                raise ValueError(f"{what}: a float array must hold values in [0, 1]")
            pixels = array.astype(np.float32)
        else:
            raise ValueError(f"{what}: expected uint8 or float values, got dtype {array.dtype}")
    else:
        raise TypeError(f"{what}: expected a PIL image or a numpy array, got {type(image).__name__}")
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _to_valid_mask(mask: ImageLike, hole_color: str, threshold: float) -> torch.Tensor:
    """``1×H×W`` float32, 1 = valid, from a mask image or array drawn with ``hole_color`` holes (the same decoding as
    mask files: :func:`pconv.core.masks.decode_mask`, incl. EXIF orientation and alpha-only masks)."""
    if hole_color not in HOLE_COLORS:
        raise ValueError(f"hole_color must be one of {list(HOLE_COLORS)}, got {hole_color!r}")
    if isinstance(mask, np.ndarray):
        array = mask[..., 0] if mask.ndim == 3 and mask.shape[-1] == 1 else mask
        if array.dtype == np.bool_:
            array = array.astype(np.uint8) * 255
        elif np.issubdtype(array.dtype, np.floating):
            if array.size and (np.nanmin(array) < 0.0 or np.nanmax(array) > 1.0 or not np.isfinite(array).all()):
                raise ValueError("mask: a float array must hold values in [0, 1]")
            array = np.round(array * 255.0).astype(np.uint8)
        elif array.dtype != np.uint8:
            raise ValueError(f"mask: expected a bool, uint8 or float array, got dtype {array.dtype}")
        if array.ndim not in (2, 3):
            raise ValueError(f"mask: expected an H×W (or H×W×C) array, got shape {mask.shape}")
        mask = Image.fromarray(array)
    elif not isinstance(mask, Image.Image):
        raise TypeError(f"mask: expected a PIL image or a numpy array, got {type(mask).__name__}")
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")  # lossless: the file path's decoding, one owner of the polarity rules
    valid = decode_mask(buffer.getvalue(), hole_color, threshold, name="mask")
    return torch.from_numpy(valid.astype(np.float32))[None]


def _to_pil(image: torch.Tensor) -> Image.Image:
    pixels = (image.clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


class Inpainter:
    """A trained inpainting net as a callable: ``inpainter(image, mask) -> PIL image`` (see the module docstring)."""

    def __init__(self, net: torch.nn.Module, info: ModelInfo, device: str | torch.device = "auto",
                 max_side: int = DEFAULT_MAX_SIDE) -> None:
        if info.task != INPAINTING_TASK:
            raise ValueError(f"{info.uri} is a {info.task} model: use SuperResolver for it")
        self.device = resolve_device(device)
        self.info = info
        self.max_side = max_side
        self._net = net.to(self.device).eval()

    @classmethod
    def from_uri(cls, uri: str, device: str | torch.device = "auto", tracking_uri: str | None = None,
                 max_side: int = DEFAULT_MAX_SIDE) -> "Inpainter":
        """Load ``uri``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, a checkpoint (folder or ``s3://``) or a
        local MLflow model folder; ``device`` auto = CUDA when available."""
        net, info = load_model(uri, device=resolve_device(device), tracking_uri=tracking_uri, task=INPAINTING_TASK)
        return cls(net, info, device, max_side)

    @property
    def model(self) -> torch.nn.Module:
        """The bare network (``pconv export``'s contract): ``model(image, mask) -> raw prediction``."""
        return RawPrediction(self._net).eval()

    @property
    def stride(self) -> int:
        """What the bare network's H and W must be multiples of (``2**layer_size``)."""
        return 2 ** self.info.layer_size

    def __call__(self, image: ImageLike, mask: ImageLike, *, hole_color: str = DEFAULT_HOLE_COLOR,
                 threshold: float = 0.5) -> Image.Image:
        """Fill the holes of ``image`` marked in ``mask`` (``hole_color`` pixels, white by default); returns a PIL
        RGB image of the input's size."""
        pixels = _to_image_tensor(image)
        valid = _to_valid_mask(mask, hole_color, threshold)
        if tuple(valid.shape[-2:]) != tuple(pixels.shape[-2:]):
            raise ValueError(f"mask is {valid.shape[-1]}×{valid.shape[-2]} but the image is "
                             f"{pixels.shape[-1]}×{pixels.shape[-2]} (width×height): they must match")
        warning = polarity_warning(hole_ratio(valid[0].numpy()))
        if warning:
            warnings.warn(f"{warning} (hole_color={hole_color!r})", UserWarning, stacklevel=2)
        return _to_pil(inpaint(self._net, pixels, valid, device=self.device, max_side=self.max_side))


class SuperResolver:
    """A trained super-resolution net (``task: sr``) as a callable: ``resolver(image) -> PIL image`` ``scale``
    times larger, every input pixel kept on the paper's grid (:mod:`pconv.inference.super_resolve`)."""

    def __init__(self, net: torch.nn.Module, info: ModelInfo, device: str | torch.device = "auto",
                 scale: int | None = None) -> None:
        if info.task != SR_TASK:
            raise ValueError(f"{info.uri} is an {info.task} model: use Inpainter for it")
        self.device = resolve_device(device)
        self.info = info
        self.scale = resolve_scale(info, scale)
        self._net = net.to(self.device).eval()

    @classmethod
    def from_uri(cls, uri: str, device: str | torch.device = "auto", tracking_uri: str | None = None,
                 scale: int | None = None) -> "SuperResolver":
        net, info = load_model(uri, device=resolve_device(device), tracking_uri=tracking_uri, task=SR_TASK)
        return cls(net, info, device, scale)

    @property
    def model(self) -> torch.nn.Module:
        """The bare network: ``model(lr_canvas, grid_mask) -> raw prediction`` (``pconv export``'s contract)."""
        return RawPrediction(self._net).eval()

    def __call__(self, image: ImageLike) -> Image.Image:
        lr = _to_image_tensor(image)
        return _to_pil(super_resolve(self._net, lr, self.scale, device=self.device))


__all__ = ["DEFAULT_HOLE_COLOR", "ImageLike", "Inpainter", "SuperResolver"]
