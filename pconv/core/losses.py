"""Loss of the Partial-Convolution inpainting paper (Liu et al., ECCV 2018, Sec. 3.4, eq. 3-7).

Notation (paper): ``I_in`` masked input, ``I_out`` network output, ``I_gt`` ground truth, ``M`` the binary
mask (1 = valid, 0 = hole), ``I_comp = M * I_gt + (1 - M) * I_out`` (the raw output with the known pixels
pasted back), ``Psi_p`` the VGG-16 activation after pool layer ``p`` (pool1, pool2, pool3; ImageNet weights).

The known pixels of ``I_comp``: the paper sets "the non-hole pixels directly to ground truth" (Sec. 3.4), because in
inpainting the input's valid pixels ARE the ground truth's, and inference returns the composite with them. In
super-resolution (Sec. 5) the known pixels inference keeps are the LR pixels on the grid (downsampled values, not
the HR pixels there), so the SR composite takes them from the net's input canvas: ``known=`` of
:meth:`InpaintingLoss.forward` (default: ``I_gt``, the paper's eq. for inpainting). L_valid stays on ``I_gt``: it
trains the raw output, which the SR evaluation reports beside the composite (docs/variants.md).

Normalisations, as read from the paper:

* ``L_valid = ||M * (I_out - I_gt)||_1 / N_Igt`` and ``L_hole = ||(1 - M) * (I_out - I_gt)||_1 / N_Igt``
  (eq. 1 of Sec. 3.4): N_Igt = N*C*H*W, i.e. a plain mean over all elements (NOT over the valid/hole pixels
  only).
* ``L_perceptual`` (eq. 3): ``sum_p ||Psi_p(I_out) - Psi_p(I_gt)||_1 / N_Psi_p + ||Psi_p(I_comp) - Psi_p(I_gt)||_1
  / N_Psi_p`` - a mean over all elements of each feature map.
* ``L_style_out`` / ``L_style_comp`` (eq. 4-5): ``sum_p 1/C_p^2 || K_p (Psi^T Psi - Psi_gt^T Psi_gt) ||_1`` with
  ``K_p = 1/(C_p H_p W_p)``. The Gram matrix ``Psi^T Psi`` is C_p x C_p per sample; dividing the L1 norm of the
  (K_p-scaled) Gram difference by C_p^2 is a mean over the C_p x C_p entries. Over a batch we also average over
  samples, so each style term is ``mean(|G(out) - G(gt)|)`` with ``G = Psi^T Psi / (C_p H_p W_p)``.
* ``L_tv`` (eq. 6): on I_comp, over P = the 1-pixel dilation of the hole region, the sum of absolute horizontal
  differences of pixel pairs that both lie in P plus the same vertically, divided by N_Icomp = N*C*H*W.
* ``L_total`` (eq. 7): ``L_valid + 6 L_hole + 0.05 L_perceptual + 120 (L_style_out + L_style_comp) + 0.1 L_tv``.

The feature extractor normalises its input with ImageNet mean/std itself, so images in [0, 1] are passed
unchanged.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VGG16_Weights

logger = logging.getLogger(__name__)

#: Names of the terms :class:`InpaintingLoss` returns, the one list (metric names are ``loss/<term>``,
#: ``val/<term>``): the six unweighted terms of eq. 1-6, then ``total``, their weighted sum (eq. 7).
LOSS_TERMS = ("valid", "hole", "perceptual", "style_out", "style_comp", "tv", "total")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; the defaults are the paper's (Sec. 3.4, eq. 7).

    ``L_total = valid*L_valid + hole*L_hole + perceptual*L_perceptual
    + style*(L_style_out + L_style_comp) + tv*L_tv``. ``style`` applies to both style terms.
    """

    valid: float = 1.0
    hole: float = 6.0
    perceptual: float = 0.05
    style: float = 120.0
    tv: float = 0.1


#: The paper's loss weights (Liu et al. 2018, Sec. 3.4, eq. 7): 1, 6, 0.05, 120 (both style terms), 0.1.
PAPER_LOSS_WEIGHTS = LossWeights()

#: ImageNet statistics used by torchvision's VGG16 weights (inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Layout of torchvision's ``vgg16().features`` up to and including pool3 (indices 0..16): output channels
#: of each 3x3 conv, "M" for a 2x2 max-pool. Keeping torchvision's indices lets its state dicts load directly.
VGG16_UP_TO_POOL3 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M")
#: Indices in ``features`` after which pool1, pool2, pool3 are taken.
_POOL_INDICES = (4, 9, 16)

#: torchvision's ImageNet VGG16 weights (VGG16_Weights.IMAGENET1K_V1, .../vgg16-397923af.pth).
IMAGENET_VGG16_URL: str = VGG16_Weights.IMAGENET1K_V1.url


def _build_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for item in VGG16_UP_TO_POOL3:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1))
            layers.append(nn.ReLU(inplace=True))
            in_ch = int(item)
    return nn.Sequential(*layers)


