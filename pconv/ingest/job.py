"""Ingestion as a Ray Data job: sources -> shards + manifest, decoded and written by Ray tasks across the cluster.

The same datasets as :mod:`pconv.ingest.local` (the single-process engine, ``--engine threads``), made by the same
per-file functions (:mod:`pconv.ingest.rows`) and finished by the same run end (:func:`pconv.ingest.local.finish_run`):
same shard format and manifest, same skip reasons, same refusals. What differs is where the work runs:

1. The driver (this process: ``prepare_data.py`` on a laptop, or the entrypoint of ``ray job submit``) checks the
   options, the source and the destination before any work (:class:`~pconv.ingest.local.IngestError`), then streams the
   listing (:meth:`pconv.storage.sources.Source.entries`: an S3 prefix one LIST page at a time, no request per object) into
   one compact Arrow table of (key, size) — the only copy of the key list it holds — and sorts it in key-hash
   order, so every shard mixes folders/classes. Files with other extensions are skipped right there.
2. The sorted keys of each split are cut into chunks of about ``--shard-size-mb`` of input (at most
   :data:`TASK_MAX_FILES` files, and :data:`CHUNKS_PER_CPU` chunks per cluster CPU while the data allows), each
   put in the object store as one block. One Ray Data task per chunk (:data:`TASK_CPUS` CPU each, so pending
   chunks are resource demand that the autoscaler answers with CPU nodes) reads its files (a few reader threads:
   S3 GETs overlap the decoding), decodes / validates each one, writes ONE shard
   ``<split>/part-<chunk>-<run>.parquet`` (atomically; a task holds up to about twice ``--shard-size-mb`` in memory)
   and returns only metadata: the shard entry, skipped files with reasons, mask statistics.
3. The driver collects the metadata as tasks finish (progress bar), then writes the manifest LAST, atomically,
   and removes older shards as :func:`pconv.ingest.local.finish_run` does. A job killed half-way (driver stopped, node
   lost for good) never writes a manifest: the previous dataset stays as it was and the orphan shards of the dead
   run are removed by the next successful run. A task retried after a lost node rewrites the same shard name.

Ray: joined by :func:`pconv.cluster.connect`: the current cluster when this process is a Ray driver (``RAY_ADDRESS``,
``ray job submit``, or an already initialised Ray); otherwise an existing local cluster, or a new local Ray. Local
paths (SRC or DST) must be visible at the same path on every node that runs tasks (one machine, or a shared
mount); a node that does not see a local SRC fails the run with a message saying so, and shards a task wrote
where the driver cannot see them fail it before the manifest is written. On a cluster of several machines, use
``s3://`` for both. The S3 endpoint and credentials of this process (the standard AWS variables) are passed to the
tasks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pconv import cluster

from pconv.ingest import local

from pconv.storage import uris
from pconv.core.images import IMAGE_SUFFIXES
from pconv.ingest.local import IngestError, IngestSummary
from pconv.ingest.rows import (STATS_COLUMNS, generated_key, generated_mask_row, process_image, process_mask,
                               skip_reason, unsupported)
from pconv.core.masks import MASK_SUFFIXES
from pconv.storage.shards import IMAGE_SCHEMA, IMAGES_KIND, MASK_SCHEMA, MASKS_KIND, SPLITS, ShardWriter, key_hash01, split_of
from pconv.storage.sources import EntryReader, SourceError

log = logging.getLogger(__name__)

#: CPUs each decode/write task requests. Decoding a photo is single-threaded CPU work; one CPU per task lets Ray
#: pack one task per core and makes queued chunks visible to the autoscaler as CPU demand.
TASK_CPUS = 1.0
#: Most files per task (and per shard): with small files (masks: ~4 KB) the byte target alone would give one
#: task for the whole set; ~1,000 masks or photos are 2-20 s of work, short enough to spread and to retry.
TASK_MAX_FILES = 1000
#: Generated masks per task: generating one 512-px mask is ~10-30 ms, so 250 are a few seconds.
GENERATE_TASK_MAX = 250
#: Reader threads per task: S3 GETs (tens of ms each) overlap the decoding; local reads need little help.
READ_THREADS_REMOTE, READ_THREADS_LOCAL = 8, 2
#: While the data allows, each split is cut into at least this many chunks per cluster CPU: a small set still
#: spreads over every CPU, and the last wave of tasks (the tail, when some CPUs are idle) is short.
CHUNKS_PER_CPU = 4
_LISTING_BATCH = 50_000  # keys turned into Arrow arrays at a time while listing (Python strings live only here)


@dataclass(frozen=True)
class _Plan:
    """Everything a task needs (pickled into each task): what to make of a key, and where to write."""

    kind: str  # IMAGES_KIND | MASKS_KIND
    dst: str
    run_id: str
    val_fraction: float
    reader: EntryReader | None = None  # None: generated masks
    max_side: int | None = None
    hole_color: str = "white"
    threshold: float = 0.5
    source: str = ""
    generate: tuple[int, int, int] | None = None  # (n, size, seed)

    def row(self, key: str, data: bytes | None) -> dict[str, Any]:
        if self.generate is not None:
            n, size, seed = self.generate
            return generated_mask_row(int(key.rsplit("/", 1)[1][:-4]), n, size, seed, self.val_fraction)
        if self.kind == IMAGES_KIND:
            return process_image(key, data, self.val_fraction, self.max_side)
        return process_mask(key, data, self.hole_color, self.threshold, self.source, self.val_fraction)


# -------- In the tasks ----------------------------------------------------------------------------
def _ingest_chunks(batch: pa.Table, plan: _Plan) -> pa.Table:
    """Ray Data UDF: one chunk (normally one block) -> one shard; returns one metadata row per chunk."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    groups: dict[tuple[str, int], list[str]] = {}
    for key, split, chunk in zip(*(batch.column(c).to_pylist() for c in ("key", "split", "chunk"))):
        groups.setdefault((split, chunk), []).append(key)
    out: dict[str, list] = {"chunk": [], "split": [], "files": [], "node": [], "result": []}
    for (split, chunk), keys in groups.items():
        try:
            result = _ingest_chunk(plan, split, chunk, keys)
        except SourceError as exc:  # the source is not there on this node: the run fails (in the driver)
            result = {"fatal": str(exc)}
        for k, v in (("chunk", chunk), ("split", split), ("files", len(keys)), ("node", node),
                     ("result", json.dumps(result))):
            out[k].append(v)
    return pa.table(out)


