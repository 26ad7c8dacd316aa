"""The inputs of the evaluation protocol (:mod:`pconv.evaluation.inpainting`): the images, STREAMED in batches; the
test masks with their (hole-ratio bin, border) labels; and the fixed pairing of the two.

Images (:class:`ImageStream`). The keys are listed first and nothing else: a shard root's ``key`` column (its ``val``
split when it has one, else every split), or the file names of a folder / zip / ``s3://`` prefix; sorted, the
first ``limit``. :meth:`ImageStream.batches` then reads and decodes them, ``batch_images`` at a time: with
``limit`` N only those N images are read and decoded, and without a limit at most about two batches of decoded
images are alive at once (Places2's val split is ~29 GB decoded). A shard root is read one row group at a time,
only the row groups that hold listed keys, and only the listed rows of it are decoded; files are read one by one
(a zip stays open for the stream's life and is read member by member). Each image is decoded and cut to the centre
view by :func:`pconv.core.images.center_crop`, the same view as training validation.

Pairing (:func:`build_eval_set`), FIXED: image ``j`` is the j-th listed key; the masks of each (bin, border) group
are sorted by key, and image ``j`` is paired with mask ``j mod len(group)`` of EVERY group. An image that cannot be
read or decoded is logged and listed in ``skipped``, and its pairs are left out without shifting anyone else's, so
the pairs never depend on the order in which the images arrive (shard row groups come in storage order) or on which
other files were readable.

Masks (:func:`load_masks`) are small (12,000 NVIDIA test masks ~ 30 MB encoded): all are listed with their labels,
kept encoded, and decoded per batch (:meth:`EvalSet.mask`). No Ray, no MLflow.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from pconv.core.images import IMAGE_SUFFIXES, center_crop, open_image
from pconv.core.masks import (HOLE_COLORS, HOLE_RATIO_BINS, MASK_SUFFIXES, decode_mask, decode_stored_mask, hole_ratio,
                              ratio_bin, resize_nearest, touches_border)
from pconv.storage import shards, uris
from pconv.storage.sources import Source

log = logging.getLogger(__name__)

DEFAULT_BATCH_IMAGES = 32   # decoded images per batch of the stream: 32 x 512 x 512 x 3 B = 24 MB


# --- Masks -----------------------------------------------------------------------------------------------------
def _shard_rows(root: str, columns: list[str]) -> list[dict[str, Any]]:
    """Rows of every split of a (mask) shard root."""
    manifest = shards.read_manifest(root)
    paths = [u for split in shards.SPLITS for u in shards.shard_uris(root, manifest, split)]
    return shards.read_table(paths, columns).to_pylist()


@dataclass
class MaskRecord:
    key: str
    bin: int
    border: bool
    data: bytes            # encoded mask
    stored: bool           # True: internal polarity PNG (shards); False: raw file with ``hole_color``


def load_masks(uri: str, hole_color: str | None = None, threshold: float = 0.5,
               skipped: list[str] | None = None) -> list[MaskRecord]:
    """Masks with their (bin, border) labels from mask shards, or from raw files (``hole_color`` required);
    unreadable raw files are skipped, logged and appended to ``skipped``."""
    if shards.is_dataset_root(uri):
        rows = _shard_rows(uri, ["key", "mask", "bin", "border"])
        return [MaskRecord(r["key"], int(r["bin"]), bool(r["border"]), r["mask"], True) for r in rows]
    if hole_color not in HOLE_COLORS:
        raise ValueError(f"{uri} holds raw mask files: say their polarity with --hole-color white|black "
                         "(NVIDIA's test masks: white = hole), or ingest them first with pipelines/prepare_data.py")
    out = []
    with Source(uri) as src:
        for item in src.items():
            if not item.key.lower().endswith(MASK_SUFFIXES):
                continue
            try:
                m = decode_mask(data := item.read(), hole_color, threshold, name=f"{uri}:{item.key}")
            except (ValueError, OSError, Image.DecompressionBombError) as exc:
                log.warning("skipped mask %s: %s", item.key, exc)
                (skipped if skipped is not None else []).append(f"{uri}:{item.key}: {exc}")
                continue
            out.append(MaskRecord(item.key, ratio_bin(hole_ratio(m)),
                                  touches_border(m, shards.border_band(*m.shape)), data, False))
    return out


# --- Images, streamed ------------------------------------------------------------------------------------------
class ImageStream:
    """The evaluation images of ``uri``: :attr:`keys` listed when built (sorted, the first ``limit``); pixels read
    and decoded only by :meth:`batches`. Images that cannot be read or decoded are in :attr:`failed` (key ->
    reason) and appended once each to ``skipped``. Close it (or use it as a context manager) when done."""

    def __init__(self, uri: str, image_size: int, limit: int | None = None, *,
                 batch_images: int = DEFAULT_BATCH_IMAGES, skipped: list[str] | None = None):
        self.uri, self.image_size, self.batch_images = uri, image_size, max(1, int(batch_images))
        self.failed: dict[str, str] = {}
        self._skipped = skipped if skipped is not None else []
        self._source: Source | None = None
        self._close: Callable[[], Any] = lambda: None
        if shards.is_dataset_root(uri):
            self._rows = _list_shard_rows(uri)  # [(key, shard uri, row group, row in group)] sorted by key
            self._rows = self._rows[:limit] if limit else self._rows
            self.keys = [r[0] for r in self._rows]
        else:
            self._source = Source(uri)  # kept open: a zip is read member by member while streaming
            self._close = weakref.finalize(self, self._source.close)  # closes once: here, or when collected
            items = sorted((it for it in self._source.items() if it.key.lower().endswith(IMAGE_SUFFIXES)),
                           key=lambda it: it.key)
            self._items = items[:limit] if limit else items
            self.keys = [it.key for it in self._items]
        if not self.keys:
            self.close()
            raise ValueError(f"no images found under {uri}")

    def __len__(self) -> int:
        return len(self.keys)

    def _encoded(self) -> Iterator[tuple[int, str, Callable[[], bytes]]]:
        """(position in :attr:`keys`, key, reader) of every listed image: files in key order; shard rows one row
        group at a time (only the listed rows of the row groups that hold any), by (shard, row group)."""
        if self._source is not None:
            yield from ((j, it.key, it.read) for j, it in enumerate(self._items))
            return
        wanted: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (shard, row group) -> [(row, position)]
        for j, (_, uri, group, row) in enumerate(self._rows):
            wanted.setdefault((uri, group), []).append((row, j))
        for (uri, group), rows in sorted(wanted.items()):  # any order: each image carries its position
            rows.sort()
            table = shards.read_row_group(uri, group, ["key", "image"]).take([r for r, _ in rows])
            for (_, j), key, data in zip(rows, table.column("key").to_pylist(), table.column("image").to_pylist()):
                if key != self.keys[j]:
                    raise ValueError(f"{uri}: row group {group} changed since it was listed ({key!r} where "
                                     f"{self.keys[j]!r} was): the shard does not match its manifest")
                yield j, key, (lambda d=data: d)

    def batches(self) -> Iterator[list[tuple[int, np.ndarray]]]:
        """Lists of up to ``batch_images`` ``(position in keys, uint8 S x S x 3 image)``, read and decoded now."""
        batch: list[tuple[int, np.ndarray]] = []
        for j, key, read in self._encoded():
            name = f"{self.uri}:{key}"
            try:
                batch.append((j, center_crop(open_image(read(), draft_size=self.image_size, name=name),
                                               self.image_size)))
            except (ValueError, OSError) as exc:
                self._fail(key, str(exc) if name in str(exc) else f"{name}: {exc}")
                continue
            if len(batch) == self.batch_images:
                yield batch
                batch = []
        if batch:
            yield batch

    def _fail(self, key: str, reason: str) -> None:
        if key not in self.failed:
            self.failed[key] = reason
            self._skipped.append(reason)
            log.warning("skipped unreadable image %s", reason)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "ImageStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _list_shard_rows(root: str) -> list[tuple[str, str, int, int]]:
    """(key, shard uri, row group, row in group) of the images of a shard root, sorted by key: its ``val`` split
    when it has shards (image datasets ingested for training hold their held-out images there; test sets are all
    ``train``), else every split. Reads the ``key`` column only."""
    manifest = shards.read_manifest(root)
    split = "val" if shards.shard_uris(root, manifest, "val") else None
    if split:
        log.info("%s: evaluating on its 'val' split", root)
    out = []
    for entry in (s for s in manifest["shards"] if split is None or s["split"] == split):
        uri = uris.join(root, entry["path"])
        keys = shards.read_table([uri], ["key"]).column("key").to_pylist()
        sizes = shards.row_groups(uri, entry)
        if sum(sizes) != len(keys):
            raise ValueError(f"{uri}: the manifest lists {sum(sizes)} rows in its row groups, the shard holds "
                             f"{len(keys)}: the shard does not match its manifest")
        starts = np.cumsum([0] + sizes[:-1])
        out.extend((keys[s + i], uri, g, i) for g, (s, n) in enumerate(zip(starts, sizes)) for i in range(n))
    return sorted(out, key=lambda r: r[0])


def load_images(uri: str, image_size: int, limit: int | None = None,
                skipped: list[str] | None = None) -> tuple[list[str], list[np.ndarray]]:
    """Eval images from a shard root (manifest.json; its ``val`` split if it has one) or a folder / zip / s3://
    prefix of image files, IN MEMORY: sorted by key, the first ``limit`` (only those are read); unreadable files
    skipped, logged and appended to ``skipped``. For bounded memory over a large set use :class:`ImageStream`."""
    with ImageStream(uri, image_size, limit, skipped=skipped) as stream:
        got = sorted((item for batch in stream.batches() for item in batch), key=lambda item: item[0])
    if not got:
        raise ValueError(f"none of the {len(stream)} images under {uri} could be decoded: "
                         f"{list(stream.failed.values())[:3]}")
    return [stream.keys[j] for j, _ in got], [image for _, image in got]


# --- The fixed pairs -------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """The images (an :class:`ImageStream`, or decoded arrays in memory: image j = ``images[j]``), the masks by
    group, and the fixed list of (image position, mask record) pairs: group-major, ``len(image_keys)`` per group."""

    image_size: int
    image_keys: list[str]
    images: "ImageStream | list[np.ndarray]"
    pairs: list[tuple[int, MaskRecord]]
    hole_color: str = "white"
    threshold: float = 0.5
    groups: dict[tuple[int, bool], int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "<file>: <reason>" of every unreadable image or mask

    def mask(self, rec: MaskRecord) -> np.ndarray:
        """uint8 S×S mask (1 = valid), nearest-resized."""
        if rec.stored:
            m = decode_stored_mask(rec.data, name=rec.key)
        else:
            m = decode_mask(rec.data, self.hole_color, self.threshold, name=rec.key)
        return m if m.shape == (self.image_size,) * 2 else resize_nearest(m, self.image_size)

    def image_batches(self) -> Iterator[list[tuple[int, np.ndarray]]]:
        """``(image position, uint8 S x S x 3)`` lists, streamed (in any order) when :attr:`images` is a stream."""
        if isinstance(self.images, ImageStream):
            yield from self.images.batches()
            return
        for lo in range(0, len(self.images), DEFAULT_BATCH_IMAGES):
            yield [(j, self.images[j]) for j in range(lo, min(lo + DEFAULT_BATCH_IMAGES, len(self.images)))]

    def pair_indices(self, positions: list[int]) -> list[int]:
        """Indices into :attr:`pairs` of these images' pairs, group by group (the order of :attr:`pairs`)."""
        n = len(self.image_keys)
        return [g * n + j for g in range(len(self.pairs) // n if n else 0) for j in positions]

    @property
    def failed_images(self) -> int:
        return len(self.images.failed) if isinstance(self.images, ImageStream) else 0

    def close(self) -> None:
        if isinstance(self.images, ImageStream):
            self.images.close()


def build_eval_set(images_uri: str, masks_uri: str, image_size: int, limit: int | None = None,
                   hole_color: str | None = None, threshold: float = 0.5,
                   batch_images: int = DEFAULT_BATCH_IMAGES) -> EvalSet:
    """Load the masks, list the images (nothing decoded yet) and fix the pairing (see the module docstring)."""
    skipped: list[str] = []
    records = load_masks(masks_uri, hole_color, threshold, skipped)
    groups: dict[tuple[int, bool], list[MaskRecord]] = {}
    for rec in records:
        if rec.bin >= 0:
            groups.setdefault((rec.bin, rec.border), []).append(rec)
    if not groups:
        raise ValueError(f"no mask under {masks_uri} falls into the paper's hole-ratio bins (0.01, 0.6]")
    stream = ImageStream(images_uri, image_size, limit, batch_images=batch_images, skipped=skipped)
    pairs = []
    for gkey in sorted(groups):
        group = sorted(groups[gkey], key=lambda r: r.key)
        pairs.extend((j, group[j % len(group)]) for j in range(len(stream)))
    missing = [(b, f) for b in range(len(HOLE_RATIO_BINS)) for f in (False, True) if (b, f) not in groups]
    if missing:
        log.warning("no masks for %d (bin, border) cell(s): %s", len(missing), missing)
    return EvalSet(image_size, list(stream.keys), stream, pairs, hole_color or "white", threshold,
                   {k: len(v) for k, v in groups.items()}, skipped)


__all__ = ["DEFAULT_BATCH_IMAGES", "EvalSet", "ImageStream", "MaskRecord", "build_eval_set", "load_images",
           "load_masks"]
