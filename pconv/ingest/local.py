"""What both ingest engines share, and the single-process one: a run's checks, listing and end; the thread engine.

The public entry points are :func:`pconv.ingest.ingest_images`, :func:`~pconv.ingest.ingest_masks` and
:func:`~pconv.ingest.generate_masks` (``engine="ray" | "threads"``). The inputs are listed and read by
:mod:`pconv.storage.sources`, the shard format lives in :mod:`pconv.storage.shards`, the mask polarity and generator
in :mod:`pconv.core.masks`, one key -> one row in :mod:`pconv.ingest.rows`. This module holds the option and
destination checks, the listing in key-hash order (:func:`listing`), the end of a run (:func:`finish_run`) and the
thread engine (:func:`write_shards`: a thread pool in this process, no Ray; ``--engine threads``);
:mod:`pconv.ingest.job` is the Ray Data engine (the default).

- Every input file is decoded once to validate it. Broken input (truncated JPEG, non-image, empty object,
  unreadable PNG) and files with other extensions are skipped, counted and listed in the manifest with a reason;
  the rest is ingested. Problems found BEFORE any work (missing SRC, unwritable DST, bad option) raise
  :class:`IngestError`.
- Files are processed in key-hash order (deterministic), which mixes folders/classes across shards (sorted
  listings of Places2-like trees would otherwise give one class per shard); in the thread engine reading/decoding
  runs on a thread pool (I/O bound on S3), results are consumed in order, so shard contents do not depend on thread
  timing.

Re-running is safe. Every run writes shards under names carrying a fresh run id (``part-00000-<run>``), each one
atomically (temp file + rename locally, a single PUT on S3); the manifest is replaced last, atomically; only then
are older ``part-*.parquet`` files under ``DST/train`` and ``DST/val`` deleted that neither the new manifest nor
the one it replaced lists. A reader that read a manifest can therefore read all of its shards until the SECOND
re-ingest after it (or :func:`cleanup`), and a run that dies half-way leaves the previous dataset intact (its
orphan shards are removed by the next successful run). One writer per DST.

A run never replaces a dataset by nothing, or by one of another kind, unless told to: no usable row
(``allow_empty``), a DST holding the other kind (``replace_kind``), or masks whose hole ratios say the polarity is
probably inverted (``force``) raise :class:`IngestError` and leave DST as it was.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from pconv.core import masks
from pconv.ingest.rows import MIN_SIDE, STATS_COLUMNS, RowRecipe, unsupported
from pconv.storage import shards, uris
from pconv.storage.shards import (IMAGE_SCHEMA, IMAGES_KIND, MANIFEST, MASK_SCHEMA, SCHEMA_VERSION, SPLITS, ShardWriter,
                                  key_hash01, split_of)
from pconv.storage.sources import Source, SourceError

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """A problem found BEFORE any work (missing source, unwritable destination, bad option), or a run refused at
    the end (nothing usable, inverted masks) before the manifest is replaced."""


def open_source(uri: str) -> Source:
    """:class:`pconv.storage.sources.Source` with its problems (missing, unreadable, not a zip) as
    :class:`IngestError`."""
    try:
        return Source(uri)
    except SourceError as exc:
        raise IngestError(str(exc)) from exc


# -------- Destination checks and cleanup ----------------------------------------------------------
def check_destination(dst: str, kind: str, replace_kind: bool) -> None:
    """Fail early (IngestError) when DST cannot be written (a probe file is written and removed), or holds a
    dataset of another kind (images vs masks) and ``replace_kind`` is not set."""
    try:
        uris.check_writable(dst)
    except OSError as exc:
        raise IngestError(str(exc)) from exc
    existing = (shards.current_manifest(dst) or {}).get("kind", kind)  # none or unreadable: nothing to protect
    if existing != kind and not replace_kind:
        raise IngestError(f"destination {dst} holds a dataset of kind {existing!r}; ingesting {kind!r} would replace "
                          f"it (pass --replace-kind to do that, or choose another destination)")


def cleanup(dst: str) -> list[str]:
    """Delete every shard under DST that its current manifest does not list (the previous run's shards kept for
    readers that are still reading it, and orphans of dead runs). IngestError when DST has no readable manifest."""
    try:
        manifest = shards.read_manifest(dst)
    except (FileNotFoundError, ValueError) as exc:
        raise IngestError(f"{exc}; without a manifest nothing is known to be in use, so nothing is deleted") from exc
    removed = shards.remove_unlisted_shards(dst, {s["path"] for s in manifest["shards"]})
    log.info("removed %d shard(s) not listed in %s", len(removed), uris.join(dst, MANIFEST))
    return removed


# -------- Ingestion driver shared by images / masks / generated masks -----------------------------
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
    kept_previous: int = 0  # shards of the replaced manifest kept for its readers (until the next run / cleanup)
    out_of_bins: int | None = None  # masks: rows in no paper bin
    nodes: int | None = None  # Ray nodes whose tasks decoded and wrote shards (None: this process, no Ray)

    @property
    def ingested(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        """The closing summary line printed by the pipeline."""
        return (f"{self.kind}: ingested {self.ingested} (train {self.counts.get('train', 0)}, "
                f"val {self.counts.get('val', 0)}), skipped {len(self.skipped)}, shards {self.shards}, "
                f"bytes {self.bytes}, seconds {self.seconds:.1f} "
                f"({(self.ingested + len(self.skipped)) / max(self.seconds, 1e-9):.1f} files/s"
                + (f" on {self.nodes} node(s))" if self.nodes else ")")
                + (f", {self.out_of_bins} mask(s) in no paper bin" if self.out_of_bins else "")
                + f" -> {self.manifest_uri}")


def ordered_parallel(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
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


def new_run_id() -> str:
    """A fresh run id (UTC time + random suffix): every shard of a run carries it in its name."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