def _ingest_chunk(plan: _Plan, split: str, chunk: int, keys: list[str]) -> dict[str, Any]:
    """Read, decode and validate ``keys`` and write them as shard ``chunk`` of ``split``; its metadata."""
    schema, payload = (IMAGE_SCHEMA, "image") if plan.kind == IMAGES_KIND else (MASK_SCHEMA, "mask")
    threads = (1 if plan.reader is None
               else READ_THREADS_REMOTE if uris.is_remote(plan.reader.uri) else READ_THREADS_LOCAL)
    writer = ShardWriter(plan.dst, split, schema, 2**62, plan.run_id, payload, first_index=chunk)
    skipped: list[dict[str, str]] = []
    stats: list[dict] = []
    for key, data, reason in local.ordered_parallel(lambda k: _fetch(plan, k), keys, threads):
        if reason is None:
            try:
                row = plan.row(key, data)
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run; it is listed
                reason = skip_reason(exc)
        if reason is not None:
            skipped.append({"key": key, "reason": reason})
            continue
        if row["split"] != split:  # the listing and the row compute it with the same split_of
            raise RuntimeError(f"{key}: split {row['split']!r} differs from the planned {split!r}")
        writer.add(row)
        stats.append({k: row[k] for k in STATS_COLUMNS if k in row})
    writer.flush()
    return {"shards": writer.shards, "skipped": skipped, "stats": stats if plan.kind == MASKS_KIND else []}


