"""Ingestion: folders / zips / s3:// prefixes of images or masks (or generated masks) -> shards + manifest.

The shard format lives in :mod:`pconv.shards`; ``pipelines/prepare_data.py`` is the CLI over this module.

- Every input file is decoded once to validate it. Broken input (truncated JPEG, non-image, empty object,
  unreadable PNG) and files with other extensions are skipped, counted and listed in the manifest with a reason;
  the rest is ingested. Problems found BEFORE any work (missing SRC, unwritable DST, bad option) raise
  :class:`IngestError`.
- Files are processed in key-hash order (deterministic), which mixes folders/classes across shards (sorted
  listings of Places2-like trees would otherwise give one class per shard); reading/decoding runs on a thread pool
  (I/O bound on S3), results are consumed in order, so shard contents do not depend on thread timing.

Re-running is safe. Every run writes shards under names carrying a fresh run id (``part-00000-<run>``), each one
atomically (temp file + rename locally, a single PUT on S3); the manifest is replaced last, atomically; only then
are older ``part-*.parquet`` files under ``DST/train`` and ``DST/val`` that the new manifest does not list deleted.
A reader therefore always sees a complete manifest whose shards all exist, and a run that dies half-way leaves
the previous dataset intact (its orphan shards are removed by the next successful run). One writer per DST.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from pconv import masks as M
from pconv import storage
from pconv.images import IMAGE_SUFFIXES, open_image_with_format
from pconv.masks import MASK_SUFFIXES
from pconv.sources import Source, SourceError, SourceItem
from pconv.shards import (IMAGE_SCHEMA, MANIFEST, MASK_SCHEMA, SCHEMA_VERSION, SPLITS,
                          ShardWriter, border_band, key_hash01, mask_row, split_of)

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """A problem found BEFORE any work (missing source, unwritable destination, bad option)."""


def open_source(uri: str) -> Source:
    """:class:`pconv.sources.Source` with its problems (missing, unreadable, not a zip) as :class:`IngestError`."""
    try:
        return Source(uri)
    except SourceError as exc:
        raise IngestError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# Destination checks and stale shards
# ---------------------------------------------------------------------------------------------
def check_writable(dst: str) -> None:
    """Fail early (IngestError) when DST cannot be written: probe object/file written and removed."""
    probe = storage.join(dst, f".pconv-write-probe-{secrets.token_hex(4)}")
    try:
        if not storage.is_remote(dst):
            p = Path(dst).expanduser()
            if p.exists() and not p.is_dir():
                raise IngestError(f"destination {dst} exists and is not a directory")
            storage.makedirs(dst)
        storage.write_bytes_atomic(probe, b"")
        storage.delete(probe)
    except IngestError:
        raise
    except Exception as exc:  # noqa: BLE001 - permission, missing bucket, endpoint down ...
        raise IngestError(f"destination {dst} is not writable: {type(exc).__name__}: {exc}") from exc


def _remove_stale_shards(dst: str, keep: set[str]) -> list[str]:
    removed = []
    for split in SPLITS:
        base = storage.join(dst, split)
        try:
            files = storage.list_files(base, suffixes=(".parquet",))
        except FileNotFoundError:
            continue
        for f in files:
            name = f.rsplit("/", 1)[-1]
            if name.startswith("part-") and f"{split}/{name}" not in keep:
                storage.delete(f)
                removed.append(f"{split}/{name}")
    return removed


# ---------------------------------------------------------------------------------------------
# Ingestion driver shared by images / masks / generated masks
# ---------------------------------------------------------------------------------------------
@dataclass
class IngestSummary:
    kind: str
    dst: str
    counts: dict[str, int]
    skipped: list[dict[str, str]]
    shards: int
    bytes: int
    seconds: float
    manifest_uri: str
    removed_stale: list[str] = field(default_factory=list)

    @property
    def ingested(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        """The closing summary line printed by the pipeline."""
        return (f"{self.kind}: ingested {self.ingested} (train {self.counts.get('train', 0)}, "
                f"val {self.counts.get('val', 0)}), skipped {len(self.skipped)}, shards {self.shards}, "
                f"bytes {self.bytes}, seconds {self.seconds:.1f} -> {self.manifest_uri}")


def _ordered_parallel(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool with a bounded window, results in input order."""
    window = max(1, workers * 4)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pconv-ingest") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _default_workers(remote: bool) -> int:
    cpus = os.cpu_count() or 1
    return min(32, cpus * 4) if remote else min(8, cpus + 1)


