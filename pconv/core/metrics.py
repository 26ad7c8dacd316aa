"""Image-quality metrics of the paper's evaluation (Liu et al., ECCV 2018, Sec. 4.1 / Table 1).

``l1_percent``, ``psnr`` and ``ssim`` take either a torch batch ``N x C x H x W`` (returning a tensor of N
per-image values) or a numpy image ``H x W x C`` / ``H x W`` (returning a float; a numpy ``N x H x W x C``
batch returns an array of N). Images are in [0, 1]; nothing is clamped - callers clamp outputs first.

SSIM is the Gaussian-window SSIM of Wang et al. (2004): 11 x 11 window, sigma 1.5, K1 = 0.01, K2 = 0.03,
population covariances, computed per channel on the "valid" region (the 5-px border, where the window
would leave the image, is excluded) and averaged over channels. This equals
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
channel_axis=-1, data_range=1.0)``.

:class:`BinnedMetrics` aggregates per-image values by hole-ratio bin (``pconv.core.masks.HOLE_RATIO_BINS``)
and border flag (whether the mask's holes touch the 50-px border band), as in the paper's Table 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from pconv.core.masks import HOLE_RATIO_BINS, bin_label

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11  # 2 * int(3.5 * sigma + 0.5) + 1, scikit-image's Gaussian truncation at 3.5 sigma
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _to_batch(pred: Any, gt: Any) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Both inputs as float64-or-float32 ``N x C x H x W`` tensors, and how to return the result."""
    if isinstance(pred, torch.Tensor) != isinstance(gt, torch.Tensor):
        raise TypeError("pred and gt must both be torch tensors or both numpy arrays")
    if isinstance(pred, torch.Tensor):
        if pred.shape != gt.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")
        if pred.dim() == 4:
            return pred, gt, "torch"
        if pred.dim() == 3:
            return pred.unsqueeze(0), gt.unsqueeze(0), "torch_scalar"
        raise ValueError(f"torch images must be N x C x H x W or C x H x W, got {tuple(pred.shape)}")
    p, g = np.asarray(pred), np.asarray(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ in shape")
    if p.ndim == 2:
        p, g, kind = p[None, :, :, None], g[None, :, :, None], "numpy_scalar"
    elif p.ndim == 3:
        p, g, kind = p[None], g[None], "numpy_scalar"
    elif p.ndim == 4:
        kind = "numpy"
    else:
        raise ValueError(f"numpy images must be H x W, H x W x C or N x H x W x C, got {p.shape}")
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).permute(0, 3, 1, 2)
    return to_t(p), to_t(g), kind


def _finish(values: torch.Tensor, kind: str) -> Any:
    if kind == "torch":
        return values
    if kind == "torch_scalar":
        return values[0]
    if kind == "numpy":
        return values.detach().cpu().numpy().astype(np.float64)
    return float(values[0])


def l1_percent(pred: Any, gt: Any) -> Any:
    """Mean absolute error x 100 per image (the paper's "L1 (%)")."""
    p, g, kind = _to_batch(pred, gt)
    values = (p.double() - g.double()).abs().flatten(1).mean(dim=1) * 100.0
    return _finish(values, kind)


def psnr(pred: Any, gt: Any, data_range: float = 1.0) -> Any:
    """Peak signal-to-noise ratio in dB per image: ``10 log10(data_range^2 / MSE)`` (inf when identical)."""
    p, g, kind = _to_batch(pred, gt)
    mse = (p.double() - g.double()).pow(2).flatten(1).mean(dim=1)
    values = 10.0 * torch.log10(data_range**2 / mse)
    return _finish(values, kind)


# ITU-R BT.601 luma as the SR literature computes it (MATLAB ``rgb2ycbcr``): Y = 16 + 65.481 R + 128.553 G + 24.966 B
# for R, G, B in [0, 1], in 8-bit units; :func:`rgb_to_y` returns Y / 255 (range [16, 235] / 255).
BT601_Y_OFFSET = 16.0
BT601_Y_WEIGHTS = (65.481, 128.553, 24.966)


def rgb_to_y(image: Any) -> Any:
    """BT.601 luma of RGB images in [0, 1], in [0, 1]: torch ``N x 3 x H x W`` / ``3 x H x W`` -> one channel
    (``N x 1 x H x W`` / ``1 x H x W``); numpy ``H x W x 3`` / ``N x H x W x 3`` -> ``... x 1`` (float64)."""
    wr, wg, wb = BT601_Y_WEIGHTS
    if isinstance(image, torch.Tensor):
        if image.dim() not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"rgb_to_y needs 3 x H x W or N x 3 x H x W, got {tuple(image.shape)}")
        r, g, b = image.double().unbind(dim=-3)
        return ((BT601_Y_OFFSET + wr * r + wg * g + wb * b) / 255.0).unsqueeze(-3)
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"rgb_to_y needs H x W x 3 or N x H x W x 3, got {arr.shape}")
    return ((BT601_Y_OFFSET + arr @ np.array(BT601_Y_WEIGHTS)) / 255.0)[..., None]


def _gaussian_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    radius = SSIM_WINDOW // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return (k / k.sum()).to(device=device, dtype=dtype)