def _download_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG16 state dict from the torch hub cache, downloading it if needed."""
    try:
        return torch.hub.load_state_dict_from_url(
            IMAGENET_VGG16_URL, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as exc:  # network errors come as URLError, OSError, RuntimeError, ...
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(IMAGENET_VGG16_URL)
        raise RuntimeError(
            f"could not obtain the ImageNet VGG16 weights ({type(exc).__name__}: {exc}). They are downloaded "
            f"from {IMAGENET_VGG16_URL} into the torch hub cache ({cache}). Without internet access, either "
            f"copy that file to {cache} (or point TORCH_HOME at a populated cache), or pass "
            f"weights='/path/to/vgg16.pth' or weights='s3://bucket/vgg16.pth' (a torchvision VGG16 state dict)."
        ) from exc


def _read_state_dict(source: str, read_bytes: Callable[[str], bytes] | None) -> dict[str, torch.Tensor]:
    """Load a state dict from a local path, or from a URI (``s3://...``) through ``read_bytes``."""
    if "://" in source:
        if read_bytes is None:
            raise ValueError(f"VGG16 weights {source!r} are a URI: pass read_bytes (for example "
                             "pconv.storage.uris.read_bytes) to read them")
        try:
            data = read_bytes(source)
        except Exception as exc:
            raise FileNotFoundError(f"cannot read VGG16 weights from {source!r}: {exc}") from exc
        buffer: io.BytesIO | str = io.BytesIO(data)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"VGG16 weights file {source!r} does not exist; pass weights='imagenet', 'random', a local path "
                f"or an s3:// URI to a torchvision VGG16 state dict"
            )
        buffer = str(path)
    try:
        state = torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"VGG16 weights {source!r} are not a loadable torch state dict: {exc}") from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"VGG16 weights {source!r} hold a {type(state).__name__}, expected a state dict")
    return dict(state)


class VGG16FeatureExtractor(nn.Module):
    """Frozen VGG-16 up to pool3; ``forward(x)`` returns ``[pool1, pool2, pool3]``.

    ``x`` is an ``N x 3 x H x W`` image in [0, 1]; ImageNet mean/std normalisation happens here. The outputs
    have 64, 128, 256 channels at H/2, H/4, H/8. The module never leaves eval mode (``.train()`` is ignored)
    and its parameters never require gradients, while gradients still flow to the input.

    ``weights``:
      * ``"imagenet"`` - torchvision's VGG16_Weights.IMAGENET1K_V1 (torch hub cache or download);
      * a local path or an object-storage URI (``s3://...``) to a torchvision ``vgg16()`` state dict
        (keys ``features.N.weight`` ...; classifier keys are ignored, missing feature keys are an error);
      * ``"random"`` - seeded random init (``seed``): no ImageNet features, so the perceptual and style terms are
        not the paper's; for machines that cannot obtain the weights (the offline demo) and the unit tests. Logs a
        warning.

    ``read_bytes`` reads a URI's bytes (the core knows no object storage; training passes
    :func:`pconv.storage.uris.read_bytes`).
    """

    def __init__(self, weights: str = "imagenet", seed: int = 0,
                 read_bytes: Callable[[str], bytes] | None = None) -> None:
        super().__init__()
        self.features = _build_features()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if not isinstance(weights, str):
            raise TypeError(f"weights must be a string ('imagenet', 'random', a path or URI), got {weights!r}")
        if weights == "random":
            logger.warning(
                "VGG16FeatureExtractor uses RANDOM weights (seed %d): perceptual/style losses are not the "
                "paper's; train with weights='imagenet' or a path / URI to ImageNet weights for real results",
                seed,
            )
            self._init_random(seed)
        else:
            state = _download_imagenet_state_dict() if weights == "imagenet" else _read_state_dict(weights, read_bytes)
            self._load_torchvision_state(state, source=weights)
        self.weights_source = weights
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def _init_random(self, seed: int) -> None:
        # torchvision's VGG init (kaiming normal, fan_out, zero bias) with a private generator: reproducible
        # and without touching the global RNG.
        gen = torch.Generator().manual_seed(seed)
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen)
                nn.init.zeros_(m.bias)

    def _load_torchvision_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        wanted = set(self.features.state_dict().keys())
        picked: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            sub = key[len("features."):] if key.startswith("features.") else None
            if sub is not None and sub in wanted:
                picked[sub] = value
        missing = sorted(wanted - picked.keys(), key=lambda k: (int(k.split(".")[0]), k))
        if missing:
            raise ValueError(
                f"VGG16 weights {source!r} lack feature keys {['features.' + k for k in missing]}; expected a "
                f"torchvision vgg16() state dict"
            )
        try:
            self.features.load_state_dict(picked, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"VGG16 weights {source!r} do not fit torchvision's VGG16 layout: {exc}") from exc

    def train(self, mode: bool = True) -> "VGG16FeatureExtractor":
        """Ignore train mode: the extractor is a fixed loss network and always stays in eval mode."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG16FeatureExtractor expects N x 3 x H x W images, got shape {tuple(x.shape)}")
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats: list[torch.Tensor] = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _POOL_INDICES:
                feats.append(h)
        return feats


def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """``Psi^T Psi / (C H W)`` per sample (N x C x C), computed in fp32 even under autocast (eq. 4, K_p)."""
    n, c, h, w = feat.shape
    with torch.autocast(device_type=feat.device.type, enabled=False):
        f = feat.float().reshape(n, c, h * w)
        return torch.bmm(f, f.transpose(1, 2)) / float(c * h * w)


def total_variation(comp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6: TV of ``comp`` over P = 1-pixel dilation (3x3) of the hole region, divided by ``comp.numel()``."""
    hole = 1.0 - mask.float()
    region = F.max_pool2d(hole, kernel_size=3, stride=1, padding=1)  # P as 0/1 (N x 1|C x H x W)
    comp = comp.float()
    pair_h = region[..., :, :-1] * region[..., :, 1:]
    pair_v = region[..., :-1, :] * region[..., 1:, :]
    diff_h = (comp[..., :, 1:] - comp[..., :, :-1]).abs() * pair_h
    diff_v = (comp[..., 1:, :] - comp[..., :-1, :]).abs() * pair_v
    return (diff_h.sum() + diff_v.sum()) / comp.numel()