def _run_ingest(*, kind: str, dst: str, keys_and_work: list[tuple[str, Callable[[], dict | str]]],
                schema: pa.Schema, payload: str, shard_size_mb: float, source: str, options: dict[str, Any],
                workers: int, progress: bool, extra_manifest: Callable[[list[dict]], dict] | None = None,
                ) -> IngestSummary:
    """Run ``work()`` per key (row dict, or a skip reason string), write shards per split, then the manifest."""
    t0 = time.monotonic()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    target = int(shard_size_mb * 2**20)
    writers = {s: ShardWriter(dst, s, schema, target, run_id, payload) for s in SPLITS}
    skipped: list[dict[str, str]] = []
    stats_rows: list[dict] = []
    # Hash order: deterministic, and it spreads folders/classes over all shards.
    ordered = sorted(keys_and_work, key=lambda kw: (key_hash01(kw[0]), kw[0]))

    def do(kw):
        key, work = kw
        try:
            return key, work()
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run; it is listed instead
            return key, str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"

    from tqdm import tqdm

    bar = tqdm(total=len(ordered), desc=f"ingest {kind}", unit="file", disable=not progress, dynamic_ncols=True)
    try:
        for key, result in _ordered_parallel(do, ordered, workers):
            bar.update(1)
            if isinstance(result, str):
                skipped.append({"key": key, "reason": result})
                log.warning("skipped %s: %s", key, result)
                continue
            writers[result["split"]].add(result)
            if extra_manifest is not None:
                stats_rows.append({k: v for k, v in result.items() if k != payload})
    finally:
        bar.close()
    for w in writers.values():
        w.flush()
    shards = [s for split in SPLITS for s in writers[split].shards]
    counts = {s: sum(x["rows"] for x in writers[s].shards) for s in SPLITS}
    total_bytes = sum(s["bytes"] for s in shards)
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "kind": kind, "source": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_id": run_id,
        "counts": counts, "total_bytes": total_bytes, "columns": schema.names, "shards": shards,
        "skipped_count": len(skipped), "skipped": sorted(skipped, key=lambda s: s["key"]), "options": options,
    }
    if extra_manifest is not None:
        manifest.update(extra_manifest(stats_rows))
    manifest_uri = storage.join(dst, MANIFEST)
    storage.write_bytes_atomic(manifest_uri, json.dumps(manifest, indent=1).encode())
    removed = _remove_stale_shards(dst, {s["path"] for s in shards})
    if removed:
        log.info("removed %d shard(s) of an earlier ingestion: %s", len(removed), removed[:5])
    if sum(counts.values()) == 0:
        log.warning("%s: nothing was ingested from %s (%d file(s) skipped)", kind, source, len(skipped))
    return IngestSummary(kind, dst, counts, manifest["skipped"], len(shards), total_bytes,
                         time.monotonic() - t0, manifest_uri, removed)


