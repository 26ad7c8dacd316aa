"""Super-resolution as inpainting: the paper's grid of known pixels (one concern: where LR pixels go).

Liu et al., ECCV 2018, Sec. 5 ("Extension to Image Super Resolution"): the low-resolution image is placed on a
K-times larger canvas by *offsetting* its pixels and inserting holes between them: the LR pixel at (x, y) goes to
(K*x + floor(K/2), K*y + floor(K/2)) on the high-resolution canvas; every other canvas pixel is a hole. The PConv
U-Net then fills the holes exactly as it fills irregular holes. The offset is counted from the corner of the net's
input: a training crop's corner, and at inference the canvas's (padding and tiles keep it: ``grid=K`` of
:func:`pconv.inference.inpaint.raw_output`).

Where a downsampler centres an LR pixel: Pillow's resize (box, bicubic; as MATLAB's ``imresize``) puts LR pixel x
at the centre of its K x K block, HR coordinate K*x + K/2 - 0.5 in pixel indices. For odd K that IS
K*x + floor(K/2). For even K (the K = 2 and 4 supported here) it is not: the block centre lies between pixels, and
the grid position K*x + K/2 is half an HR pixel right of it and half a pixel below. What that implies:

- an LR value placed (or pasted back) at the grid is an anti-aliased block average centred half a pixel up and left
  of where it sits, not the HR pixel there. A composite that keeps the LR pixels is capped by them even when every
  hole is perfect: PSNR-Y 35.9 dB at x2 (29-44 dB per photo) and 39.6 dB at x4 on the 68 CBSD68 photos' 256 px
  centre crops (docs/variants.md), and pasting them into bicubic's output costs it 0.57 dB at x2 (0.01 at x4);
- the net learns to undo this shift from training, where the grid is the same: so training, validation, inference
  and evaluation must all use this one grid and offset (and it cannot change without retraining);
- this is why the SR evaluation scores both the raw output and the composite with the LR pixels pasted, for the
  model and for bicubic alike (docs/variants.md, "Super-resolution protocol").

Masks here follow the project's contract: float, 1 = valid (an LR pixel), 0 = hole. Core module: no Ray, no MLflow;
and no torch at import, only in the functions that make or take tensors: the data pipeline's decode workers use the
grid (:func:`grid_mask`) without importing torch (~1.9 CPU-s and a few hundred MB per worker process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: The upscaling factors the pipeline supports (the paper reports K = 4; K = 2 is its easier sibling).
SR_SCALES: tuple[int, ...] = (2, 4)


def check_scale(scale: int) -> int:
    """``scale`` as an int, or a ValueError that names the supported factors."""
    if isinstance(scale, bool) or int(scale) != scale or int(scale) not in SR_SCALES:
        raise ValueError(f"super-resolution scale {scale!r} is not supported: use one of {list(SR_SCALES)}")
    return int(scale)


def grid_offset(scale: int) -> int:
    """The paper's offset of an LR pixel inside its K x K block: floor(K / 2) (Sec. 5). Not the block's centre for
    even K (K/2 - 0.5, see the module doc)."""
    return check_scale(scale) // 2


def sr_grid(height: int, width: int, scale: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``1 x 1 x height x width`` float mask of the grid: 1 where an LR pixel lands, 0 elsewhere.

    ``height`` and ``width`` are the HR canvas size and must be multiples of ``scale`` (so the grid holds exactly
    ``(height // scale) * (width // scale)`` valid pixels, one per LR pixel).
    """
    import torch

    k = _canvas_scale(height, width, scale)
    mask = torch.zeros(1, 1, height, width, device=device)  # made on the device: no host copy per training batch
    off = grid_offset(k)
    mask[..., off::k, off::k] = 1.0
    return mask


def grid_mask(height: int, width: int, scale: int) -> np.ndarray:
    """:func:`sr_grid` as a ``height x width`` uint8 numpy array, for the data pipeline's workers (no torch)."""
    k = _canvas_scale(height, width, scale)
    mask = np.zeros((height, width), dtype=np.uint8)
    off = grid_offset(k)
    mask[off::k, off::k] = 1
    return mask


def _canvas_scale(height: int, width: int, scale: int) -> int:
    """``scale`` checked (:func:`check_scale`), and an HR canvas of ``height x width`` checked to be a positive
    multiple of it."""
    k = check_scale(scale)
    if height % k or width % k or height <= 0 or width <= 0:
        raise ValueError(f"an SR canvas of {height}x{width} is not a positive multiple of the scale {k}")
    return k


def place_on_grid(lr: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put an ``N x C x h x w`` LR batch on the HR canvas: ``(canvas N x C x hK x wK, mask N x 1 x hK x wK)``.

    The canvas holds the LR values at the grid positions and 0 in the holes (PConv ignores hole values).
    """
    if lr.dim() != 4:
        raise ValueError(f"expected an N x C x h x w batch, got shape {tuple(lr.shape)}")
    k = check_scale(scale)
    n, c, h, w = lr.shape
    mask = sr_grid(h * k, w * k, k, device=lr.device).to(lr.dtype).expand(n, 1, h * k, w * k).contiguous()
    canvas = lr.new_zeros(n, c, h * k, w * k)
    off = k // 2
    canvas[..., off::k, off::k] = lr
    return canvas, mask


def take_from_grid(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The inverse of :func:`place_on_grid` for the values: the ``N x C x H/K x W/K`` pixels at the grid."""
    k = check_scale(scale)
    if hr.shape[-1] % k or hr.shape[-2] % k:
        raise ValueError(f"an SR canvas of {hr.shape[-2]}x{hr.shape[-1]} is not a multiple of the scale {k}")
    off = k // 2
    return hr[..., off::k, off::k]


def paste_on_grid(hr: torch.Tensor, lr: torch.Tensor, scale: int) -> torch.Tensor:
    """A copy of ``hr`` (``... x C x hK x wK``) with the LR pixels ``lr`` (``... x C x h x w``, same dtype) at their
    grid positions: the one paste of the SR protocol, for the model's output (what super-resolution returns) and for
    any baseline's alike."""
    k = check_scale(scale)
    if hr.shape[:-2] != lr.shape[:-2] or hr.shape[-2] != lr.shape[-2] * k or hr.shape[-1] != lr.shape[-1] * k:
        raise ValueError(f"cannot paste an LR image of shape {tuple(lr.shape)} on an HR image of shape "
                         f"{tuple(hr.shape)} at scale {k}")
    out = hr.clone()
    off = k // 2
    out[..., off::k, off::k] = lr.to(hr.dtype)
    return out
