"""Per-sample work of the data pipeline, without Ray: decode, crop/flip, the pairing of each crop, fixed val pairs.

:mod:`pconv.data.stream` runs these functions inside Ray Data tasks (training) and in-process (the validation pairs).
Images: the short side is resized to the training size (up or down, aspect kept; JPEGs are decoded at a reduced
scale when possible), then a random square crop (train) or the centre crop (val); random horizontal flip for
training. Output arrays are compact: ``image`` uint8 N x 3 x S x S (0..255), ``mask`` uint8 N x 1 x S x S in {0, 1}
(1 = valid), plus ``skipped`` (see :mod:`pconv.data.stream`) and the pair source's own columns;
:mod:`pconv.data.inputs` makes the float32 model inputs. Shipping uint8 moves 4x fewer bytes through Ray's object
store and to the GPU; the conversion to float is one cheap op at the consumer (on the GPU in training).

Pairing. Every crop is paired by a :class:`PairSource`, the one interface of both tasks (the training loop picks the
task's: :class:`SRPairs` or :func:`load_mask_bank`):

- inpainting, :class:`MaskBank`: a random mask of the split's mask shards with the paper's training augmentation
  (:func:`pconv.core.masks.augment_mask`, nearest resizing only) for training; a fixed mask, centre square and
  nearest resize, for validation. No extra columns.
- super-resolution (``task: sr``, paper Sec. 5), :class:`SRPairs`: each crop stays the ``image`` (the HR ground
  truth); the ``mask`` is the grid of :func:`pconv.core.sr_grid.sr_grid` (offset floor(K/2)) for training and
  validation alike; the extra column ``lr`` uint8 N x 3 x S/K x S/K holds the crop downsampled by K
  (:func:`pconv.core.images.downsample`, Pillow bicubic). The model's image input is the canvas of ``lr`` on the
  grid (:func:`pconv.data.inputs.net_input`), NOT ``image * mask``: at the grid positions the net must see the
  downsampled values, as at inference, while the losses compare with the HR crop.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pconv.core import images, masks
from pconv.core.sr_grid import check_scale, grid_mask
from pconv.storage import shards

log = logging.getLogger(__name__)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash()``)."""
    digest = hashlib.sha1(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ---------------------------------------------------------------------------------------------
# Pair sources: what each crop is paired with
# ---------------------------------------------------------------------------------------------
class PairSource(abc.ABC):
    """What a crop is paired with, for training and validation, and the columns the pairing adds to its rows.

    Implementations are small picklable values (a training worker puts its one into Ray's object store once and
    every read/decode task samples from it)."""

    #: True when each validation pair has a mask of its own (inpainting); False when every pair has the same one
    #: (SR's grid), so a sample grid need not show it.
    mask_varies: bool = True

    @abc.abstractmethod
    def train_mask(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """The uint8 ``size x size`` mask (1 = valid) of one training crop; every random draw from ``rng``."""

    @property
    @abc.abstractmethod
    def n_val_masks(self) -> int:
        """How many fixed validation masks there are (validation images are spread over them, :func:`val_pairing`)."""

    @abc.abstractmethod
    def val_mask(self, size: int, index: int) -> np.ndarray:
        """The uint8 ``size x size`` mask (1 = valid) of fixed validation mask ``index`` (< :attr:`n_val_masks`)."""

    @abc.abstractmethod
    def describe(self, index: int) -> str:
        """What fixed validation mask ``index`` is (a mask key; SR: its grid)."""

    def extra_columns(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """The columns the pairing adds to the rows of uint8 ``N x S x S x 3`` crops (default: none)."""
        return {}


@dataclass
class MaskBank(PairSource):
    """Inpainting's pair source: all stored mask PNGs of one split in one buffer, sorted by key (index i = i-th key)."""

    buf: np.ndarray        # uint8, concatenated PNG bytes
    offsets: np.ndarray    # int64, len(keys) + 1
    keys: list[str]
    bins: np.ndarray       # int8 paper bin per mask (-1 outside the bins)
    border: np.ndarray     # bool

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:  # not the arrays: it is logged
        return f"MaskBank({len(self)} masks, {self.buf.nbytes / 1e6:.1f} MB)"

    def png(self, i: int) -> bytes:
        return self.buf[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def mask(self, i: int) -> np.ndarray:
        """Decoded mask i, uint8 H x W, 1 = valid."""
        return masks.decode_stored_mask(self.png(i), name=self.keys[i])

    def train_mask(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """A random mask of the bank with the paper's augmentation (:func:`pconv.core.masks.augment_mask`)."""
        return masks.augment_mask(self.mask(int(rng.integers(len(self)))), rng, size)

    @property
    def n_val_masks(self) -> int:
        return len(self)

    def val_mask(self, size: int, index: int) -> np.ndarray:
        """Mask ``index`` as is: centre square, nearest resize (:func:`center_square_mask`)."""
        return center_square_mask(self.mask(index), size)

    def describe(self, index: int) -> str:
        return self.keys[index]


@dataclass(frozen=True)
class SRPairs(PairSource):
    """Super-resolution's pair source (``task: sr``): every crop's mask is the grid of scale K, and its rows carry
    the crop downsampled by K (column ``lr``)."""

    scale: int
    mask_varies = False  # one grid for every pair

    def __post_init__(self) -> None:
        check_scale(self.scale)

    def lr(self, pixels: np.ndarray) -> np.ndarray:
        """The LR image (uint8 ``S/K x S/K x 3``) of an HR crop ``S x S x 3``: :func:`pconv.core.images.downsample`."""
        return images.downsample(pixels, self.scale)

    def grid(self, size: int) -> np.ndarray:
        """The ``size x size`` uint8 grid mask (1 = an LR pixel, :func:`pconv.core.sr_grid.grid_mask`)."""
        return _grid(size, self.scale).copy()

    def train_mask(self, size: int, rng: np.random.Generator) -> np.ndarray:
        return self.grid(size)

    @property
    def n_val_masks(self) -> int:
        return 1

    def val_mask(self, size: int, index: int) -> np.ndarray:
        return self.grid(size)

    def describe(self, index: int) -> str:
        return f"sr-grid-x{self.scale}"

    def extra_columns(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """``lr``: uint8 ``N x 3 x S/K x S/K``, each crop downsampled by K."""
        k, s = self.scale, crops.shape[1]
        lr = np.stack([self.lr(p) for p in crops]) if len(crops) else np.empty((0, s // k, s // k, 3), np.uint8)
        return {"lr": np.ascontiguousarray(lr.transpose(0, 3, 1, 2))}


@functools.lru_cache(maxsize=8)
def _grid(size: int, scale: int) -> np.ndarray:
    return grid_mask(size, size, scale)


def _split_with_rows(root: str, manifest: dict[str, Any], preferred: str) -> str:
    counts = manifest.get("counts", {})
    if int(counts.get(preferred, 0)) > 0:
        return preferred
    other = "train" if preferred == "val" else "val"
    if int(counts.get(other, 0)) > 0:
        return other
    raise ValueError(f"{root}: the manifest lists no rows (counts={counts})")


def load_mask_bank(masks_uri: str, split: str = "train") -> MaskBank:
    """Read every mask of ``split`` (falling back to the other split if it is empty) into a :class:`MaskBank`."""
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
    return masks.resize_nearest(mask[top:top + side, left:left + side], size)


def _rows(pixels: np.ndarray, hole_masks: np.ndarray, pairs: PairSource) -> dict[str, np.ndarray]:
    """uint8 N x S x S x 3 crops and their N x S x S masks -> uint8 N x 3 x S x S ``image``, N x 1 x S x S
    ``mask`` and the pair source's columns."""
    return {"image": np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)), "mask": hole_masks[:, None],
            **pairs.extra_columns(pixels)}


def _skipped_column(n_out: int, skipped: int) -> np.ndarray:
    col = np.zeros(n_out, dtype=np.int32)
    if n_out:
        col[0] = skipped
    return col


def train_transform(batch: dict[str, np.ndarray], *, image_size: int, base_seed: int,
                    pairs: PairSource) -> dict[str, np.ndarray]:
    """Training samples from a batch of shard rows (``key``, ``image``, ``_rand``, optional ``pos``): decode +
    crop + flip each image, pair it (:meth:`PairSource.train_mask`, :meth:`PairSource.extra_columns`).
    Output rows keep the input order (corrupt rows dropped); ``pos`` rides along when given.

    Row i's randomness comes only from ``(base_seed, _rand[i])``, so results do not depend on batching.
    """
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
            masks_out[ok] = pairs.train_mask(s, rng)
        except (ValueError, OSError) as exc:
            skipped += 1
            log.warning("training data: skipped corrupt row %s: %s", key, exc)
            continue
        ids[ok], kept[ok] = shards.key_id(key), i
        ok += 1
    if skipped and not ok:
        log.warning("training data: a decode batch of %d rows was entirely corrupt (count not in 'skipped')", n)
    out = _rows(pixels[:ok], masks_out[:ok], pairs)  # input order (the caller's rows are already in a seeded order)
    out["id"] = ids[:ok]
    out["skipped"] = _skipped_column(ok, skipped)
    if "pos" in batch:  # the data position of each surviving row (pconv.data.plan)
        out["pos"] = np.asarray(batch["pos"], dtype=np.int64)[kept[:ok]]
    return out


def val_transform(batch: dict[str, np.ndarray], *, image_size: int, pairs: PairSource,
                  pairing: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Validation samples: rows whose key is in ``pairing`` (key -> (index, mask index)), centre crop, fixed mask
    (:meth:`PairSource.val_mask`)."""
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
        masks_out[ok] = pairs.val_mask(s, int(mask_index[ok]))
        ok += 1
    out = _rows(pixels[:ok], masks_out[:ok], pairs)
    out["index"], out["mask_index"] = index[:ok], mask_index[:ok]
    out["skipped"] = _skipped_column(ok, skipped)
    return out


def val_pairing(image_keys: list[str], n_masks: int, limit: int | None = None) -> dict[str, tuple[int, int]]:
    """key -> (index, mask index): sorted keys (first ``limit``), mask ``(i * stride) mod n_masks`` with stride
    ``max(1, n_masks // n)``: spread over the whole mask set, so every hole-ratio bin of the NVIDIA set appears."""
    keys = sorted(image_keys)[: limit if limit is not None else None]
    if n_masks < 1:
        raise ValueError("no masks to pair validation images with")
    stride = max(1, n_masks // max(1, len(keys)))
    return {k: (i, (i * stride) % n_masks) for i, k in enumerate(keys)}