_LISTING_BATCH = 50_000  # keys turned into Arrow arrays at a time while listing (Python strings live only here)


def listing(entries: Iterable[tuple[str, int]], suffixes: tuple[str, ...] | None,
            val_fraction: float) -> tuple[pa.Table, list[dict[str, str]]]:
    """The files to read as one Arrow table (key, size, h, split) in key-hash order (``h``: the key's hash in
    [0, 1), ties broken by key), and those skipped by extension (``suffixes`` None: keep all). Keys are held as
    Python strings only ``_LISTING_BATCH`` at a time: an S3 listing of millions of keys stays compact."""
    parts: list[pa.Table] = []
    skipped: list[dict[str, str]] = []
    keys: list[str] = []
    sizes: list[int] = []

    def flush() -> None:
        if keys:
            parts.append(pa.table({"key": pa.array(keys, pa.string()), "size": pa.array(sizes, pa.int64()),
                                   "h": pa.array([key_hash01(k) for k in keys], pa.float64()),
                                   "split": pa.array([split_of(k, val_fraction) for k in keys], pa.string())}))
            keys.clear()
            sizes.clear()

    for key, size in entries:
        reason = unsupported(key, suffixes) if suffixes else None
        if reason:
            skipped.append({"key": key, "reason": reason})
            continue
        keys.append(key)
        sizes.append(size)
        if len(keys) >= _LISTING_BATCH:
            flush()
    flush()
    empty = pa.table({"key": pa.array([], pa.string()), "size": pa.array([], pa.int64()),
                      "h": pa.array([], pa.float64()), "split": pa.array([], pa.string())})
    table = pa.concat_tables(parts) if parts else empty
    return table.sort_by([("h", "ascending"), ("key", "ascending")]), skipped


@dataclass
class ShardsWritten:
    """What an engine wrote: the manifest entries of its shards, the files it skipped (``{"key", "reason"}``), the
    per-row :data:`~pconv.ingest.rows.STATS_COLUMNS` values, and the Ray nodes whose tasks wrote (None: this
    process)."""

    shards: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    stats: list[dict[str, Any]]
    nodes: int | None = None


