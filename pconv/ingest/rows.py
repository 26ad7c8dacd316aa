"""One input file -> one shard row, or a skip reason: the per-file work of both ingest engines.

:mod:`pconv.ingest.local` (a thread pool in this process) and :mod:`pconv.ingest.job` (Ray Data tasks on the cluster)
both turn each key into a row with the same :class:`RowRecipe`, so a file is read, validated, decoded and turned into
a row the same way whichever engine runs. A broken file raises ValueError (its message is the reason listed in the
manifest). No Ray; bytes are read only through the recipe's :class:`~pconv.storage.sources.EntryReader`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pconv.core import masks
from pconv.core.images import open_image_with_format
from pconv.storage.shards import IMAGES_KIND, border_band, mask_row, split_of
from pconv.storage.sources import EntryReader, SourceError


#: Smallest short side (px) of an ingested image or mask; smaller files are skipped and counted. Such files hold
#: no texture or hole shape worth training on (every training crop, 256-512 px in the paper, would be upsampled
#: 8x or more from them), and 1x1 files are placeholders or tracking pixels, not photos.
MIN_SIDE = 32


#: Per-row values the end of a run looks at (mask bins, border flags, polarity check); everything else stays in
#: the shards.
STATS_COLUMNS = ("hole_ratio", "bin", "border")


def skip_reason(exc: Exception) -> str:
    """The reason listed in the manifest for a file that raised ``exc`` (ValueError: the message alone)."""
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"


def unsupported(key: str, suffixes: tuple[str, ...]) -> str | None:
    """The skip reason of a file whose extension is not one of ``suffixes``; None when it is."""
    ext = os.path.splitext(key)[1].lower()
    return None if ext in suffixes else (f"unsupported file type {ext or '(no extension)'!r} "
                                         f"(expected one of {', '.join(suffixes)})")


def _check_size(width: int, height: int, what: str) -> None:
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"{what} is {width}x{height} px, below the minimum of {MIN_SIDE} px on the short side")


def process_image(key: str, data: bytes, val_fraction: float, max_side: int | None) -> dict[str, Any]:
    """Validate one encoded image (full decode) and build its shard row; ValueError on a broken file."""
    img, fmt = open_image_with_format(data, name=key)
    out_bytes = data
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        fmt = fmt if fmt in ("jpeg", "webp") else "png"
        img.save(buf, format=fmt.upper(), **({} if fmt == "png" else {"quality": 95}))
        out_bytes = buf.getvalue()
    _check_size(img.width, img.height, "image")
    return {"key": key, "image": out_bytes, "height": img.height, "width": img.width, "format": fmt,
            "split": split_of(key, val_fraction)}


def process_mask(key: str, data: bytes, hole_color: str, threshold: float, src: str,
                 val_fraction: float) -> dict[str, Any]:
    """Decode one mask file in the FILE's polarity ``hole_color`` and build its shard row; ValueError if broken."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    mask = masks.decode_mask(data, hole_color, threshold, name=key)
    _check_size(mask.shape[1], mask.shape[0], "mask")
    return mask_row(key, mask, src, split_of(key, val_fraction))


def generated_key(i: int, n: int) -> str:
    return f"generated/{i:0{max(5, len(str(n - 1)))}d}.png"


def generated_mask_row(i: int, n: int, size: int, seed: int, val_fraction: float) -> dict[str, Any]:
    """Shard row of generated mask ``i`` of ``n``: bin ``i % 6``, border flag alternating every 6 masks, RNG
    ``default_rng([seed, i])`` (reproducible whatever process or thread makes it)."""
    nbins = len(masks.HOLE_RATIO_BINS)
    mask = masks.generate_mask(size, np.random.default_rng([seed, i]), bin_index=i % nbins,
                           border=bool((i // nbins) % 2), band=border_band(size, size))
    key = generated_key(i, n)
    return mask_row(key, mask, f"generated(seed={seed},size={size})", split_of(key, val_fraction))


@dataclass(frozen=True)
class RowRecipe:
    """What a run makes of each key, in any process (pickled into the Ray engine's tasks): where its bytes come from
    (``reader``; None for generated masks) and which of this module's functions turns them into a row."""

    kind: str  # pconv.storage.shards.IMAGES_KIND | MASKS_KIND
    val_fraction: float
    reader: EntryReader | None = None
    max_side: int | None = None  # images: downscale above this side
    hole_color: str = "white"  # masks: the FILES' polarity
    threshold: float = 0.5
    source: str = ""  # masks: the source URI, stored in each row
    generate: tuple[int, int, int] | None = None  # generated masks: (n, size, seed)

    def make(self, key: str) -> dict[str, Any] | str:
        """The shard row of ``key``, or the reason it is skipped (a broken or unreadable file). A
        :class:`~pconv.storage.sources.SourceError` (the source itself is not there) is raised: a problem of the
        run, not of one file."""
        try:
            if self.generate is not None:
                n, size, seed = self.generate
                return generated_mask_row(int(key.rsplit("/", 1)[1][:-4]), n, size, seed, self.val_fraction)
            data = self.reader.read(key)
            if self.kind == IMAGES_KIND:
                return process_image(key, data, self.val_fraction, self.max_side)
            return process_mask(key, data, self.hole_color, self.threshold, self.source, self.val_fraction)
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run; it is listed instead
            return skip_reason(exc)
