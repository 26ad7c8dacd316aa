"""The PConv U-Net of Liu et al. (ECCV 2018), Sec. 3.3 and the supplementary architecture table.

Encoder: L stride-2 partial convolutions (L = ``layer_size``, 8 at 512 px), ReLU, BN from the second layer on.
Decoder: for each level, nearest ×2 upsampling of the features AND the mask, concatenation with the skip features
and skip mask of the mirrored encoder layer (the input image and mask at the last level), a 3×3 stride-1 partial
convolution, BN + LeakyReLU(0.2); the last layer outputs 3 channels with neither BN nor activation.

Masks are exact, not approximated: the window sum of a concatenation equals the multi-channel formulation (each
part weighted by its channel count; the image part counts ``in_channels`` copies of an N×1 input mask), see
:func:`pconv.core.layers.cat_masked`. Features are kept multiplied by their own mask as soon as they are produced, so
each feature map is masked once and reused both by the next encoder layer and by the decoder's skip connection.

Convolution biases: present where no BN follows (first encoder layer, last decoder layer); the layers followed by
BN have none, BN's shift playing that role (as in common implementations). This gives 32,859,796 parameters at
``layer_size=8`` (the paper reports ≈32.86 M).

BN freezing (paper Sec. 4.1, fine-tuning phase): :meth:`PConvUNet.freeze_encoder_bn` puts the encoder's BN layers
in eval mode for good (they stay there after ``.train()``) and stops gradients to their affine parameters. The
flag is a plain attribute, NOT part of the state dict: a state dict therefore loads into any PConvUNet of the same
``layer_size`` whatever its phase, and the training loop re-applies the freeze from the checkpoint's ``phase``.

Convolution variant (``conv``, one of :data:`pconv.core.layers.CONV_TYPES`): ``"partial"`` is the paper's net;
``"gated"`` puts the gated convolution of Yu et al. (DeepFill v2, ICCV 2019, Sec. 3.1) in every one of the same
slots (same depth, kernels, strides, channels, BN, skips, upsampling and decoder). It is that LAYER inside this
U-Net and its losses, not DeepFill v2 (no coarse-to-fine stages, no contextual attention, no SN-PatchGAN). A gated
layer passes on an all-ones mask (see :class:`pconv.core.layers.GatedConv2d`), so the holes reach the net through the
first layer's mask channel and the last decoder layer's input skip; ``output_mask`` is then all ones. The two
variants' state dicts have different keys (:func:`conv_of_state_dict` tells them apart).
"""

from __future__ import annotations

import logging
import math

import torch.nn.functional as F
from torch import Tensor, nn

from pconv.core.layers import CONV_TYPES, MaskedInput, cat_masked, make_conv

__all__ = ["CONV_TYPES", "DECODER_KERNEL", "LEAKY_RELU_SLOPE", "PAPER_ENCODER", "PAPER_IMAGE_SIZE", "PAPER_LAYER_SIZE",
           "PConvUNet", "build_model", "check_conv", "conv_of_state_dict", "decoder_spec", "default_layer_size",
           "encoder_spec", "min_image_size"]

logger = logging.getLogger(__name__)

# Paper Sec. 3.3 + supplementary "PConv-Net architecture" table (512×512 input): the encoder layers PConv1..PConv8
# as (kernel size, output channels, batch norm); all stride 2, ReLU. Shallower nets (layer_size < 8, e.g. 7 for
# 256 px) drop 3×3/512 layers from the bottom.
PAPER_ENCODER: tuple[tuple[int, int, bool], ...] = (
    (7, 64, False),
    (5, 128, True),
    (5, 256, True),
    (3, 512, True),
    (3, 512, True),
    (3, 512, True),
    (3, 512, True),
    (3, 512, True),
)
PAPER_LAYER_SIZE = 8      # encoder depth of the paper's net
PAPER_IMAGE_SIZE = 512    # its input size: 512 / 2**8 = a 2 px bottleneck
DECODER_KERNEL = 3        # PConv9..PConv16: 3×3, stride 1, after nearest ×2 upsampling
LEAKY_RELU_SLOPE = 0.2    # decoder activation, LeakyReLU(0.2)
MIN_BOTTLENECK = 2        # default_layer_size keeps the paper's 2 px bottleneck


def _check_layer_size(layer_size: int) -> None:
    if isinstance(layer_size, bool) or not isinstance(layer_size, int) or not 1 <= layer_size <= PAPER_LAYER_SIZE:
        raise ValueError(f"layer_size must be an integer in [1, {PAPER_LAYER_SIZE}], got {layer_size!r}")


def check_conv(conv: str) -> str:
    """``conv`` if it names a convolution variant (:data:`pconv.core.layers.CONV_TYPES`), else ValueError listing them."""
    if conv not in CONV_TYPES:
        raise ValueError(f"unknown convolution type {conv!r}; valid choices: {', '.join(CONV_TYPES)}")
    return conv


