"""The model inputs made from the data pipeline's compact rows (../shared/ARCHITECTURE.md, "Contracts").

Rows carry ``image`` uint8 ``N x 3 x S x S`` (0..255) and ``mask`` uint8 ``N x 1 x S x S`` in {0, 1} (1 = valid);
the model takes float32 ``image`` in [0, 1] and float32 ``mask``. The conversion is one cheap op at the consumer,
on its device (:func:`to_float_batch`: 4x fewer bytes to move), for the training batches and the validation pairs
alike. Torch is imported on use.

The net's image input (:func:`net_input`, key ``input`` of :func:`to_float_batch`): ``image`` itself for inpainting
(the net masks it), and for super-resolution rows (an ``lr`` column, ``task: sr``) the HR canvas holding the LR
pixels at their grid positions (:func:`pconv.core.sr_grid.place_on_grid`, as at inference) — not ``image * mask``,
whose grid pixels would be HR samples rather than the downsampled values the net sees in use.
"""

from __future__ import annotations

from typing import Any


def to_float_batch(batch: dict[str, Any], device: Any = None) -> dict[str, Any]:
    """Torch batch of uint8 rows -> the model inputs, on ``device`` (moved first: 4x fewer bytes to copy):
    float32 ``image`` in [0, 1], float32 ``mask``, ``input`` (:func:`net_input`); other keys unchanged."""
    import torch

    out = dict(batch)
    image, mask = batch["image"], batch["mask"]
    if device is not None:
        image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    out["image"] = image.to(torch.float32).mul_(1.0 / 255.0)
    out["mask"] = mask.to(torch.float32)
    out["input"] = net_input(out)
    return out


def net_input(batch: dict[str, Any]) -> Any:
    """The image the net takes with ``batch["mask"]`` (float torch): ``image``, or SR's canvas of ``lr`` (uint8 or
    float in [0, 1], ``N x 3 x S/K x S/K``; K = S / its side) on the grid, on ``image``'s device."""
    import torch

    from pconv.core.sr_grid import place_on_grid

    image, lr = batch["image"], batch.get("lr")
    if lr is None:
        return image
    lr = lr.to(image.device, non_blocking=True)
    lr = lr.to(torch.float32).mul_(1.0 / 255.0) if lr.dtype == torch.uint8 else lr.to(torch.float32)
    return place_on_grid(lr, image.shape[-1] // lr.shape[-1])[0]
