"""Per-sample work of the data pipeline, without Ray: decode, crop/flip, mask pairing, tensors, fixed val pairs.

:mod:`pconv.data.stream` runs these functions inside Ray Data tasks; :func:`pconv.data.stream.load_val_pairs` and the benchmark run
them in-process. Images: the short side is resized to the training size (up or down, aspect kept; JPEGs are
decoded at a reduced scale when possible), then a random square crop (train) or the centre crop (val); random
horizontal flip for training. Masks: a random mask of the :class:`MaskBank` with the paper's training augmentation
(:func:`pconv.core.masks.augment_mask`, nearest resizing only) for training; a fixed mask, centre square and nearest
resize for validation. Output arrays are compact: ``image`` uint8 N x 3 x S x S (0..255), ``mask`` uint8
N x 1 x S x S in {0, 1} (1 = valid), plus ``skipped`` (see :mod:`pconv.data.stream`); :mod:`pconv.data.inputs` makes
the float32 model inputs. Shipping uint8 moves 4x fewer bytes through Ray's object store and to the GPU; the
conversion to float is one cheap op at the consumer (on the GPU in training).

Super-resolution (``task: sr``, paper Sec. 5): the pairing source is an :class:`SRPairs` instead of a mask bank.
Each crop (the same random crop + flip, or centre crop) stays the ``image`` (the HR ground truth); the ``mask`` is
the grid of :func:`pconv.core.sr_grid.sr_grid` (offset floor(K/2)); an extra column ``lr`` uint8 N x 3 x S/K x S/K holds
the crop downsampled by K (:func:`pconv.core.images.downsample`, Pillow bicubic). The model's image input is the canvas
of ``lr`` on the grid (:func:`pconv.data.inputs.to_float_batch`), NOT ``image * mask``: at the grid positions the
net must see the downsampled values, as at inference, while the losses compare with the HR crop.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pconv.core import images
from pconv.core import masks as M
from pconv.storage import shards
from pconv.core.sr_grid import check_scale, sr_grid

log = logging.getLogger(__name__)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash()``)."""
    digest = hashlib.sha1(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ---------------------------------------------------------------------------------------------
# Mask bank
# ---------------------------------------------------------------------------------------------
@dataclass
class MaskBank:
    """All stored mask PNGs of one split in one buffer, sorted by key (index i = i-th key)."""

    buf: np.ndarray        # uint8, concatenated PNG bytes
    offsets: np.ndarray    # int64, len(keys) + 1
    keys: list[str]
    bins: np.ndarray       # int8 paper bin per mask (-1 outside the bins)
    border: np.ndarray     # bool

    def __len__(self) -> int:
        return len(self.keys)

    def png(self, i: int) -> bytes:
        return self.buf[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def mask(self, i: int) -> np.ndarray:
        """Decoded mask i, uint8 H x W, 1 = valid."""
        return M.decode_stored_mask(self.png(i), name=self.keys[i])


def _split_with_rows(root: str, manifest: dict[str, Any], preferred: str) -> str:
    counts = manifest.get("counts", {})
    if int(counts.get(preferred, 0)) > 0:
        return preferred
    other = "train" if preferred == "val" else "val"
    if int(counts.get(other, 0)) > 0:
        return other
    raise ValueError(f"{root}: the manifest lists no rows (counts={counts})")


@dataclass(frozen=True)
class SRPairs:
    """The pairing source of ``task: sr`` (stands where a :class:`MaskBank` / mask URI goes): one "mask", the grid
    of scale K, so ``keys``, ``bins`` and ``border`` answer as a one-mask bank's would."""

    scale: int

    def __post_init__(self) -> None:
        check_scale(self.scale)

    def __len__(self) -> int:
        return 1

    @property
    def keys(self) -> list[str]:
        return [f"sr-grid-x{self.scale}"]

    @property
    def bins(self) -> np.ndarray:
        return np.full(1, -1, dtype=np.int8)

    @property
    def border(self) -> np.ndarray:
        return np.zeros(1, dtype=bool)

    def lr(self, pixels: np.ndarray) -> np.ndarray:
        """The LR image (uint8 ``S/K x S/K x 3``) of an HR crop ``S x S x 3``: :func:`pconv.core.images.downsample`."""
        return images.downsample(pixels, self.scale)

    def grid(self, size: int) -> np.ndarray:
        """The ``size x size`` uint8 grid mask (1 = an LR pixel, :func:`pconv.core.sr_grid.sr_grid`)."""
        return _grid(size, self.scale).copy()


@functools.lru_cache(maxsize=8)
def _grid(size: int, scale: int) -> np.ndarray:
    return sr_grid(size, size, scale)[0, 0].numpy().astype(np.uint8)


def load_mask_bank(masks_uri: "str | SRPairs", split: str = "train") -> "MaskBank | SRPairs":
    """Read every mask of ``split`` (falling back to the other split if it is empty) into a :class:`MaskBank`
    (an :class:`SRPairs` is its own bank)."""
    if isinstance(masks_uri, SRPairs):
        return masks_uri
    manifest = shards.read_manifest(masks_uri, kind=shards.MASKS_KIND)
    split = _split_with_rows(masks_uri, manifest, split)
    table = shards.read_table(shards.shard_uris(masks_uri, manifest, split), ["key", "mask", "bin", "border"])
    table = table.sort_by("key")
    blobs = table.column("mask").to_pylist()
    lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    buf = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    return MaskBank(buf, offsets, table.column("key").to_pylist(), table.column("bin").to_numpy().astype(np.int8),
                    table.column("border").to_numpy(zero_copy_only=False).astype(bool))


# ---------------------------------------------------------------------------------------------
# Per-image transforms (numpy / PIL; no Ray)
# ---------------------------------------------------------------------------------------------
def random_crop_flip(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """Training view: short side -> ``size``, random ``size x size`` crop, horizontal flip with p = 0.5.
    Returns uint8 ``size x size x 3``."""
    img = images.crop_resized(img, size, lambda nw, nh: (int(rng.integers(0, nw - size + 1)),
                                                     int(rng.integers(0, nh - size + 1))))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def center_square_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Validation mask: centre square crop (if not square), nearest resize to ``size``."""
    h, w = mask.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return M.resize_nearest(mask[top:top + side, left:left + side], size)


def _to_chw(pixels: np.ndarray, masks: np.ndarray, bank: "MaskBank | SRPairs | None" = None
            ) -> dict[str, np.ndarray]:
    """uint8 N x S x S x 3 and N x S x S -> uint8 N x 3 x S x S image, N x 1 x S x S mask (+ SR's ``lr``)."""
    out = {"image": np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)), "mask": masks[:, None]}
    if isinstance(bank, SRPairs):
        k, s = bank.scale, pixels.shape[1]
        lr = np.stack([bank.lr(p) for p in pixels]) if len(pixels) else np.empty((0, s // k, s // k, 3), np.uint8)
        out["lr"] = np.ascontiguousarray(lr.transpose(0, 3, 1, 2))
    return out


def _mask_for(bank: "MaskBank | SRPairs", s: int, rng: np.random.Generator | None, index: int = 0) -> np.ndarray:
    """The S x S mask of one sample: SR's grid; a random augmented bank mask (``rng``); or fixed mask ``index``."""
    if isinstance(bank, SRPairs):
        return bank.grid(s)
    if rng is not None:
        return M.augment_mask(bank.mask(int(rng.integers(len(bank)))), rng, s)
    return center_square_mask(bank.mask(index), s)


def _skipped_column(n_out: int, skipped: int) -> np.ndarray:
    col = np.zeros(n_out, dtype=np.int32)
    if n_out:
        col[0] = skipped
    return col


def train_transform(batch: dict[str, np.ndarray], *, image_size: int, base_seed: int,
                    bank: "MaskBank | SRPairs") -> dict[str, np.ndarray]:
    """Training samples from a batch of shard rows (``key``, ``image``, ``_rand``, optional ``pos``): decode +
    crop + flip each image, pair it with a random mask of ``bank`` augmented by :func:`pconv.core.masks.augment_mask`.
    Output rows keep the input order (corrupt rows dropped); ``pos`` rides along when given.

    Row i's randomness comes only from ``(base_seed, _rand[i])``, so results do not depend on batching.
    """
    masks_bank = bank
    keys, blobs, rands = batch["key"], batch["image"], batch["_rand"]
    n = len(keys)
    s = image_size
    pixels = np.empty((n, s, s, 3), dtype=np.uint8)
    masks_out = np.empty((n, s, s), dtype=np.uint8)
    ids, kept = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    ok = skipped = 0
    for i in range(n):
        key = str(keys[i])
        rng = np.random.default_rng([base_seed, int(float(rands[i]) * 2**53)])
        try:
            img = images.open_image(bytes(blobs[i]), draft_size=s, name=key)
            pixels[ok] = random_crop_flip(img, s, rng)
            masks_out[ok] = _mask_for(masks_bank, s, rng)
        except (ValueError, OSError) as exc:
            skipped += 1
            log.warning("training data: skipped corrupt row %s: %s", key, exc)
            continue
        ids[ok], kept[ok] = shards.key_id(key), i
        ok += 1
    if skipped and not ok:
        log.warning("training data: a decode batch of %d rows was entirely corrupt (count not in 'skipped')", n)
    out = _to_chw(pixels[:ok], masks_out[:ok], masks_bank)  # input order (the caller's rows are already in a seeded order)
    out["id"] = ids[:ok]
    out["skipped"] = _skipped_column(ok, skipped)
    if "pos" in batch:  # the data position of each surviving row (pconv.data.plan)
        out["pos"] = np.asarray(batch["pos"], dtype=np.int64)[kept[:ok]]
    return out


def val_transform(batch: dict[str, np.ndarray], *, image_size: int, bank: "MaskBank | SRPairs",
                  pairing: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Validation samples: rows whose key is in ``pairing`` (key -> (index, mask index)), centre crop, fixed mask."""
    masks_bank = bank
    rows = [i for i, k in enumerate(batch["key"]) if str(k) in pairing]
    s = image_size
    pixels = np.empty((len(rows), s, s, 3), dtype=np.uint8)
    masks_out = np.empty((len(rows), s, s), dtype=np.uint8)
    index = np.empty(len(rows), dtype=np.int64)
    mask_index = np.empty(len(rows), dtype=np.int64)
    ok = skipped = 0
    for i in rows:
        key = str(batch["key"][i])
        try:
            pixels[ok] = images.center_crop(images.open_image(bytes(batch["image"][i]), draft_size=s, name=key), s)
        except ValueError as exc:
            skipped += 1
            log.warning("validation data: skipped corrupt row %s: %s", key, exc)
            continue
        index[ok], mask_index[ok] = pairing[key]
        masks_out[ok] = _mask_for(masks_bank, s, None, int(mask_index[ok]))
        ok += 1
    out = _to_chw(pixels[:ok], masks_out[:ok], masks_bank)
    out["index"], out["mask_index"] = index[:ok], mask_index[:ok]
    out["skipped"] = _skipped_column(ok, skipped)
    return out


def val_pairing(image_keys: list[str], n_masks: int, limit: int | None = None) -> dict[str, tuple[int, int]]:
    """key -> (index, mask index): sorted keys (first ``limit``), mask ``(i * stride) mod n_masks``."""
    keys = sorted(image_keys)[: limit if limit is not None else None]
    if n_masks < 1:
        raise ValueError("no masks to pair validation images with")
    stride = max(1, n_masks // max(1, len(keys)))
    return {k: (i, (i * stride) % n_masks) for i, k in enumerate(keys)}