def _fetch(plan: _Plan, key: str) -> tuple[str, bytes | None, str | None]:
    """(key, bytes, None) or (key, None, skip reason); a SourceError (the source is not there) fails the task."""
    if plan.reader is None:
        return key, None, None
    try:
        return key, plan.reader.read(key), None
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - listed in the manifest instead
        return key, None, skip_reason(exc)


# -------- In the driver ---------------------------------------------------------------------------
def _listing(entries: Iterable[tuple[str, int]], suffixes: tuple[str, ...] | None,
             val_fraction: float) -> tuple[pa.Table, list[dict[str, str]]]:
    """The files to read as one Arrow table (key, size, split) in key-hash order, and those skipped by
    extension. Keys are held as Python strings only ``_LISTING_BATCH`` at a time."""
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
    return table.sort_by([("h", "ascending"), ("key", "ascending")]), skipped  # ingest's order: (hash, key)


def _cut(sizes: np.ndarray, target_bytes: int, max_files: int) -> list[tuple[int, int]]:
    """[start, end) chunks of consecutive files: a chunk ends when it holds ``target_bytes`` or ``max_files``."""
    bounds, start, acc = [], 0, 0
    for i, size in enumerate(sizes.tolist()):
        acc += size
        if acc >= target_bytes or i + 1 - start >= max_files:
            bounds.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes):
        bounds.append((start, len(sizes)))
    return bounds


def _chunk_blocks(table: pa.Table, target_bytes: int, max_files: int, cpus: float) -> Iterator[pa.Table]:
    """Per split, in key-hash order: blocks (key, split, chunk) of one chunk each, chunks numbered per split."""
    for split in SPLITS:
        part = table.filter(pc.equal(table.column("split"), split))
        if part.num_rows == 0:
            continue
        per_chunk = max(1, min(max_files, math.ceil(part.num_rows / max(4.0, CHUNKS_PER_CPU * cpus))))
        for chunk, (a, b) in enumerate(_cut(part.column("size").to_numpy(), target_bytes, per_chunk)):
            rows = part.take(np.arange(a, b))  # a compact copy: the block does not drag the whole listing along
            yield pa.table({"key": rows.column("key"), "split": rows.column("split"),
                            "chunk": pa.array(np.full(b - a, chunk), pa.int64())})


def _run(*, kind: str, dst: str, entries: Iterable[tuple[str, int]], suffixes: tuple[str, ...] | None,
         plan: _Plan, shard_size_mb: float, max_files: int, progress: bool, remote: bool,
         **finish: Any) -> IngestSummary:
    t0 = time.monotonic()
    table, skipped = _listing(entries, suffixes, plan.val_fraction)
    if table.num_rows == 0 and not skipped:
        raise IngestError(f"source {finish['source']} contains no files")
    log.info("%s: %d file(s) to read, %d skipped by extension", kind, table.num_rows, len(skipped))
    results: list[dict[str, Any]] = []
    if table.num_rows:
        results = _execute(table, plan, shard_size_mb, max_files, progress, remote)
    written, stats_rows = [], []
    for r in results:
        written.extend(r["shards"])
        skipped.extend(r["skipped"])
        stats_rows.extend(r["stats"])
    written.sort(key=lambda s: (SPLITS.index(s["split"]), s["path"]))
    for s in skipped:
        log.warning("skipped %s: %s", s["key"], s["reason"])
    if not uris.is_remote(dst):  # a task on another machine wrote its shard to that machine's disk
        missing = [s["path"] for s in written if not os.path.exists(uris.join(dst, s["path"]))]
        if missing:
            for s in written:
                uris.delete(uris.join(dst, s["path"]))
            raise IngestError(f"{len(missing)} shard(s) written by tasks on other nodes are not visible under {dst} "
                              f"here (e.g. {missing[0]}): on a cluster of several machines use an s3:// DST, or a "
                              "folder mounted at the same path on every node; the existing dataset is left as it was")
    schema = IMAGE_SCHEMA if kind == IMAGES_KIND else MASK_SCHEMA
    return local.finish_run(kind=kind, dst=dst, run_id=plan.run_id, t0=t0, written=written, skipped=skipped,
                             stats_rows=stats_rows, columns=schema.names,
                             nodes=len({r["node"] for r in results}) or None, **finish)


