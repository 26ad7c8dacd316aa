"""The Ray engine of ingestion (``engine="ray"``, the default): shards decoded and written by Ray tasks on the cluster.

The same datasets as the thread engine (:func:`pconv.ingest.local.write_shards`, ``--engine threads``), made by the
same :class:`~pconv.ingest.rows.RowRecipe` per key and finished by the same run end
(:func:`pconv.ingest.local.finish_run`): same shard format and manifest, same skip reasons, same refusals. What
differs is where the work runs:

1. The driver (this process: ``pconv ingest`` on a laptop, or the entrypoint of ``ray job submit``) checks the
   options, the source and the destination before any work (:class:`~pconv.ingest.local.IngestError`), then streams
   the listing (:meth:`pconv.storage.sources.Source.entries`: an S3 prefix one LIST page at a time, no request per
   object) into one compact Arrow table of (key, size) — the only copy of the key list it holds — and sorts it in
   key-hash order (:func:`pconv.ingest.local.listing`), so every shard mixes folders/classes. Files with other
   extensions are skipped right there. (Steps 1 and 3 are :mod:`pconv.ingest`'s, for both engines.)
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
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pconv import cluster
from pconv.ingest.local import IngestError, ShardsWritten, ordered_parallel
from pconv.ingest.rows import STATS_COLUMNS, RowRecipe
from pconv.storage import uris
from pconv.storage.shards import IMAGE_SCHEMA, IMAGES_KIND, MASK_SCHEMA, MASKS_KIND, SPLITS, ShardWriter
from pconv.storage.sources import SourceError

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


# -------- In the tasks ----------------------------------------------------------------------------
def _ingest_chunks(batch: pa.Table, recipe: RowRecipe, dst: str, run_id: str) -> pa.Table:
    """Ray Data UDF: one chunk (normally one block) -> one shard; returns one metadata row per chunk."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    groups: dict[tuple[str, int], list[str]] = {}
    for key, split, chunk in zip(*(batch.column(c).to_pylist() for c in ("key", "split", "chunk"))):
        groups.setdefault((split, chunk), []).append(key)
    out: dict[str, list] = {"chunk": [], "split": [], "files": [], "node": [], "result": []}
    for (split, chunk), keys in groups.items():
        try:
            result = _ingest_chunk(recipe, dst, run_id, split, chunk, keys)
        except SourceError as exc:  # the source is not there on this node: the run fails (in the driver)
            result = {"fatal": str(exc)}
        for k, v in (("chunk", chunk), ("split", split), ("files", len(keys)), ("node", node),
                     ("result", json.dumps(result))):
            out[k].append(v)
    return pa.table(out)


def _ingest_chunk(recipe: RowRecipe, dst: str, run_id: str, split: str, chunk: int,
                  keys: list[str]) -> dict[str, Any]:
    """Read, decode and validate ``keys`` and write them as shard ``chunk`` of ``split``; its metadata."""
    schema, payload = (IMAGE_SCHEMA, "image") if recipe.kind == IMAGES_KIND else (MASK_SCHEMA, "mask")
    threads = (1 if recipe.reader is None
               else READ_THREADS_REMOTE if uris.is_remote(recipe.reader.uri) else READ_THREADS_LOCAL)
    writer = ShardWriter(dst, split, schema, 2**62, run_id, payload, first_index=chunk)
    skipped: list[dict[str, str]] = []
    stats: list[dict] = []
    for key, made in ordered_parallel(lambda k: (k, recipe.make(k)), keys, threads):
        if isinstance(made, str):
            skipped.append({"key": key, "reason": made})
            continue
        if made["split"] != split:  # the listing and the row compute it with the same split_of
            raise RuntimeError(f"{key}: split {made['split']!r} differs from the planned {split!r}")
        writer.add(made)
        stats.append({k: made[k] for k in STATS_COLUMNS if k in made})
    writer.flush()
    return {"shards": writer.shards, "skipped": skipped, "stats": stats if recipe.kind == MASKS_KIND else []}


# -------- In the driver ---------------------------------------------------------------------------
def chunk_bounds(sizes: np.ndarray, target_bytes: int, max_files: int) -> list[tuple[int, int]]:
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
        for chunk, (a, b) in enumerate(chunk_bounds(part.column("size").to_numpy(), target_bytes, per_chunk)):
            rows = part.take(np.arange(a, b))  # a compact copy: the block does not drag the whole listing along
            yield pa.table({"key": rows.column("key"), "split": rows.column("split"),
                            "chunk": pa.array(np.full(b - a, chunk), pa.int64())})


def write_shards(recipe: RowRecipe, table: pa.Table, dst: str, run_id: str, *, shard_size_mb: float,
                 max_files: int, progress: bool, forward_s3_env: bool) -> ShardsWritten:
    """The Ray engine: the keys of ``table`` (a :func:`pconv.ingest.local.listing`) cut into chunks of about
    ``shard_size_mb`` of input and at most ``max_files`` files, one Ray Data task per chunk writing one shard
    (see the module docstring). ``forward_s3_env``: the tasks get this process's S3 endpoint and credentials.
    IngestError when a node does not see the source, or when shards were written where this process cannot see
    them (their files are then removed)."""
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
    if forward_s3_env and env:  # the tasks reach the same S3 endpoint with the same credentials as this process
        remote_args["runtime_env"] = {"env_vars": env}
    ds = ray.data.from_arrow_refs(refs).map_batches(_ingest_chunks, batch_size=None, batch_format="pyarrow",
                                                    fn_kwargs={"recipe": recipe, "dst": dst, "run_id": run_id},
                                                    **remote_args)
    ds.context.enable_progress_bars = False  # one bar, in files, below
    # One operator whose outputs are a few hundred bytes: Ray Data's per-operator reservation (half the cluster
    # until its first tasks report their size) would keep half the CPUs idle at the start; without it every chunk
    # is submitted at once, and the queued ones are resource demand the autoscaler sees.
    ds.context.op_resource_reservation_enabled = False
    from tqdm import tqdm

    out, nodes = ShardsWritten([], [], []), set()
    bar = tqdm(total=total, desc=f"ingest {recipe.kind} (ray)", unit="file", disable=not progress,
               dynamic_ncols=True)
    try:
        for row in ds.iter_rows():
            result = json.loads(row["result"])
            if "fatal" in result:  # stops the job: its other tasks are cancelled, no manifest is written
                raise IngestError(f"{result['fatal']}; the existing dataset is left as it was")
            bar.update(int(row["files"]))
            out.shards.extend(result["shards"])
            out.skipped.extend(result["skipped"])
            out.stats.extend(result["stats"])
            nodes.add(row["node"])
    finally:
        bar.close()
    out.nodes = len(nodes) or None
    if not uris.is_remote(dst):  # a task on another machine wrote its shard to that machine's disk
        missing = [s["path"] for s in out.shards if not os.path.exists(uris.join(dst, s["path"]))]
        if missing:
            for s in out.shards:
                uris.delete(uris.join(dst, s["path"]))
            raise IngestError(f"{len(missing)} shard(s) written by tasks on other nodes are not visible under {dst} "
                              f"here (e.g. {missing[0]}): on a cluster of several machines use an s3:// DST, or a "
                              "folder mounted at the same path on every node; the existing dataset is left as it was")
    return out
