"""Partial convolution (Liu et al., "Image Inpainting for Irregular Holes Using Partial Convolutions", ECCV 2018).

Eq. 1 and 2 of the paper, for a window with features X, binary mask M, weights W and bias b::

    x' = W^T (X ⊙ M) · sum(1) / sum(M) + b    if sum(M) > 0,   else 0           (eq. 1)
    m' = 1                                    if sum(M) > 0,   else 0           (eq. 2)

sum(1) = C_in·kh·kw is the window size and sum(M) counts the valid entries of the window over every channel.
Zero padding applies to X and M alike, so the image border counts as hole.

Why this implementation is cheap: sum(M) depends only on the per-pixel number of valid channels, Σ_c M, so it is
one single-channel window sum (sum pooling, or a 1×1×kh×kw convolution of ones) under ``no_grad`` instead of the
C_out-channel convolution of ones that popular ports run (which doubles the layer's cost). The ratio sum(1)/sum(M) is computed in
fp32 (at least) with autocast disabled, because window sums up to C_in·k² are not exact in fp16/bf16. Nothing is
cached on the module between calls: the output depends only on the call's arguments.

:class:`MaskedInput` carries X⊙M together with Σ_c M (an N×1 "channel count" map). It lets a caller hand the
layer features that are already masked and, with :func:`cat_masked`, concatenate parts that have different
masks without materialising a C-channel mask: the count of a concatenation is the sum of the parts' counts,
each part weighted by its number of channels, which is exactly the multi-channel formulation of the paper.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskedInput", "PartialConv2d", "cat_masked"]


def _count_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for window sums and the ratio: fp32 at least (float64 stays float64), never fp16/bf16."""
    if dtype.is_floating_point:
        return torch.promote_types(dtype, torch.float32)
    return torch.float32