class InpaintingLoss(nn.Module):
    """The paper's loss (eq. 3-7). ``loss(mask, output, gt)`` returns a dict of tensors.

    Keys (:data:`LOSS_TERMS`) ``valid``, ``hole``, ``perceptual``, ``style_out``, ``style_comp``, ``tv`` hold the
    UNWEIGHTED terms; ``total`` is their weighted sum with ``weights`` (default: the paper's,
    :data:`PAPER_LOSS_WEIGHTS`).
    ``mask`` is ``N x 1 x H x W`` (or ``N x C x H x W``), 1 = valid; images are ``N x 3 x H x W`` in [0, 1].
    The VGG features of ``gt`` are computed once without gradients; those of ``output`` and ``I_comp`` in one
    extractor call. All terms are reduced in fp32, so the loss is safe under fp16/bf16 autocast.
    """

    def __init__(self, extractor: nn.Module, weights: LossWeights = PAPER_LOSS_WEIGHTS) -> None:
        super().__init__()
        self.extractor = extractor
        self.weights = weights

    def forward(self, mask: torch.Tensor, output: torch.Tensor, gt: torch.Tensor,
                known: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The terms for ``output`` against ``gt``; ``known``: the pixels ``I_comp`` keeps where ``mask`` is 1
        (default ``gt``, the paper's I_comp; super-resolution passes the LR canvas the net took, whose grid pixels
        inference keeps: see the module doc)."""
        if output.shape != gt.shape:
            raise ValueError(f"output {tuple(output.shape)} and gt {tuple(gt.shape)} differ in shape")
        if known is None:
            known = gt
        elif known.shape != gt.shape:
            raise ValueError(f"known {tuple(known.shape)} and gt {tuple(gt.shape)} differ in shape")
        if mask.dim() != 4 or mask.shape[0] != gt.shape[0] or mask.shape[2:] != gt.shape[2:]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(gt.shape)} (need N x 1 x H x W)")
        if not mask.is_floating_point():
            mask = mask.float()
        comp = mask * known + (1.0 - mask) * output  # I_comp; dtype follows type promotion (fp32 if any is fp32)

        # Pixel terms in fp32; mask broadcasts over channels; mean over N*C*H*W = N_Igt.
        diff = (output - gt).float()
        m32 = mask.float()
        valid = (m32 * diff).abs().mean()
        hole = ((1.0 - m32) * diff).abs().mean()

        n = gt.shape[0]
        with torch.no_grad():
            feats_gt = self.extractor(gt)
        feats_oc = self.extractor(torch.cat([output.to(comp.dtype), comp], dim=0))

        perceptual = diff.new_zeros(())
        style_out = diff.new_zeros(())
        style_comp = diff.new_zeros(())
        for f_gt, f_oc in zip(feats_gt, feats_oc):
            f_out, f_comp = f_oc[:n], f_oc[n:]
            f_gt32 = f_gt.float()
            perceptual = perceptual + (f_out.float() - f_gt32).abs().mean() + (f_comp.float() - f_gt32).abs().mean()
            g_gt = gram_matrix(f_gt)
            style_out = style_out + (gram_matrix(f_out) - g_gt).abs().mean()
            style_comp = style_comp + (gram_matrix(f_comp) - g_gt).abs().mean()

        tv = total_variation(comp, mask)
        w = self.weights
        total = (
            w.valid * valid
            + w.hole * hole
            + w.perceptual * perceptual
            + w.style * (style_out + style_comp)
            + w.tv * tv
        )
        return dict(zip(LOSS_TERMS, (valid, hole, perceptual, style_out, style_comp, tv, total)))
