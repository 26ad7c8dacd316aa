"""The model inputs made from the data pipeline's compact rows (../shared/ARCHITECTURE.md, "Contracts").

Rows carry ``image`` uint8 ``N x 3 x S x S`` (0..255) and ``mask`` uint8 ``N x 1 x S x S`` in {0, 1} (1 = valid);
the model takes float32 ``image`` in [0, 1], float32 ``mask`` and, where asked, ``masked`` = image * mask. The
conversion is one cheap op at the consumer: :func:`to_float_batch` on the consumer's device (the training loop: 4x
fewer bytes to move), :func:`float_collate` / :func:`iter_batches` in Ray's prefetch threads for other consumers,
:func:`to_float` on numpy arrays (validation pairs, benchmarks). Torch and Ray are imported on use.

The net's image input (:func:`net_input`, key ``input`` of :func:`to_float_batch`): ``image`` itself for inpainting
(the net masks it), and for super-resolution rows (an ``lr`` column, ``task: sr``) the HR canvas holding the LR
pixels at their grid positions (:func:`pconv.core.sr_grid.place_on_grid`, as at inference) — not ``image * mask``,
whose grid pixels would be HR samples rather than the downsampled values the net sees in use.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import numpy as np


def to_float(image: np.ndarray, mask: np.ndarray, include_masked: bool = False) -> dict[str, np.ndarray]:
    """Model inputs from the compact arrays: float32 ``image`` in [0, 1], float32 ``mask`` in {0, 1}, and
    ``masked`` = image * mask when asked. (:func:`to_float_batch` is the torch twin.)"""
    image = image.astype(np.float32)
    image *= 1.0 / 255.0
    out = {"image": image, "mask": mask.astype(np.float32)}
    if include_masked:
        out["masked"] = out["image"] * out["mask"]
    return out


def to_float_batch(batch: dict[str, Any], device: Any = None, include_masked: bool = False) -> dict[str, Any]:
    """Torch batch of uint8 rows -> the model inputs, on ``device`` (moved first: 4x fewer bytes to copy):
    float32 ``image`` in [0, 1], float32 ``mask``, ``masked`` = image * mask if asked, ``input`` (:func:`net_input`);
    other keys unchanged."""
    import torch

    out = dict(batch)
    image, mask = batch["image"], batch["mask"]
    if device is not None:
        image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    out["image"] = image.to(torch.float32).mul_(1.0 / 255.0)
    out["mask"] = mask.to(torch.float32)
    if include_masked:
        out["masked"] = out["image"] * out["mask"]
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


@functools.cache
def _float_collate_cls() -> type:
    from ray.data.collate_fn import NumpyBatchCollateFn

    class FloatCollate(NumpyBatchCollateFn):
        """``iter_torch_batches(collate_fn=...)``: float model inputs, converted in Ray's prefetch threads."""

        def __init__(self, include_masked: bool = False):
            self.include_masked = include_masked

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            import torch

            out = {k: torch.from_numpy(np.array(v)) for k, v in batch.items() if k not in ("image", "mask")}
            floats = to_float(batch["image"], batch["mask"], self.include_masked)
            return {**out, **{k: torch.from_numpy(v) for k, v in floats.items()}}

    return FloatCollate


def float_collate(include_masked: bool = False) -> Any:
    """A ``NumpyBatchCollateFn`` giving float model inputs (see :func:`to_float_batch`) on the CPU
    (the class is built on first use, so importing this module does not import Ray)."""
    return _float_collate_cls()(include_masked)


def iter_batches(source: Any, batch_size: int, *, drop_last: bool = False, include_masked: bool = False,
                 **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Float model-input batches (CPU tensors) from a training/validation Dataset or a Ray Train dataset shard.
    ``kwargs`` go to ``iter_torch_batches`` (``prefetch_batches``, ``local_shuffle_buffer_size``, ...)."""
    return iter(source.iter_torch_batches(batch_size=batch_size, drop_last=drop_last,
                                          collate_fn=float_collate(include_masked), **kwargs))