def _execute(table: pa.Table, plan: _Plan, shard_size_mb: float, max_files: int, progress: bool,
             remote: bool) -> list[dict[str, Any]]:
    """Run the chunks as one Ray Data job; the tasks' metadata rows, parsed."""
    import ray

    cluster.connect()
    # the CPUs the cluster can reach (its autoscaler's node types at full scale), not the submit-time snapshot: on a
    # cluster that starts from zero workers the snapshot is the head's few CPUs, and far too few chunks would queue
    cpus = cluster.reachable_or_now(cluster.read_view(), "CPU")
    refs = [ray.put(block) for block in _chunk_blocks(table, int(shard_size_mb * 2**20), max_files, cpus)]
    total = table.num_rows
    del table  # the keys now live in the object store, one block per chunk
    log.info("ingest job: %d file(s) in %d task(s) of %g CPU on a cluster of %g CPU(s)", total, len(refs),
             TASK_CPUS, cpus)
    remote_args: dict[str, Any] = {"num_cpus": TASK_CPUS}
    env = {k: os.environ[k] for k in uris.AWS_ENV_VARS if k in os.environ}
    if remote and env:  # the tasks reach the same S3 endpoint with the same credentials as this process
        remote_args["runtime_env"] = {"env_vars": env}
    ds = ray.data.from_arrow_refs(refs).map_batches(_ingest_chunks, batch_size=None, batch_format="pyarrow",
                                                    fn_kwargs={"plan": plan}, **remote_args)
    ds.context.enable_progress_bars = False  # one bar, in files, below
    # One operator whose outputs are a few hundred bytes: Ray Data's per-operator reservation (half the cluster
    # until its first tasks report their size) would keep half the CPUs idle at the start; without it every chunk
    # is submitted at once, and the queued ones are resource demand the autoscaler sees.
    ds.context.op_resource_reservation_enabled = False
    from tqdm import tqdm

    results: list[dict[str, Any]] = []
    bar = tqdm(total=total, desc=f"ingest {plan.kind} (ray)", unit="file", disable=not progress,
               dynamic_ncols=True)
    try:
        for row in ds.iter_rows():
            result = json.loads(row["result"])
            if "fatal" in result:  # stops the job: its other tasks are cancelled, no manifest is written
                raise IngestError(f"{result['fatal']}; the existing dataset is left as it was")
            bar.update(int(row["files"]))
            results.append({**result, "node": row["node"]})
    finally:
        bar.close()
    return results


# -------- Public entry points (pconv.ingest.local's arguments, less ``workers``, plus the engine) ---------
ENGINES = ("ray", "threads")  # threads: pconv.ingest.local in this process (no Ray start-up; the benchmark's baseline)


def _threads(engine: str) -> bool:
    if engine not in ENGINES:
        raise IngestError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return engine == "threads"