def write_shards(recipe: RowRecipe, table: pa.Table, dst: str, run_id: str, *, shard_size_mb: float,
                 progress: bool, remote_source: bool) -> ShardsWritten:
    """The thread engine: every key of ``table`` (a :func:`listing`) made into a row by ``recipe`` on a thread pool
    in this process (more threads for a remote source: S3 GETs wait on the network), consumed in the table's order
    and written per split into shards of about ``shard_size_mb``. IngestError when the source itself is not there."""
    cpus = os.cpu_count() or 1
    threads = 1 if recipe.reader is None else min(32, cpus * 4) if remote_source else min(8, cpus + 1)
    schema, payload = (IMAGE_SCHEMA, "image") if recipe.kind == IMAGES_KIND else (MASK_SCHEMA, "mask")
    writers = {s: ShardWriter(dst, s, schema, int(shard_size_mb * 2**20), run_id, payload) for s in SPLITS}
    out = ShardsWritten([], [], [])
    from tqdm import tqdm

    bar = tqdm(total=table.num_rows, desc=f"ingest {recipe.kind}", unit="file", disable=not progress,
               dynamic_ncols=True)
    keys = table.column("key").to_pylist()
    try:
        for key, made in ordered_parallel(lambda k: (k, recipe.make(k)), keys, threads):
            bar.update(1)
            if isinstance(made, str):
                out.skipped.append({"key": key, "reason": made})
                continue
            writers[made["split"]].add(made)
            stats = {k: made[k] for k in STATS_COLUMNS if k in made}
            if stats:
                out.stats.append(stats)
    except SourceError as exc:
        raise IngestError(f"{exc}; the existing dataset is left as it was") from exc
    finally:
        bar.close()
    for writer in writers.values():
        writer.flush()
    out.shards = [s for split in SPLITS for s in writers[split].shards]
    return out


def finish_run(*, kind: str, dst: str, run_id: str, t0: float, written: list[dict], skipped: list[dict[str, str]],
               stats_rows: list[dict], columns: list[str], source: str, options: dict[str, Any],
               extra_manifest: Callable[[list[dict]], dict] | None = None, allow_empty: bool = False,
               refuse: Callable[[list[dict]], str | None] | None = None, nodes: int | None = None) -> IngestSummary:
    """The end of every run, whatever wrote the shards ``written`` (manifest entries): refuse or write the
    manifest (atomically, LAST), then delete older shards that neither it nor the one it replaced lists.

    No row (unless ``allow_empty``) or a reason from ``refuse(stats_rows)`` deletes this run's shards and raises
    IngestError, so DST keeps its previous dataset."""
    counts = {s: sum(x["rows"] for x in written if x["split"] == s) for s in SPLITS}
    total_bytes = sum(s["bytes"] for s in written)
    problem = refuse(stats_rows) if refuse is not None else None
    if problem is None and sum(counts.values()) == 0 and not allow_empty:
        reasons = sorted({s["reason"] for s in skipped})
        problem = (f"nothing usable in {source}: all {len(skipped)} file(s) skipped (e.g. {'; '.join(reasons[:3])}); "
                   "the existing dataset is left as it was (pass --allow-empty to write an empty one)")
    if problem is not None:
        for s in written:
            uris.delete(uris.join(dst, s["path"]))
        raise IngestError(problem)
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "kind": kind, "source": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_id": run_id,
        "counts": counts, "total_bytes": total_bytes, "columns": list(columns), "shards": written,
        "skipped_count": len(skipped), "skipped": sorted(skipped, key=lambda s: s["key"]), "options": options,
    }
    if extra_manifest is not None:
        manifest.update(extra_manifest(stats_rows))
    manifest_uri = uris.join(dst, MANIFEST)
    previous = {s["path"] for s in (shards.current_manifest(dst) or {}).get("shards", [])}  # kept for its readers
    uris.write_bytes_atomic(manifest_uri, json.dumps(manifest, indent=1).encode())
    new = {s["path"] for s in written}
    removed = shards.remove_unlisted_shards(dst, new | previous)
    kept = len(previous - new)
    if removed:
        log.info("removed %d shard(s) of earlier ingestions: %s", len(removed), removed[:5])
    if kept:
        log.info("kept %d shard(s) of the replaced manifest for its readers (removed by the next run, or now by "
                 "`prepare_data.py cleanup %s`)", kept, dst)
    if sum(counts.values()) == 0:
        log.warning("%s: nothing was ingested from %s (%d file(s) skipped)", kind, source, len(skipped))
    return IngestSummary(kind, dst, counts, manifest["skipped"], len(written), total_bytes, time.monotonic() - t0,
                         manifest_uri, removed, kept, manifest.get("out_of_bins"), nodes)