class MaskedInput(NamedTuple):
    """The two things eq. 1 needs from an input: ``values`` = X⊙M (N×C×H×W) and ``count`` = Σ_c M (N×1×H×W).

    ``count`` is float (fp32 or wider) and carries no gradient. For an N×1 mask shared by all C channels it is
    C·m; for an N×C mask it is the sum over channels.
    """

    values: Tensor
    count: Tensor

    @classmethod
    def from_mask(cls, x: Tensor, mask: Tensor, *, already_masked: bool = False) -> "MaskedInput":
        """Build from features ``x`` (N×C×H×W) and ``mask`` (N×1×H×W or N×C×H×W, 1 = valid, 0 = hole).

        With ``already_masked=True`` the caller guarantees ``x == x * mask`` (e.g. features that were multiplied
        by their mask when they were produced); the multiplication is then skipped, which is exact for a
        binary mask because (X⊙M)⊙M = X⊙M.
        """
        if x.dim() != 4:
            raise ValueError(f"features must be N×C×H×W, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        if mask.dim() != 4 or mask.shape[0] != n or tuple(mask.shape[2:]) != (h, w) or mask.shape[1] not in (1, c):
            raise ValueError(f"mask must be N×1×H×W or N×C×H×W matching features of shape {tuple(x.shape)} "
                             f"(N={n}, C={c}, H={h}, W={w}), got shape {tuple(mask.shape)}")
        mask = mask.detach()
        values = x if already_masked else x * mask.to(x.dtype)
        with torch.no_grad():
            m = mask.to(_count_dtype(mask.dtype))
            count = m * c if mask.shape[1] == 1 else m.sum(dim=1, keepdim=True)
        return cls(values, count)


def cat_masked(parts: Sequence[MaskedInput]) -> MaskedInput:
    """Concatenate masked inputs along channels: values are concatenated, channel counts add up.

    Equal to concatenating the features and their channel-expanded masks (the paper's multi-channel form),
    without materialising the C-channel mask.
    """
    if not parts:
        raise ValueError("cat_masked needs at least one part")
    values = torch.cat([p.values for p in parts], dim=1)
    count = parts[0].count
    for p in parts[1:]:
        count = count + p.count
    return MaskedInput(values, count)


class PartialConv2d(nn.Conv2d):
    """``nn.Conv2d`` that applies eq. 1–2: ``forward(x, mask) -> (out, new_mask)``.

    ``mask`` is N×1×H×W (the same mask for every input channel) or N×C_in×H×W, 1 = valid; ``new_mask`` is
    N×1×H'×W' (float, fp32 or the mask's wider float type). Only ``groups=1`` and zero padding are supported:
    the paper treats the border as hole, which is what zero padding of X and M gives.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if groups != 1:
            raise ValueError(f"PartialConv2d supports groups=1 only, got groups={groups}")
        if padding_mode != "zeros":
            raise ValueError(f"PartialConv2d needs padding_mode='zeros' (the border counts as hole, eq. 1), "
                             f"got {padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)

    @property
    def window_size(self) -> int:
        """sum(1) of eq. 1: the number of entries in one window, C_in·kh·kw."""
        kh, kw = self.kernel_size
        return self.in_channels * kh * kw

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """Partial convolution of ``x`` (N×C_in×H×W) under ``mask``; returns ``(out, new_mask)``."""
        return self.forward_masked(MaskedInput.from_mask(x, mask))

    def forward_masked(self, inp: MaskedInput) -> tuple[Tensor, Tensor]:
        """Eq. 1–2 for an input that is already X⊙M with its channel count Σ_c M (see :class:`MaskedInput`)."""
        values, count = inp
        if values.dim() != 4 or values.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: expected N×{self.in_channels}×H×W features, "
                             f"got shape {tuple(values.shape)}")
        if count.dim() != 4 or count.shape[1] != 1 or count.shape[0] != values.shape[0] \
                or count.shape[2:] != values.shape[2:]:
            raise ValueError(f"{type(self).__name__}: channel count must be N×1×H×W matching features of shape "
                             f"{tuple(values.shape)}, got {tuple(count.shape)}")
        scale, new_mask = self.mask_update(count)
        raw = F.conv2d(values, self.weight, None, self.stride, self.padding, self.dilation)
        # In place on the conv output: the conv's backward needs its input and weight, not its output.
        out = raw.mul_(scale.to(raw.dtype))
        if self.bias is not None:
            # (W^T(X⊙M)·ratio + b)·m' : scale is already 0 where m' is 0, so only the bias needs the mask.
            out = out.add_(self.bias.to(out.dtype).view(1, -1, 1, 1)).mul_(new_mask.to(out.dtype))
        return out, new_mask

    @torch.no_grad()
    def mask_update(self, count: Tensor) -> tuple[Tensor, Tensor]:
        """From the channel count Σ_c M (N×1×H×W) to ``(scale, new_mask)``, both N×1×H'×W'.

        scale = sum(1)/sum(M) where sum(M) > 0, else 0 (so the output and its bias vanish there);
        new_mask = 1[sum(M) > 0]. One single-channel window sum, with autocast off and in fp32 or wider.
        """
        with torch.autocast(device_type=count.device.type, enabled=False):
            msum = self.window_sum(count.to(_count_dtype(count.dtype)))
            # sum(1)/sum(M) is ±inf exactly where sum(M) == 0 (an all-hole window, ±0); those become 0. Counts are
            # non-negative, so sign() is exactly 1[sum(M) > 0]. Three small ops, no data-dependent branch.
            scale = torch.div(self.window_size, msum).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            return scale, torch.sign(msum)

    def window_sum(self, count: Tensor) -> Tensor:
        """Sum of a single-channel map over each window of this layer (zero padding, same output grid).

        Sum pooling (``avg_pool2d`` with ``divisor_override=1``) where it applies: it accumulates in full precision
        on every backend, whereas a convolution of ones may run in TF32 on CUDA and round counts above 2048. A
        1×1×kh×kw convolution of ones covers dilation and string padding.
        """
        kh, kw = self.kernel_size
        pad = self.padding
        if self.dilation == (1, 1) and not isinstance(pad, str) and pad[0] <= kh // 2 and pad[1] <= kw // 2:
            return F.avg_pool2d(count, self.kernel_size, self.stride, pad, ceil_mode=False,
                                count_include_pad=True, divisor_override=1)
        ones = torch.ones((1, 1, kh, kw), dtype=count.dtype, device=count.device)
        return F.conv2d(count, ones, None, self.stride, pad, self.dilation)
