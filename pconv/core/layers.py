"""The U-Net's masked convolution layers: partial convolution (the paper) and gated convolution (a variant).

Partial convolution (Liu et al., "Image Inpainting for Irregular Holes Using Partial Convolutions", ECCV 2018).

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

:class:`GatedConv2d` is the gated convolution of Yu et al. (DeepFill v2, ICCV 2019, Sec. 3.1) with the same
constructor, ``forward`` / ``forward_masked`` signatures and return type, so the U-Net can swap one for the other;
:func:`make_conv` builds either by name (:data:`CONV_TYPES`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CONV_TYPES", "GatedConv2d", "MaskedConv2d", "MaskedInput", "PartialConv2d", "cat_masked", "make_conv"]


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


def _check_masked_input(layer: str, in_channels: int, inp: MaskedInput) -> MaskedInput:
    """Raise ValueError unless ``inp`` is N×in_channels×H×W features with an N×1×H×W channel count."""
    values, count = inp
    if values.dim() != 4 or values.shape[1] != in_channels:
        raise ValueError(f"{layer}: expected N×{in_channels}×H×W features, got shape {tuple(values.shape)}")
    if count.dim() != 4 or count.shape[1] != 1 or count.shape[0] != values.shape[0] \
            or count.shape[2:] != values.shape[2:]:
        raise ValueError(f"{layer}: channel count must be N×1×H×W matching features of shape "
                         f"{tuple(values.shape)}, got {tuple(count.shape)}")
    return inp


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
        values, count = _check_masked_input(type(self).__name__, self.in_channels, inp)
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


class GatedConv2d(nn.Module):
    """Gated convolution (Yu et al., "Free-Form Image Inpainting with Gated Convolution", ICCV 2019, Sec. 3.1).

    This is the gated convolution LAYER as a variant inside the PConv paper's U-Net and losses; it is not DeepFill v2
    (no coarse-to-fine network, no contextual attention, no SN-PatchGAN). The gating equation of Sec. 3.1::

        Gating  = Conv_g(I),   Feature = Conv_f(I),   O = φ(Feature) ⊙ σ(Gating)

    ``forward(x, mask) -> (out, new_mask)`` and ``forward_masked(MaskedInput) -> (out, new_mask)`` take and return
    exactly what :class:`PartialConv2d` does, and the constructor takes the same arguments, so a U-Net block can use
    either. Choices, and why:

    - Input I: the masked features X⊙M concatenated with ONE mask channel, the fraction of valid channels at each
      pixel, Σ_c M / C_in (from :attr:`MaskedInput.count`). For an N×1 mask (the usual case) that is the mask itself,
      exactly; an N×C_in mask is accepted as by :class:`PartialConv2d` and enters as its per-pixel channel mean. One
      channel keeps the parameter count independent of the mask's shape and works on :func:`cat_masked` inputs,
      which carry only the count. Using X⊙M (not X) keeps the U-Net's property that the output never depends on
      the content of hole pixels. The conv therefore has ``in_channels + 1`` input channels.
    - Conv_f and Conv_g: ONE convolution with ``2·out_channels`` outputs, split in two along channels (first half
      Feature, second half Gating). It is exactly two convolutions of the same shape (each output channel has its
      own weights and bias; the default init depends only on the fan-in, which both share), but reads the input and
      runs the im2col/GEMM once. ``bias`` applies to both halves.
    - Parameters: 2·out·(in+1)·kh·kw (+ 2·out with bias) = 2 × a PartialConv2d of the same shape + 2·out·kh·kw.
    - Mask passed on: all ones, N×1×H'×W' (float, fp32 or the count's wider float type), i.e. "every output pixel
      holds a value": gated convolution has no mask update rule, the learned soft gate replaces it. Passing a real
      (downsampled) mask would make the U-Net's blocks, which multiply features by the mask they get back, zero the
      holes for good. With all ones, the U-Net's masking is a no-op, its skips and decoder keep working unchanged,
      and the holes enter the network as the first encoder layer's mask channel (as DeepFill v2 feeds the mask once,
      with the input) and again, through the input-image skip, at the last decoder layer. Deeper layers' mask
      channel is 1 inside the image and 0 in the zero padding (border counts as hole, as for PartialConv2d).
    - φ: ``activation`` (default None = identity, so the layer returns Feature ⊙ σ(Gating)). The U-Net block keeps
      its structure, layer → [BN] → activation: for the U-Net's activations (ReLU, LeakyReLU) φ is positively
      homogeneous and σ > 0, so φ(F ⊙ σ(G)) = φ(F) ⊙ σ(G) exactly; the block's activation after the layer
      IS the paper's φ wherever no BN sits in between (first encoder layer; the last decoder layer has no
      activation, φ = identity). Where BN follows the layer, the block computes φ(BN(F ⊙ σ(G))): BN normalises the gated
      output before φ. Pass ``activation`` to apply φ inside the layer instead (then the block must not repeat it).

    Only ``groups=1`` and zero padding are supported (the mask channel is concatenated to every input group; the
    border must read as mask 0). Nothing is cached between calls.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *,
                 activation: Callable[[Tensor], Tensor] | None = None) -> None:
        if groups != 1:
            raise ValueError(f"GatedConv2d supports groups=1 only, got groups={groups}")
        if padding_mode != "zeros":
            raise ValueError(f"GatedConv2d needs padding_mode='zeros' (the border reads as mask 0, as for "
                             f"PartialConv2d), got {padding_mode!r}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        super().__init__()
        # Output channels [0, out) are Conv_f (Feature), [out, 2·out) are Conv_g (Gating); input channel `in` is M.
        self.conv = nn.Conv2d(in_channels + 1, 2 * out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    @property
    def in_channels(self) -> int:
        """Feature channels C_in (the convolution itself sees C_in + 1: the mask channel)."""
        return self.conv.in_channels - 1

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels // 2

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.conv.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.conv.stride

    @property
    def padding(self) -> tuple[int, ...] | str:
        return self.conv.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.conv.dilation

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Gated convolution of ``x`` (N×C_in×H×W) with ``mask`` (N×1 or N×C_in, 1 = valid); ``(out, ones)``."""
        return self.forward_masked(MaskedInput.from_mask(x, mask))

    def forward_masked(self, inp: MaskedInput) -> tuple[Tensor, Tensor]:
        """O = φ(Feature) ⊙ σ(Gating) for an input given as X⊙M and Σ_c M; returns ``(O, all-ones mask)``."""
        feature, gate = self.branches(inp)
        out = feature if self.activation is None else self.activation(feature)
        out = out * gate
        ones = torch.ones((out.shape[0], 1, *out.shape[2:]), dtype=_count_dtype(inp.count.dtype),
                          device=out.device)
        return out, ones

    def branches(self, inp: MaskedInput) -> tuple[Tensor, Tensor]:
        """``(Feature, σ(Gating))``, both N×C_out×H'×W': Conv_f(I) before φ, and the gate in (0, 1)."""
        values, count = _check_masked_input(type(self).__name__, self.in_channels, inp)
        with torch.no_grad():
            mask_channel = (count.to(_count_dtype(count.dtype)) / self.in_channels).to(values.dtype)
        raw = self.conv(torch.cat([values, mask_channel], dim=1))
        feature, gating = raw.chunk(2, dim=1)
        return feature, torch.sigmoid(gating)


MaskedConv2d = Union[PartialConv2d, GatedConv2d]
"""Either masked convolution; both take ``(x, mask)`` or a :class:`MaskedInput` and return ``(out, new_mask)``."""

CONV_TYPES: tuple[str, ...] = ("partial", "gated")
"""Names of the U-Net's convolution variants: "partial" (the paper, eq. 1–2), "gated" (Yu et al. 2019)."""


def make_conv(kind: str, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
              stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
              dilation: int | tuple[int, int] = 1, bias: bool = True) -> MaskedConv2d:
    """The masked convolution named ``kind`` (one of :data:`CONV_TYPES`); ValueError naming the choices otherwise."""
    if kind == "partial":
        return PartialConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                             dilation=dilation, bias=bias)
    if kind == "gated":
        return GatedConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, bias=bias)
    raise ValueError(f"unknown convolution type {kind!r}; valid choices: {', '.join(CONV_TYPES)}")