def ssim(pred: Any, gt: Any, data_range: float = 1.0) -> Any:
    """Gaussian-window SSIM per image, averaged over channels (see the module docstring)."""
    p, g, kind = _to_batch(pred, gt)
    n, c, h, w = p.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW}, got {h} x {w}")
    # fp64 on CPU (exact oracle agreement); fp32 on accelerators, which is ample for a 1e-4 agreement.
    dtype = torch.float64 if p.device.type == "cpu" else torch.float32
    x = p.to(dtype).reshape(n * c, 1, h, w)
    y = g.to(dtype).reshape(n * c, 1, h, w)
    k = _gaussian_kernel(p.device, dtype)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=0)
    # Separable Gaussian filter without padding: exactly the region scikit-image keeps after cropping.
    filt = F.conv2d(F.conv2d(stack, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    ux, uy, uxx, uyy, uxy = filt.chunk(5, dim=0)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    values = s_map.reshape(n, c, -1).mean(dim=2).mean(dim=1).double()
    return _finish(values, kind)


# ------------------------------------------------------------------------------------------- aggregation

METRIC_NAMES = ("l1", "psnr", "ssim")


@dataclass
class _Cell:
    count: int = 0
    sums: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in METRIC_NAMES})


def _floats(values: Any) -> list[float]:
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.detach().cpu().reshape(-1).tolist()]
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


class BinnedMetrics:
    """Per-image L1 (%), PSNR, SSIM aggregated by (hole-ratio bin, border flag), as in Table 1.

    ``bin_index`` is 0..5 (``pconv.core.masks.ratio_bin``) or -1 for masks outside (0.01, 0.6]; ``border_flag``
    is True when the mask's holes touch the border band (``pconv.core.masks.touches_border``).
    """

    def __init__(self) -> None:
        self._cells: dict[tuple[int, bool], _Cell] = {}

    def add(self, bin_index: int, border_flag: bool, l1: float, psnr: float, ssim: float) -> None:
        """Record one image."""
        b = int(bin_index)
        if not -1 <= b < len(HOLE_RATIO_BINS):
            raise ValueError(f"bin_index must be -1..{len(HOLE_RATIO_BINS) - 1}, got {bin_index}")
        cell = self._cells.setdefault((b, bool(border_flag)), _Cell())
        cell.count += 1
        for name, value in zip(METRIC_NAMES, (l1, psnr, ssim)):
            cell.sums[name] += float(value)

    def add_batch(self, bin_indices: Any, border_flags: Any, l1: Any, psnr: Any, ssim: Any) -> None:
        """Record a batch: sequences / arrays / tensors of equal length."""
        cols = [_floats(bin_indices), _floats(border_flags), _floats(l1), _floats(psnr), _floats(ssim)]
        if len({len(col) for col in cols}) != 1:
            raise ValueError(f"add_batch: lengths differ {[len(col) for col in cols]}")
        for b, f, a, p, s in zip(*cols):
            self.add(int(b), bool(f), a, p, s)

    @property
    def count(self) -> int:
        return sum(cell.count for cell in self._cells.values())

    def _row(self, bin_index: int, border: bool | None, cells: Iterable[_Cell]) -> dict[str, Any]:
        cells = list(cells)
        n = sum(c.count for c in cells)
        row: dict[str, Any] = {
            "bin": bin_index,
            "hole_ratio": bin_label(bin_index) if bin_index is not None else "all",
            "border": border,
            "count": n,
        }
        for name in METRIC_NAMES:
            row[name] = sum(c.sums[name] for c in cells) / n if n else math.nan
        return row

    def table(self, include_empty: bool = True) -> list[dict[str, Any]]:
        """Rows for each bin x border flag (bins in order, border False then True), then "other" if used.

        Each row: ``bin``, ``hole_ratio`` (label), ``border``, ``count`` and the means ``l1``, ``psnr``,
        ``ssim`` (NaN for an empty cell).
        """
        rows = []
        for b in list(range(len(HOLE_RATIO_BINS))) + [-1]:
            for border in (False, True):
                cell = self._cells.get((b, border))
                if cell is None and (b == -1 or not include_empty):
                    continue
                rows.append(self._row(b, border, [cell] if cell else []))
        return rows

    def overall(self) -> dict[str, Any]:
        """Means over every recorded image."""
        return self._row(None, None, self._cells.values())  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary: ``{"rows": table(include_empty=False), "overall": overall()}``."""
        return {"rows": self.table(include_empty=False), "overall": self.overall()}

    def to_markdown(self) -> str:
        """Markdown table of the non-empty cells plus an "all" row."""
        lines = [
            "| hole ratio | holes touch border | images | L1 (%) | PSNR (dB) | SSIM |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for row in self.table(include_empty=False) + [self.overall()]:
            border = "-" if row["border"] is None else ("yes" if row["border"] else "no")
            if row["count"]:
                vals = f"{row['l1']:.2f} | {row['psnr']:.2f} | {row['ssim']:.4f}"
            else:
                vals = "- | - | -"
            lines.append(f"| {row['hole_ratio']} | {border} | {row['count']} | {vals} |")
        return "\n".join(lines)
