"""Sources (folders, zips, ``s3://`` prefixes) -> Parquet shards + manifest: ingestion's one public API.

:func:`ingest_images`, :func:`ingest_masks` and :func:`generate_masks` take ``engine="ray"`` (the default: a Ray Data
job on the current or a local cluster, :mod:`.job`) or ``engine="threads"`` (a thread pool in this process, no Ray:
small inputs, tests, the benchmark's baseline; :mod:`.local`). Both engines check the options, the source and the
destination before any work (:class:`~pconv.ingest.local.IngestError`), list the source in key-hash order, turn each
key into a row the same way (:class:`~pconv.ingest.rows.RowRecipe`) and end the run the same way
(:func:`~pconv.ingest.local.finish_run`: the manifest last, atomically; refusals leave the destination as it was),
so they write the same dataset. See :mod:`.local` for what a run guarantees.

May import: ``core``, ``storage``, ``cluster``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from pconv.core.images import IMAGE_SUFFIXES
from pconv.core.masks import MASK_SUFFIXES
from pconv.ingest import job, local
from pconv.ingest.local import IngestError, IngestSummary
from pconv.ingest.rows import RowRecipe, generated_key
from pconv.storage import uris
from pconv.storage.shards import IMAGE_SCHEMA, IMAGES_KIND, MASK_SCHEMA, MASKS_KIND, SPLITS

log = logging.getLogger(__name__)

#: ``ray``: the Ray Data job (:mod:`pconv.ingest.job`); ``threads``: this process (:mod:`pconv.ingest.local`).
ENGINES = ("ray", "threads")

__all__ = ["ENGINES", "generate_masks", "ingest_images", "ingest_masks"]


def ingest_images(src: str, dst: str, *, val_fraction: float = 0.01, shard_size_mb: float = 256.0,
                  max_side: int | None = None, engine: str = "ray", progress: bool = True,
                  allow_empty: bool = False, replace_kind: bool = False) -> IngestSummary:
    """Pack every JPEG/PNG/WebP under ``src`` into image shards at ``dst``, a ``val_fraction`` of them (by a stable
    hash of the key) in the val split; images whose longer side exceeds ``max_side`` are downscaled and re-encoded.

    Broken files (truncated, not an image, empty, unreadable, too large, under
    :data:`~pconv.ingest.rows.MIN_SIDE` px) and files with other extensions are skipped and listed in the manifest
    with a reason. IngestError before any work for a missing SRC / unwritable DST / bad option / unknown engine /
    DST holding masks (unless ``replace_kind``), and at the end when no image was usable (unless ``allow_empty``).
    """
    _check_engine(engine)
    options = local.image_options(val_fraction, shard_size_mb, max_side)
    with local.open_source(src) as source:
        local.check_destination(dst, IMAGES_KIND, replace_kind)
        recipe = RowRecipe(IMAGES_KIND, val_fraction, source.reader(), max_side=max_side)
        return _run(engine, recipe, dst, source.entries(), IMAGE_SUFFIXES, shard_size_mb=shard_size_mb,
                    max_files=job.TASK_MAX_FILES, progress=progress, remote_source=uris.is_remote(src),
                    source=src, options=options, allow_empty=allow_empty)


def ingest_masks(src: str, dst: str, *, hole_color: str, threshold: float = 0.5, val_fraction: float = 0.0,
                 shard_size_mb: float = 256.0, engine: str = "ray", progress: bool = True, allow_empty: bool = False,
                 replace_kind: bool = False, force: bool = False) -> IngestSummary:
    """Pack a mask archive/folder/prefix into mask shards (hole ratio, paper bin and border flag per mask).
    ``hole_color`` states the FILES' polarity ("white": white pixels are holes, as in NVIDIA's test masks;
    "black": black pixels are holes); pixels with ``value/max >= threshold`` count as white. Stored masks use the
    internal polarity (white/1 = valid).

    Refused (IngestError, DST untouched) when most masks are beyond every paper bin, i.e. the polarity is probably
    inverted (:func:`pconv.core.masks.polarity_warning`), unless ``force``; see :func:`ingest_images` for the rest.
    """
    _check_engine(engine)
    options = local.mask_options(hole_color, threshold, val_fraction, shard_size_mb)
    with local.open_source(src) as source:
        local.check_destination(dst, MASKS_KIND, replace_kind)
        recipe = RowRecipe(MASKS_KIND, val_fraction, source.reader(), hole_color=hole_color, threshold=threshold,
                           source=src)
        return _run(engine, recipe, dst, source.entries(), MASK_SUFFIXES, shard_size_mb=shard_size_mb,
                    max_files=job.TASK_MAX_FILES, progress=progress, remote_source=uris.is_remote(src),
                    source=src, options=options, extra_manifest=local.mask_stats, allow_empty=allow_empty,
                    refuse=local.polarity_check(force))


def generate_masks(n: int, dst: str, *, size: int = 512, seed: int = 0, val_fraction: float = 0.0,
                   shard_size_mb: float = 256.0, engine: str = "ray", progress: bool = True,
                   replace_kind: bool = False) -> IngestSummary:
    """Generate ``n`` irregular masks (:func:`pconv.core.masks.generate_mask`) into mask shards, balanced like the
    paper's test set (:func:`~pconv.ingest.rows.generated_mask_row`); mask ``i`` is the same whichever engine,
    thread or task makes it."""
    _check_engine(engine)
    options = local.generate_options(n, size, seed, val_fraction, shard_size_mb)
    local.check_destination(dst, MASKS_KIND, replace_kind)
    recipe = RowRecipe(MASKS_KIND, val_fraction, None, generate=(n, size, seed))
    # size estimate of one generated mask's 1-bit PNG (holes are strokes: it compresses to a few KB at 512 px)
    entries = ((generated_key(i, n), size * size // 64) for i in range(n))
    return _run(engine, recipe, dst, entries, None, shard_size_mb=shard_size_mb, max_files=job.GENERATE_TASK_MAX,
                progress=progress, remote_source=False, source=f"generated(n={n},size={size},seed={seed})",
                options=options, extra_manifest=local.mask_stats)


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise IngestError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def _run(engine: str, recipe: RowRecipe, dst: str, entries: Iterable[tuple[str, int]],
         suffixes: tuple[str, ...] | None, *, shard_size_mb: float, max_files: int, progress: bool,
         remote_source: bool, **finish: Any) -> IngestSummary:
    """List, write the shards with ``engine``, then :func:`~pconv.ingest.local.finish_run` (``finish``: its
    keyword arguments)."""
    t0 = time.monotonic()
    table, skipped = local.listing(entries, suffixes, recipe.val_fraction)
    if table.num_rows == 0 and not skipped:
        raise IngestError(f"source {finish['source']} contains no files")
    log.info("%s: %d file(s) to read, %d skipped by extension (engine %s)", recipe.kind, table.num_rows,
             len(skipped), engine)
    run_id = local.new_run_id()
    written = local.ShardsWritten([], [], [])
    if table.num_rows and engine == "threads":
        written = local.write_shards(recipe, table, dst, run_id, shard_size_mb=shard_size_mb, progress=progress,
                                     remote_source=remote_source)
    elif table.num_rows:
        written = job.write_shards(recipe, table, dst, run_id, shard_size_mb=shard_size_mb, max_files=max_files,
                                   progress=progress, forward_s3_env=remote_source or uris.is_remote(dst))
    skipped += written.skipped
    for s in skipped:
        log.warning("skipped %s: %s", s["key"], s["reason"])
    shards = sorted(written.shards, key=lambda s: (SPLITS.index(s["split"]), s["path"]))
    schema = IMAGE_SCHEMA if recipe.kind == IMAGES_KIND else MASK_SCHEMA
    return local.finish_run(kind=recipe.kind, dst=dst, run_id=run_id, t0=t0, written=shards, skipped=skipped,
                            stats_rows=written.stats, columns=schema.names, nodes=written.nodes, **finish)