def ingest_images(src: str, dst: str, *, val_fraction: float = 0.01, shard_size_mb: float = 256.0,
                  max_side: int | None = None, progress: bool = True, allow_empty: bool = False,
                  replace_kind: bool = False, engine: str = "ray") -> IngestSummary:
    """:func:`pconv.ingest.local.ingest_images` as a Ray Data job (see the module docstring), or in this process."""
    if _threads(engine):
        return local.ingest_images(src, dst, val_fraction=val_fraction, shard_size_mb=shard_size_mb,
                                    max_side=max_side, progress=progress, allow_empty=allow_empty,
                                    replace_kind=replace_kind)
    options = local.image_options(val_fraction, shard_size_mb, max_side)
    with local.open_source(src) as source:
        local.check_destination(dst, IMAGES_KIND, replace_kind)
        plan = _Plan(IMAGES_KIND, dst, local.new_run_id(), val_fraction, source.reader(), max_side=max_side)
        return _run(kind=IMAGES_KIND, dst=dst, entries=source.entries(), suffixes=IMAGE_SUFFIXES, plan=plan,
                    shard_size_mb=shard_size_mb, max_files=TASK_MAX_FILES, progress=progress,
                    remote=uris.is_remote(src) or uris.is_remote(dst), source=src, options=options,
                    allow_empty=allow_empty)


def ingest_masks(src: str, dst: str, *, hole_color: str, threshold: float = 0.5, val_fraction: float = 0.0,
                 shard_size_mb: float = 256.0, progress: bool = True, allow_empty: bool = False,
                 replace_kind: bool = False, force: bool = False, engine: str = "ray") -> IngestSummary:
    """:func:`pconv.ingest.local.ingest_masks` as a Ray Data job: same bins, border flags and polarity refusal."""
    if _threads(engine):
        return local.ingest_masks(src, dst, hole_color=hole_color, threshold=threshold, val_fraction=val_fraction,
                                   shard_size_mb=shard_size_mb, progress=progress, allow_empty=allow_empty,
                                   replace_kind=replace_kind, force=force)
    options = local.mask_options(hole_color, threshold, val_fraction, shard_size_mb)
    with local.open_source(src) as source:
        local.check_destination(dst, MASKS_KIND, replace_kind)
        plan = _Plan(MASKS_KIND, dst, local.new_run_id(), val_fraction, source.reader(), hole_color=hole_color,
                     threshold=threshold, source=src)
        return _run(kind=MASKS_KIND, dst=dst, entries=source.entries(), suffixes=MASK_SUFFIXES, plan=plan,
                    shard_size_mb=shard_size_mb, max_files=TASK_MAX_FILES, progress=progress,
                    remote=uris.is_remote(src) or uris.is_remote(dst), source=src, options=options,
                    extra_manifest=local.mask_stats, allow_empty=allow_empty, refuse=local.polarity_check(force))


def generate_masks(n: int, dst: str, *, size: int = 512, seed: int = 0, val_fraction: float = 0.0,
                   shard_size_mb: float = 256.0, progress: bool = True, replace_kind: bool = False,
                   engine: str = "ray") -> IngestSummary:
    """:func:`pconv.ingest.local.generate_masks` as a Ray Data job: mask i is the same whichever task makes it."""
    if _threads(engine):
        return local.generate_masks(n, dst, size=size, seed=seed, val_fraction=val_fraction,
                                     shard_size_mb=shard_size_mb, progress=progress, replace_kind=replace_kind)
    options = local.generate_options(n, size, seed, val_fraction, shard_size_mb)
    local.check_destination(dst, MASKS_KIND, replace_kind)
    plan = _Plan(MASKS_KIND, dst, local.new_run_id(), val_fraction, None, generate=(n, size, seed))
    # size estimate of one generated mask's 1-bit PNG (holes are strokes: it compresses to a few KB at 512 px)
    entries = ((generated_key(i, n), size * size // 64) for i in range(n))
    return _run(kind=MASKS_KIND, dst=dst, entries=entries, suffixes=None, plan=plan, shard_size_mb=shard_size_mb,
                max_files=GENERATE_TASK_MAX, progress=progress, remote=uris.is_remote(dst),
                source=f"generated(n={n},size={size},seed={seed})", options=options,
                extra_manifest=local.mask_stats)