def conv_of_state_dict(state_dict: dict) -> str | None:
    """Which variant a U-Net state dict belongs to: ``"partial"``, ``"gated"``, or None when it is neither.

    A gated layer wraps one ``nn.Conv2d`` (keys ``….conv.conv.weight``); a partial layer IS the conv
    (``….conv.weight``). Lets a loader say "these are gated weights" instead of a list of missing keys.
    """
    if "encoder.0.conv.conv.weight" in state_dict:
        return "gated"
    if "encoder.0.conv.weight" in state_dict:
        return "partial"
    return None


def encoder_spec(layer_size: int) -> tuple[tuple[int, int, bool], ...]:
    """(kernel, out_channels, batch_norm) of each encoder layer for a net of depth ``layer_size``."""
    _check_layer_size(layer_size)
    return PAPER_ENCODER[:layer_size]


def decoder_spec(layer_size: int, in_channels: int = 3,
                 out_channels: int = 3) -> tuple[tuple[int, int, int, bool], ...]:
    """(channels from below, skip channels, out_channels, batch_norm) of each decoder layer, deepest first."""
    enc = encoder_spec(layer_size)
    spec = []
    below = enc[-1][1]
    for level in range(layer_size - 1, -1, -1):  # the skip of decoder level `level` is encoder output level-1
        skip = enc[level - 1][1] if level > 0 else in_channels
        out = skip if level > 0 else out_channels
        spec.append((below, skip, out, level > 0))
        below = out
    return tuple(spec)


def min_image_size(layer_size: int) -> int:
    """Smallest side the net accepts: each of the ``layer_size`` stride-2 layers halves an even size."""
    _check_layer_size(layer_size)
    return 2 ** layer_size


def default_layer_size(image_size: int) -> int:
    """Depth for square images of side ``image_size``: 8 at 512 (and above), 7 at 256, 6 at 128, 5 at 64.

    The paper's net ends at a 2 px bottleneck, so the depth is log2(image_size) - 1, capped at 8; the size must
    then be divisible by 2**depth (e.g. 384 -> 7, a 3 px bottleneck). Raises ValueError otherwise. The one rule:
    :class:`pconv.core.config.TrainConfig` uses it for its default ``layer_size``, so a config accepts what the net does.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(f"image_size must be an integer, got {image_size!r}")
    smallest = MIN_BOTTLENECK * 2
    if image_size < smallest:
        raise ValueError(f"image_size {image_size} is too small for a PConv U-Net: need at least {smallest} px "
                         f"(one stride-2 layer down to a {MIN_BOTTLENECK} px bottleneck)")
    layer_size = min(PAPER_LAYER_SIZE, int(math.floor(math.log2(image_size))) - 1)
    if image_size % 2 ** layer_size:
        raise ValueError(f"image_size {image_size} is not divisible by 2**{layer_size} = {2 ** layer_size}, which a "
                         f"{layer_size}-layer PConv U-Net needs; use a multiple of {2 ** layer_size} or pass "
                         f"layer_size explicitly")
    return layer_size


class _EncoderBlock(nn.Module):
    """Stride-2 masked conv (+ BN) + ReLU; returns features multiplied by their new mask, and that mask."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, batch_norm: bool,
                 conv: str = "partial") -> None:
        super().__init__()
        self.conv = make_conv(conv, in_channels, out_channels, kernel, stride=2, padding=kernel // 2,
                              bias=not batch_norm)
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else None

    def forward(self, inp: MaskedInput) -> tuple[Tensor, Tensor]:
        out, mask = self.conv.forward_masked(inp)
        if self.bn is not None:
            # BN shifts the zeros of the holes; mask again. Masking before the activation is exact for a binary
            # mask (relu(y)·m == relu(y·m)) and lets both ops run in place. Without BN, eq. 1 already gives 0.
            out = self.bn(out).mul_(mask.to(out.dtype))
        return F.relu_(out), mask


