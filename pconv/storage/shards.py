"""Shard format: Parquet schemas, the shard writer, the manifest, and helpers shared by writer and readers.

Per-file reads do not scale on S3 (listing and request costs, throttling), so images and masks are packed once
(:mod:`pconv.ingest.local`, ``pipelines/prepare_data.py``) into Parquet shards of a few hundred MB and streamed from
there (:mod:`pconv.data.stream`).

Layout of a dataset root ``DST`` (local folder or ``s3://`` prefix)::

    DST/manifest.json                          written LAST; the only entry point for readers
    DST/train/part-00000-<run>.parquet ...     rows whose key hashes into the training split
    DST/val/part-00000-<run>.parquet ...       rows whose key hashes into the validation split

Image rows: ``key`` (path relative to SRC), ``image`` (the ORIGINAL encoded bytes; re-encoded only when
``max_side`` shrinks the image), ``height``/``width`` (after EXIF orientation), ``format``, ``split``.
Mask rows: ``key``, ``mask`` (compact 1-bit PNG in the internal polarity, white = valid), ``height``, ``width``,
``hole_ratio``, ``bin`` (paper bin 0..5, -1 outside), ``border`` (holes within the border band), ``source``, ``split``.

``manifest.json``: ``schema_version``, ``kind`` (images|masks: :data:`IMAGES_KIND`, :data:`MASKS_KIND`), ``source``,
``created``, ``run_id``, ``counts`` per split, ``total_bytes``, ``columns``, ``shards`` ([{path relative to DST,
split, rows, bytes, row_groups}]; ``row_groups`` lists the rows of each Parquet row group, the unit that
:mod:`pconv.data.stream` reads and decodes in one task — optional, readers fall back to the Parquet footer),
``skipped_count``, ``skipped`` ([{key, reason}]), ``options``; mask manifests add ``bins`` (counts per bin and
border flag; ``"-1"``: in no paper bin) and ``out_of_bins`` (how many masks are in no paper bin, all-valid and
all-hole masks included). Every reader goes through :func:`read_manifest` (schema version and kind checked there).
A writer keeps the shards of the manifest it replaces (:func:`remove_unlisted_shards` spares them) until the next
run or ``prepare_data.py cleanup``, so a reader can finish with the manifest it read.

The train/val split is a stable hash of the key (sha1, not Python's salted ``hash()``), so it does not depend
on the order, the machine or the other files.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import threading
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pconv.core import masks
from pconv.storage import uris

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
IMAGES_KIND, MASKS_KIND = "images", "masks"  # the manifest's ``kind``

IMAGE_SCHEMA = pa.schema([
    ("key", pa.string()), ("image", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
    ("format", pa.string()), ("split", pa.string()),
])
MASK_SCHEMA = pa.schema([
    ("key", pa.string()), ("mask", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
    ("hole_ratio", pa.float32()), ("bin", pa.int8()), ("border", pa.bool_()), ("source", pa.string()),
    ("split", pa.string()),
])
# Row groups are the unit of work of the training stream (one read + decode task each): ~4 MB (one efficient
# S3 ranged GET, ~20-40 full-size photos) and at most 256 rows (~2-4 s of decoding), so a dataset of any image
# size splits into enough similar-sized tasks to keep every data CPU busy.
ROW_GROUP_BYTES = 4 * 2**20
ROW_GROUP_MAX_ROWS = 256


# ---------------------------------------------------------------------------------------------
# Small pure helpers (also used by pconv.data.stream)
# ---------------------------------------------------------------------------------------------
def key_hash01(key: str) -> float:
    """Stable uniform number in [0, 1) from a key (sha1), independent of process and platform."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def key_id(key: str) -> int:
    """Stable signed 64-bit id of a key (rides along in training batches so tests/debugging can see order)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big", signed=True)


def split_of(key: str, val_fraction: float) -> str:
    """Deterministic train/val assignment by key hash."""
    return "val" if key_hash01(key) < val_fraction else "train"


def border_band(height: int, width: int) -> int:
    """The paper's 50-px border band (defined for 512 x 512), scaled to the mask's short side."""
    return max(1, round(masks.BORDER_BAND * min(height, width) / 512))


# ---------------------------------------------------------------------------------------------
# Writer and manifest
# ---------------------------------------------------------------------------------------------
def shard_name(index: int, run_id: str) -> str:
    return f"part-{index:05d}-{run_id}.parquet"


class ShardWriter:
    """Buffers rows of one split and writes a Parquet shard whenever ``target_bytes`` of payload accumulate."""

    def __init__(self, dst: str, split: str, schema: pa.Schema, target_bytes: int, run_id: str,
                 payload_column: str, first_index: int = 0):
        self.first_index = first_index  # shard numbers start here (writers of one run in several tasks)
        self.dst, self.split, self.schema = dst, split, schema
        self.target_bytes, self.run_id, self.payload = max(1, int(target_bytes)), run_id, payload_column
        self.rows: list[dict[str, Any]] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.buffered += len(row[self.payload]) + 64
        if self.buffered >= self.target_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        rows_per_group = max(1, min(len(self.rows), ROW_GROUP_MAX_ROWS,
                                    int(ROW_GROUP_BYTES / max(1, self.buffered / len(self.rows)))))
        buf = io.BytesIO()
        # Payload bytes are already compressed (JPEG/PNG/WebP): store them as-is; metadata columns get zstd.
        compression = {name: ("NONE" if name == self.payload else "ZSTD") for name in self.schema.names}
        pq.write_table(table, buf, row_group_size=rows_per_group, compression=compression,
                       use_dictionary=[n for n in self.schema.names if n != self.payload])
        data = buf.getvalue()
        rel = f"{self.split}/{shard_name(self.first_index + len(self.shards), self.run_id)}"
        uris.write_bytes_atomic(uris.join(self.dst, rel), data)
        groups = [min(rows_per_group, len(self.rows) - i) for i in range(0, len(self.rows), rows_per_group)]
        self.shards.append({"path": rel, "split": self.split, "rows": len(self.rows), "bytes": len(data),
                            "row_groups": groups})
        log.debug("wrote %s (%d rows, %d bytes)", rel, len(self.rows), len(data))
        self.rows, self.buffered = [], 0


def read_manifest(root: str, kind: str | None = None) -> dict[str, Any]:
    """The manifest of a shard root. FileNotFoundError naming the URI if absent; ValueError if unusable or, with
    ``kind``, of another kind (:data:`IMAGES_KIND`, :data:`MASKS_KIND`)."""
    uri = uris.join(root, MANIFEST)
    try:
        manifest = json.loads(uris.read_bytes(uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no manifest; create shards with `python pipelines/prepare_data.py`") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not valid JSON ({exc})") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{uri}: schema_version {manifest.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    if kind is not None and manifest.get("kind") != kind:
        raise ValueError(f"{root}: manifest kind is {manifest.get('kind')!r}, expected {kind!r}")
    return manifest


def current_manifest(root: str) -> dict[str, Any] | None:
    """The manifest at ``root`` for a writer about to replace it: None when there is none or it is unreadable."""
    try:
        manifest = read_manifest(root)
    except (FileNotFoundError, ValueError):
        return None
    return manifest if isinstance(manifest.get("shards"), list) else None


def remove_unlisted_shards(root: str, keep: set[str]) -> list[str]:
    """Delete ``part-*.parquet`` files under ``root/train`` and ``root/val`` whose path (relative to ``root``) is
    not in ``keep``, and the temporary files of shard writes that never finished (``.part-*.tmp``, left by a
    killed writer; one writer per root, so none is in progress); other files are left alone. Returns the removed
    relative paths."""
    removed = []
    for split in SPLITS:
        try:
            files = uris.list_files(uris.join(root, split))
        except FileNotFoundError:
            continue
        for f in files:
            name = f.rsplit('/', 1)[-1]
            rel = f"{split}/{name}"
            stale = name.startswith("part-") and name.endswith(".parquet") and rel not in keep
            if stale or (name.startswith(".part-") and name.endswith(".tmp")):
                uris.delete(f)
                removed.append(rel)
    return removed


def is_dataset_root(uri: str) -> bool:
    """True when ``uri`` is a shard root (it holds a manifest); a ``.zip`` file never is."""
    return not uri.lower().endswith(".zip") and uris.exists(uris.join(uri, MANIFEST))


def shard_uris(root: str, manifest: dict[str, Any] | None = None, split: str = "train") -> list[str]:
    """URIs of the shards of one split, in manifest order (paths in the manifest are relative to ``root``)."""
    manifest = manifest if manifest is not None else read_manifest(root)
    return [uris.join(root, s["path"]) for s in manifest["shards"] if s["split"] == split]


def read_table(shard_uris: list[str], columns: list[str]) -> pa.Table:
    """Selected columns of several shards (all local or all S3) as one table, read without Ray."""
    if not shard_uris:
        return pa.table({c: [] for c in columns})
    fs, paths = uris.ray_paths(shard_uris)
    return pa.concat_tables([pq.read_table(p, filesystem=fs, columns=columns) for p in paths])


def row_groups(uri: str, entry: dict[str, Any] | None = None) -> list[int]:
    """Rows per Parquet row group of one shard: from its manifest ``entry`` when recorded, else the footer."""
    if entry is not None and entry.get("row_groups"):
        return [int(n) for n in entry["row_groups"]]
    fs, path = uris.get_filesystem(uri)
    meta = pq.read_metadata(path, filesystem=fs)
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


_FOOTER_CACHE_SIZE = 256  # shard footers kept per process (~1 KB per row group each; shards are immutable)
_footers: "collections.OrderedDict[tuple[str, int], pq.FileMetaData]" = collections.OrderedDict()
_footers_lock = threading.Lock()


def forget_footers() -> None:
    """Drop this process's cached shard footers: the next read of each shard reads its footer again, as in a new
    process (tests count footer reads with it)."""
    with _footers_lock:
        _footers.clear()


def _footer(uri: str, f: pa.NativeFile) -> pq.FileMetaData:
    """The Parquet footer of an open shard, read once per process and shard: shards are written once under
    unique names and never modified, so (uri, size) identifies the footer. Saves one ranged GET per row group."""
    key = (uri, f.size())
    with _footers_lock:
        meta = _footers.get(key)
        if meta is not None:
            _footers.move_to_end(key)
            return meta
    meta = pq.read_metadata(f)
    with _footers_lock:
        _footers[key] = meta
        while len(_footers) > _FOOTER_CACHE_SIZE:
            _footers.popitem(last=False)
    return meta


def read_row_group(uri: str, index: int, columns: list[str]) -> pa.Table:
    """Selected columns of row group ``index`` of one shard (local or S3). On S3: one HEAD and one coalesced
    ranged GET per call, plus one footer GET the first time this process reads the shard."""
    fs, path = uris.get_filesystem(uri)

    def read() -> pa.Table:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f, metadata=_footer(uri, f), pre_buffer=True)
            if not 0 <= index < parquet.num_row_groups:
                raise ValueError(f"{uri}: no row group {index} (the shard has {parquet.num_row_groups}); "
                                 "the manifest does not match the shard")
            return parquet.read_row_group(index, columns=columns)

    try:
        return uris.retry_ranged_read(uri, read)  # S3 errors the SDK does not retry itself (uris.SDK_TRANSIENT_ERRORS)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: shard listed in the manifest is missing") from exc
    except pa.ArrowInvalid as exc:
        raise ValueError(f"{uri}: not a readable Parquet shard ({exc})") from exc


def mask_row(key: str, mask: np.ndarray, source: str, split: str) -> dict[str, Any]:
    """Shard row of a binary mask (uint8 H x W, 1 = valid): compact PNG + ratio, paper bin, border flag."""
    h, w = mask.shape
    ratio = masks.hole_ratio(mask)
    return {"key": key, "mask": masks.encode_mask_png(mask), "height": h, "width": w, "hole_ratio": ratio,
            "bin": masks.ratio_bin(ratio), "border": masks.touches_border(mask, border_band(h, w)), "source": source,
            "split": split}