def _check_common(val_fraction: float, shard_size_mb: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise IngestError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not shard_size_mb > 0:
        raise IngestError(f"--shard-size-mb must be positive, got {shard_size_mb}")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def _unsupported(key: str, suffixes: tuple[str, ...]) -> str | None:
    ext = os.path.splitext(key)[1].lower()
    if ext not in suffixes:
        return f"unsupported file type {ext or '(no extension)'!r} (expected one of {', '.join(suffixes)})"
    return None


def process_image(key: str, data: bytes, val_fraction: float, max_side: int | None) -> dict[str, Any]:
    """Validate one encoded image (full decode) and build its shard row; ValueError on a broken file."""
    img, fmt = open_image_with_format(data, name=key)
    out_bytes = data
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        if fmt == "jpeg":
            img.save(buf, format="JPEG", quality=95)
        elif fmt == "webp":
            img.save(buf, format="WEBP", quality=95)
        else:
            img.save(buf, format="PNG")
            fmt = "png"
        out_bytes = buf.getvalue()
    return {"key": key, "image": out_bytes, "height": img.height, "width": img.width, "format": fmt,
            "split": split_of(key, val_fraction)}


def ingest_images(src: str, dst: str, *, val_fraction: float = 0.01, shard_size_mb: float = 256.0,
                  max_side: int | None = None, workers: int | None = None, progress: bool = True) -> IngestSummary:
    """Pack every JPEG/PNG/WebP under ``src`` into image shards at ``dst`` (see the module docstring).

    Broken files (truncated, not an image, empty, unreadable) and files with other extensions are skipped and
    listed in the manifest with a reason. IngestError before any work for a missing SRC / unwritable DST / bad option.
    """
    _check_common(val_fraction, shard_size_mb)
    if max_side is not None and max_side < 8:
        raise IngestError(f"--max-side must be at least 8 pixels, got {max_side}")
    with open_source(src) as source:
        check_writable(dst)
        work = []
        for item in source.items():
            reason = _unsupported(item.key, IMAGE_SUFFIXES)
            if reason:
                work.append((item.key, (lambda r=reason: r)))
                continue
            work.append((item.key, (lambda it=item: process_image(it.key, it.read(), val_fraction, max_side))))
        if not work:
            raise IngestError(f"source {src} contains no files")
        options = {"val_fraction": val_fraction, "shard_size_mb": shard_size_mb, "max_side": max_side}
        return _run_ingest(kind="images", dst=dst, keys_and_work=work, schema=IMAGE_SCHEMA, payload="image",
                           shard_size_mb=shard_size_mb, source=src, options=options,
                           workers=workers or _default_workers(storage.is_remote(src)), progress=progress)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------
def _mask_stats(rows: list[dict]) -> dict[str, Any]:
    per_bin: dict[str, dict[str, int]] = {}
    for r in rows:
        label = str(r["bin"])
        d = per_bin.setdefault(label, {"border": 0, "no_border": 0})
        d["border" if r["border"] else "no_border"] += 1
    return {"bins": dict(sorted(per_bin.items(), key=lambda kv: int(kv[0])))}


def ingest_masks(src: str, dst: str, *, hole_color: str, threshold: float = 0.5, val_fraction: float = 0.0,
                 shard_size_mb: float = 256.0, workers: int | None = None, progress: bool = True) -> IngestSummary:
    """Pack a mask archive/folder/prefix into mask shards. ``hole_color`` states the FILES' polarity
    ("white": white pixels are holes, as in NVIDIA's test masks; "black": black pixels are holes). Pixels with
    ``value/max >= threshold`` count as white. Stored masks use the internal polarity (white/1 = valid)."""
    if hole_color not in M.HOLE_COLORS:
        raise IngestError(f"--hole-color must be one of {', '.join(M.HOLE_COLORS)}, got {hole_color!r}")
    if not 0.0 < threshold <= 1.0:
        raise IngestError(f"--threshold must be in (0, 1], got {threshold}")
    _check_common(val_fraction, shard_size_mb)
    with open_source(src) as source:
        check_writable(dst)

        def process(item: SourceItem) -> dict:
            data = item.read()
            if not data:
                raise ValueError("empty file (0 bytes)")
            mask = M.decode_mask(data, hole_color, threshold, name=item.key)
            return mask_row(item.key, mask, src, split_of(item.key, val_fraction))

        work = []
        for item in source.items():
            reason = _unsupported(item.key, MASK_SUFFIXES)
            work.append((item.key, (lambda r=reason: r) if reason else (lambda it=item: process(it))))
        if not work:
            raise IngestError(f"source {src} contains no files")
        options = {"hole_color": hole_color, "threshold": threshold, "val_fraction": val_fraction,
                   "shard_size_mb": shard_size_mb}
        return _run_ingest(kind="masks", dst=dst, keys_and_work=work, schema=MASK_SCHEMA, payload="mask",
                           shard_size_mb=shard_size_mb, source=src, options=options,
                           workers=workers or _default_workers(storage.is_remote(src)), progress=progress,
                           extra_manifest=_mask_stats)


def generate_masks(n: int, dst: str, *, size: int = 512, seed: int = 0, val_fraction: float = 0.0,
                   shard_size_mb: float = 256.0, workers: int | None = None, progress: bool = True) -> IngestSummary:
    """Generate ``n`` irregular masks (pconv.masks.generate_mask) into mask shards, balanced like the paper's
    test set: mask i gets bin ``i % 6`` and the border constraint alternates every 6 masks. Mask i uses the RNG
    ``default_rng([seed, i])``, so the set is reproducible and independent of threading."""
    if n < 1:
        raise IngestError(f"--generate needs a positive count, got {n}")
    if size < 32:
        raise IngestError(f"--size must be at least 32 pixels, got {size}")
    _check_common(val_fraction, shard_size_mb)
    check_writable(dst)
    band = border_band(size, size)
    nbins = len(M.HOLE_RATIO_BINS)
    width = max(5, len(str(n - 1)))

    def make(i: int) -> dict:
        rng = np.random.default_rng([seed, i])
        mask = M.generate_mask(size, rng, bin_index=i % nbins, border=bool((i // nbins) % 2), band=band)
        key = f"generated/{i:0{width}d}.png"
        return mask_row(key, mask, f"generated(seed={seed},size={size})", split_of(key, val_fraction))

    work = [(f"generated/{i:0{width}d}.png", (lambda i=i: make(i))) for i in range(n)]
    options = {"generate": n, "size": size, "seed": seed, "val_fraction": val_fraction, "shard_size_mb": shard_size_mb}
    return _run_ingest(kind="masks", dst=dst, keys_and_work=work, schema=MASK_SCHEMA, payload="mask",
                       shard_size_mb=shard_size_mb, source=f"generated(n={n},size={size},seed={seed})",
                       options=options, workers=workers or _default_workers(False), progress=progress,
                       extra_manifest=_mask_stats)