class _DecoderBlock(nn.Module):
    """Nearest ×2 upsampling of features and mask, concat with the skip, 3×3 masked conv (+ BN + LeakyReLU)."""

    def __init__(self, below_channels: int, skip_channels: int, out_channels: int, batch_norm: bool,
                 conv: str = "partial") -> None:
        super().__init__()
        self.conv = make_conv(conv, below_channels + skip_channels, out_channels, DECODER_KERNEL, stride=1,
                              padding=DECODER_KERNEL // 2, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else None

    def forward(self, below: Tensor, below_mask: Tensor, skip: MaskedInput) -> tuple[Tensor, Tensor]:
        """``below`` must already be multiplied by ``below_mask`` (N×1); ``skip`` is the masked skip input."""
        up = F.interpolate(below, scale_factor=2.0, mode="nearest")
        up_mask = F.interpolate(below_mask, scale_factor=2.0, mode="nearest")
        skip_values = skip.values.to(up.dtype)  # a no-op except for the fp32 image part under autocast
        inp = cat_masked([MaskedInput.from_mask(up, up_mask, already_masked=True),
                          MaskedInput(skip_values, skip.count)])
        out, mask = self.conv.forward_masked(inp)
        if self.bn is None:
            return out, mask
        out = self.bn(out).mul_(mask.to(out.dtype))
        return F.leaky_relu_(out, LEAKY_RELU_SLOPE), mask


class PConvUNet(nn.Module):
    """The paper's PConv U-Net. ``forward(image, mask) -> (output, output_mask)``.

    ``image``: N×in_channels×H×W; ``mask``: N×1×H×W (or N×in_channels×H×W), float, 1 = valid, 0 = hole; H and W
    must be multiples of ``2**layer_size``. ``output``: N×out_channels×H×W (the raw prediction, not composited);
    ``output_mask``: N×1×H×W, 1 where eq. 2 reached (all ones for ``conv="gated"``). The output never depends on
    the content of hole pixels. ``conv`` picks the convolution variant (module doc); ``conv_type`` records it.
    """

    def __init__(self, layer_size: int = PAPER_LAYER_SIZE, in_channels: int = 3, out_channels: int = 3,
                 conv: str = "partial") -> None:
        super().__init__()
        _check_layer_size(layer_size)
        self.conv_type = check_conv(conv)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        self.layer_size = layer_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        blocks, c = [], in_channels
        for kernel, out, bn in encoder_spec(layer_size):
            blocks.append(_EncoderBlock(c, out, kernel, bn, conv))
            c = out
        self.encoder = nn.ModuleList(blocks)
        self.decoder = nn.ModuleList(_DecoderBlock(below, skip, out, bn, conv)
                                     for below, skip, out, bn in decoder_spec(layer_size, in_channels, out_channels))
        self._encoder_bn_frozen = False

    # ---- BN freezing (phase 2) -------------------------------------------------------------------
    def encoder_batch_norms(self) -> list[nn.BatchNorm2d]:
        return [b.bn for b in self.encoder if b.bn is not None]

    @property
    def encoder_bn_frozen(self) -> bool:
        """True once :meth:`freeze_encoder_bn` ran on this instance (not saved in the state dict)."""
        return self._encoder_bn_frozen

    def freeze_encoder_bn(self) -> "PConvUNet":
        """Fine-tuning phase (paper Sec. 4.1): encoder BN uses its running statistics and stops learning.

        The encoder's BN layers go to eval mode and stay there through later ``.train()`` calls; their weight and
        bias get ``requires_grad=False`` (build the optimiser afterwards from the parameters that require grad).
        Decoder BN keeps training. Idempotent.
        """
        for bn in self.encoder_batch_norms():
            bn.eval()
            bn.requires_grad_(False)
        self._encoder_bn_frozen = True
        logger.info("encoder batch norm frozen (%d layers)", len(self.encoder_batch_norms()))
        return self

    def train(self, mode: bool = True) -> "PConvUNet":
        super().train(mode)
        if self._encoder_bn_frozen:
            for bn in self.encoder_batch_norms():
                bn.eval()
        return self

    # ---- forward ---------------------------------------------------------------------------------
    def _check_inputs(self, image: Tensor, mask: Tensor) -> None:
        if image.dim() != 4 or image.shape[1] != self.in_channels:
            raise ValueError(f"image must be N×{self.in_channels}×H×W, got shape {tuple(image.shape)}")
        h, w = image.shape[2:]
        step = 2 ** self.layer_size
        if h % step or w % step:
            raise ValueError(f"image size {h}×{w} is not a multiple of 2**layer_size = {step} "
                             f"(layer_size={self.layer_size}); pad or crop the input, or use a smaller layer_size")
        if mask.dim() != 4 or mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:] \
                or mask.shape[1] not in (1, self.in_channels):
            raise ValueError(f"mask must be N×1×H×W (or N×{self.in_channels}×H×W) matching image shape "
                             f"{tuple(image.shape)}, got {tuple(mask.shape)}")

    def forward(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        self._check_inputs(image, mask)
        x = MaskedInput.from_mask(image, mask)
        skips = [x]
        for block in self.encoder:
            h, m = block(skips[-1])
            skips.append(MaskedInput.from_mask(h, m, already_masked=True))
        skips.pop()  # the bottleneck is the decoder's first input, not a skip
        for block in self.decoder:
            h, m = block(h, m, skips.pop())
        return h, m


def build_model(layer_size: int, in_channels: int = 3, conv: str = "partial") -> PConvUNet:
    """The U-Net of depth ``layer_size`` (8 for the paper's 512 px net, see :func:`default_layer_size`) built with
    convolution variant ``conv`` (``"partial"``: the paper; ``"gated"``: the gated-convolution variant)."""
    return PConvUNet(layer_size=layer_size, in_channels=in_channels, conv=conv)