def _check_common(val_fraction: float, shard_size_mb: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise IngestError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not shard_size_mb > 0:
        raise IngestError(f"--shard-size-mb must be positive, got {shard_size_mb}")


# -------- Images ----------------------------------------------------------------------------------
def image_options(val_fraction: float, shard_size_mb: float, max_side: int | None) -> dict[str, Any]:
    """The manifest's ``options`` of an image run, after checking them (IngestError before any work)."""
    _check_common(val_fraction, shard_size_mb)
    if max_side is not None and max_side < MIN_SIDE:
        raise IngestError(f"--max-side must be at least {MIN_SIDE} pixels, got {max_side}")
    return {"val_fraction": val_fraction, "shard_size_mb": shard_size_mb, "max_side": max_side}


# -------- Masks -----------------------------------------------------------------------------------
def mask_stats(rows: list[dict]) -> dict[str, Any]:
    """The mask manifest's ``bins`` and ``out_of_bins`` from per-row :data:`STATS_COLUMNS`."""
    per_bin: dict[str, dict[str, int]] = {}
    for r in rows:
        label = str(r["bin"])
        in_bin = per_bin.setdefault(label, {"border": 0, "no_border": 0})
        in_bin["border" if r["border"] else "no_border"] += 1
    out = sum(1 for r in rows if r["bin"] == -1)
    if out:
        log.warning("%d of %d mask(s) are in no paper bin (hole ratio outside (0.01, 0.6]; all-valid and all-hole "
                    "masks included)", out, len(rows))
    return {"bins": dict(sorted(per_bin.items(), key=lambda kv: int(kv[0]))), "out_of_bins": out}


def polarity_check(force: bool) -> Callable[[list[dict]], str | None]:
    """``refuse`` for :func:`finish_run`: masks whose hole ratios say the polarity is probably inverted."""
    def refuse(rows: list[dict]) -> str | None:
        warning = masks.polarity_warning([r["hole_ratio"] for r in rows]) if rows else None
        if warning is None:
            return None
        if force:
            log.warning("%s; ingesting anyway (--force)", warning)
            return None
        return f"{warning} (--hole-color); nothing was written: pass --force to ingest these masks as they are"
    return refuse


def mask_options(hole_color: str, threshold: float, val_fraction: float, shard_size_mb: float) -> dict[str, Any]:
    """The manifest's ``options`` of a mask run, after checking them (IngestError before any work)."""
    if hole_color not in masks.HOLE_COLORS:
        raise IngestError(f"--hole-color must be one of {', '.join(masks.HOLE_COLORS)}, got {hole_color!r}")
    if not 0.0 < threshold <= 1.0:
        raise IngestError(f"--threshold must be in (0, 1], got {threshold}")
    _check_common(val_fraction, shard_size_mb)
    return {"hole_color": hole_color, "threshold": threshold, "val_fraction": val_fraction,
            "shard_size_mb": shard_size_mb}


def generate_options(n: int, size: int, seed: int, val_fraction: float, shard_size_mb: float) -> dict[str, Any]:
    """The manifest's ``options`` of a generated-mask run, after checking them (IngestError before any work)."""
    if n < 1:
        raise IngestError(f"--generate needs a positive count, got {n}")
    if size < MIN_SIDE:
        raise IngestError(f"--size must be at least {MIN_SIDE} pixels, got {size}")
    _check_common(val_fraction, shard_size_mb)
    return {"generate": n, "size": size, "seed": seed, "val_fraction": val_fraction, "shard_size_mb": shard_size_mb}
