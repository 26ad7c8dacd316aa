"""Ray Data pipelines that stream image shards from object storage into training batches.

Training (:func:`build_train_dataset`)::

    read units = the Parquet row groups of the train shards (from the manifest; ~4 MB / <= 256 rows each)
      -> randomize_block_order(seed, reseed_after_execution=True)        # a new unit order every epoch
      -> with_column("_rand", random(seed, reseed_after_execution=True))  # per-unit, per-epoch random number
      -> map_batches(read the row group, shuffle its rows, decode JPEG/PNG at reduced scale, resize short side,
                     random crop + hflip, pair with a random mask of the broadcast mask bank, augment it)

One task reads AND decodes one row group: a unit of similar size whatever the shard size, no separate file
listing/footer stage per epoch, and the encoded bytes never pass through the object store.

Rows (compact, uint8, so 4x fewer bytes move through the object store and to the GPU):

- ``image``  uint8 ``N x 3 x S x S`` (0..255);  ``mask`` uint8 ``N x 1 x S x S`` in {0, 1} (1 = valid);
- ``id``     int64 stable id of the source key (:func:`pconv.storage.shards.key_id`) — for checks and debugging;
- ``skipped`` int32: the number of corrupt rows dropped while building this data. Rows that fail to decode are
  logged (key + reason) and dropped; the count is put on the next surviving row of the same unit, so the SUM of
  ``skipped`` over everything a consumer sees equals the number of dropped rows (re-batching preserves sums).
  A unit whose rows are ALL corrupt has no row to carry its count: it is only logged (as an error).

Batches. :func:`pconv.data.inputs.iter_batches` (or ``iter_torch_batches(collate_fn=float_collate())``) yields the
model inputs of the architecture contract: float32 ``image`` in [0, 1], float32 ``mask``, optional ``masked``. The
training loop iterates the uint8 rows and converts on its device (:func:`pconv.data.inputs.to_float_batch`).
The read/decode tasks tune their allocator (:func:`pconv.data.allocator.reuse_freed_memory`).

Epochs. Every execution of a dataset (each pass of ``iter_torch_batches`` over a Ray Train dataset shard, i.e.
each training epoch) gets a new, seeded unit order and new row orders, crops, flips and masks: seeded from
``seed`` (bit-exact across runs with ``deterministic=True``) yet different per epoch. ``epoch`` is mixed into the
seed too, so rebuilding the dataset for epoch e + 1 (:func:`iter_train_batches`) also changes the order.

Resources. The read+decode tasks request a small explicit CPU share (``num_cpus``, default 0.5) with a bounded
``concurrency``, so they still schedule when training workers hold most CPUs of a small machine (with 1-CPU
tasks and two 1-CPU workers on 2 CPUs nothing would ever run: "Cluster resources are not enough" is a hang).
The training driver plans CPUs for them beside its workers on the cluster as its autoscaler can make it
(:mod:`pconv.cluster`); ``concurrency`` bounds the task pool by the CPUs the cluster can reach, and Ray Data runs as
many tasks as the CPUs present allow, so decoding grows as nodes join.

Masks are small (12,000 x ~2.5 KB): the whole mask set is read once on the driver into one contiguous byte
buffer + offsets, ``ray.put`` once, and every task samples from it (zero-copy numpy from the object store).

Validation is fixed: :func:`build_val_dataset` / :func:`load_val_pairs` pair val image i (sorted keys) with mask
``(i * stride) mod M`` (sorted mask keys, stride = max(1, M // n)) — spread over the whole mask set so every
hole-ratio bin of the NVIDIA set appears — with a centre crop and no augmentation: the same pairs on every run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from pconv import cluster

from pconv.storage import shards

from pconv.storage import uris as storage
from pconv.data import transforms
from pconv.data.allocator import reuse_freed_memory
from pconv.data.inputs import iter_batches, to_float
from pconv.data.transforms import MaskBank, SRPairs, derive_seed, load_mask_bank, val_pairing

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

log = logging.getLogger(__name__)

DEFAULT_NUM_CPUS = 0.5          # CPU request of each read/decode task (fractional: see module docstring)
DEFAULT_BLOCK_MB = 32.0         # Ray Data block size target of the decoded rows (~32 rows at 512 px)
_DECODE_BYTES = 8 * 2**20       # cap on one decode call's uint8 output: 8 rows at 512 px (small buffers get reused)
_MAX_INPUT_BLOCKS = 4096        # read units are spread over at most this many input blocks (= tasks)
_BANK_REFS: dict[tuple, Any] = {}   # driver side: (masks root, manifest run, split, job, node) -> ObjectRef
_BANK_LOCAL: dict[str, MaskBank] = {}  # task side: ObjectRef hex -> bank, one ray.get per worker process


def _bank_ref(masks_uri: str, split: str = "train") -> Any:
    """ObjectRef of the mask bank, put once per driver/job and reused across epochs/rebuilds (SRPairs: itself)."""
    import ray

    if isinstance(masks_uri, SRPairs):
        return masks_uri
    manifest = shards.read_manifest(masks_uri)
    ctx = ray.get_runtime_context()  # a new cluster (ray.shutdown + ray.init) may reuse job ids, not node ids
    key = (masks_uri, manifest.get("run_id"), split, ctx.get_job_id(), ctx.get_node_id())
    if key not in _BANK_REFS:
        bank = load_mask_bank(masks_uri, split)
        _BANK_REFS[key] = ray.put(bank)
        log.info("mask bank %s (%s): %d masks, %.1f MB broadcast", masks_uri, split, len(bank), bank.buf.nbytes / 1e6)
    return _BANK_REFS[key]


def _resolve_bank(holder: list) -> MaskBank:
    """Task side: the bank behind ``[ref]`` (wrapped in a list so Ray passes the ref, not the value)."""
    import ray

    ref = holder[0]
    if isinstance(ref, SRPairs):
        return ref
    hexid = ref.hex()
    if hexid not in _BANK_LOCAL:
        _BANK_LOCAL.clear()  # one bank per process at a time
        _BANK_LOCAL[hexid] = ray.get(ref)
    return _BANK_LOCAL[hexid]


def rows_per_block(image_size: int) -> int:
    """Rows decoded together (and yielded as one piece) so one decode call's uint8 output stays <= ~8 MB."""
    return int(max(1, min(64, _DECODE_BYTES // (4 * image_size * image_size))))


def _unit_rows(unit_uri: str, group: int, unit_rand: float, base_seed: int,
               shuffle: bool) -> tuple[np.ndarray, ...]:
    """(keys, blobs, per-row random numbers) of one row group; with ``shuffle`` the rows come in a seeded order
    (per unit and epoch), without it in file order with zeros as random numbers."""
    table = shards.read_row_group(unit_uri, group, ["key", "image"])
    keys = np.array(table.column("key").to_pylist(), dtype=object)
    blobs = np.array(table.column("image").to_pylist(), dtype=object)
    if not shuffle:
        return keys, blobs, np.zeros(len(keys))
    rng = np.random.default_rng([base_seed, int(float(unit_rand) * 2**53)])
    order = rng.permutation(len(keys))
    return keys[order], blobs[order], rng.random(len(keys))


def _read_ahead(todo: list[tuple[str, int, float]], base_seed: int,
                shuffle: bool) -> Iterator[tuple[str, int, tuple[np.ndarray, ...]]]:
    """``(uri, group, rows of _unit_rows)`` for each ``(uri, group, unit_rand)`` of ``todo``, in order; the next
    unit is read in a background thread while the caller decodes this one (object-storage latency hidden behind
    CPU work)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pconv-read") as reader:
        pending = reader.submit(_unit_rows, *todo[0], base_seed, shuffle) if todo else None
        for j, (uri, group, _) in enumerate(todo):
            rows = pending.result()
            if j + 1 < len(todo):
                pending = reader.submit(_unit_rows, *todo[j + 1], base_seed, shuffle)
            yield uri, group, rows


def _train_units_udf(units: dict[str, np.ndarray], *, bank: list, image_size: int,
                     base_seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Read + decode read units (row groups) into training rows, a few rows at a time. The units of one input
    block are taken in a per-epoch random order, each read while the previous one is decoded.

    Positioned units (``pos0`` and ``skip`` columns, :mod:`pconv.data.plan`) are taken in the given order; the
    first ``skip`` rows of a unit's (seeded) row order are dropped before decoding, and every row carries ``pos``
    = ``pos0`` + its index in that order (its place in the worker's epoch: the data position)."""
    reuse_freed_memory()
    mask_bank = _resolve_bank(bank)
    step = rows_per_block(image_size)
    positioned = "pos0" in units
    order = range(len(units["uri"])) if positioned else np.argsort(units["_rand"], kind="stable")
    todo = [(str(units["uri"][i]), int(units["row_group"][i]), float(units["_rand"][i])) for i in order]
    for j, (uri, group, (keys, blobs, rands)) in enumerate(_read_ahead(todo, base_seed, shuffle=True)):
        if positioned and "lo" in units:  # a slice [lo, hi) of the unit's seeded row order (small datasets)
            lo, hi = int(units["lo"][order[j]]), int(units["hi"][order[j]])
            keys, blobs, rands = keys[lo:hi], blobs[lo:hi], rands[lo:hi]
        skip = int(units["skip"][order[j]]) if positioned else 0
        pos = int(units["pos0"][order[j]]) + np.arange(len(keys), dtype=np.int64) if positioned else None
        keys, blobs, rands = keys[skip:], blobs[skip:], rands[skip:]
        carry = 0  # corrupt rows not yet reported on a surviving row
        for s in range(0, len(keys), step):
            rows = {"key": keys[s:s + step], "image": blobs[s:s + step], "_rand": rands[s:s + step]}
            if positioned:
                rows["pos"] = pos[skip + s:skip + s + step]
            out = transforms.train_transform(rows, image_size=image_size, base_seed=base_seed, bank=mask_bank)
            if len(out["id"]) == 0:
                carry += len(keys[s:s + step])
                continue
            out["skipped"][0] += carry
            carry = 0
            yield out
        if carry:
            log.error("training data: %s row group %d: %d corrupt rows after the last good one (not counted "
                      "in 'skipped')", uri, group, carry)


def _val_units_udf(units: dict[str, np.ndarray], *, bank: list, image_size: int,
                   pairing: dict[str, tuple[int, int]]) -> Iterator[dict[str, np.ndarray]]:
    """Read + decode the val units of one input block in file order, each read while the previous one is
    decoded."""
    reuse_freed_memory()
    mask_bank = _resolve_bank(bank)
    step = rows_per_block(image_size)
    todo = [(str(uri), int(group), 0.0) for uri, group in zip(units["uri"], units["row_group"])]
    for _, _, (keys, blobs, _) in _read_ahead(todo, 0, shuffle=False):
        for s in range(0, len(keys), step):
            yield transforms.val_transform({"key": keys[s:s + step], "image": blobs[s:s + step]}, image_size=image_size,
                                  bank=mask_bank, pairing=pairing)


# ---------------------------------------------------------------------------------------------
# Ray Datasets
# ---------------------------------------------------------------------------------------------
def _image_manifest(images_uri: str) -> dict[str, Any]:
    return shards.read_manifest(images_uri, kind=shards.IMAGES_KIND)


def read_units(images_uri: str, split: str, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The read units of one split: ``{"uri", "row_group", "rows"}`` per Parquet row group, in manifest order.
    Row-group sizes come from the manifest (older manifests: from each shard's footer, read in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    manifest = manifest if manifest is not None else _image_manifest(images_uri)
    entries = [e for e in manifest["shards"] if e["split"] == split]
    uris = [storage.join(images_uri, e["path"]) for e in entries]
    with ThreadPoolExecutor(max_workers=16) as pool:
        groups = list(pool.map(shards.row_groups, uris, entries))
    return [{"uri": uri, "row_group": g, "rows": n} for uri, sizes in zip(uris, groups) for g, n in enumerate(sizes)]


MIN_FREE_CPUS = 1.0  # one CPU's worth of decode tasks: less starves training of data on any real cluster


def default_concurrency(num_cpus: float, cpus: float | None = None) -> int:
    """The most concurrent read/decode tasks: ~75 % of ``cpus`` in requests, and at most one task per CPU —
    decoding is CPU-bound, so more tasks than cores only add worker processes (which Ray then stops and
    restarts around every epoch, re-importing everything). ``cpus``: the CPUs the cluster can reach (with an
    autoscaler: at full scale, :func:`pconv.cluster.reachable`); by default those of the connected cluster."""
    import ray

    if cpus is None and ray.is_initialized():
        cpus = cluster.reachable_or_now(cluster.read_view(), "CPU")
    cpus = max(1.0, min(float(cpus or 1.0), _MAX_INPUT_BLOCKS / 4))  # unbounded node types: the input-block limit
    return max(1, min(int(cpus * 0.75 / num_cpus), int(cpus)))


def _units_dataset(images_uri: str, split: str, *, shuffle_seed: int | None, concurrency: int,
                   manifest: dict[str, Any] | None = None):
    """(dataset of read units in ~4 blocks per concurrent task, number of blocks); a new seeded block order per
    execution."""
    import ray.data

    manifest = manifest if manifest is not None else _image_manifest(images_uri)
    units = read_units(images_uri, split, manifest)
    if not units:
        raise ValueError(f"{images_uri}: no {split} shards (counts={manifest.get('counts')})")
    if shuffle_seed is not None:  # blocks mix row groups of different shards (the grouping is fixed per dataset)
        units = [units[i] for i in np.random.default_rng(shuffle_seed).permutation(len(units))]
    # A few units per input block (= per task): the task reads the next unit while decoding one, and still
    # about 4 blocks per concurrent task keep the load balanced to the end of the epoch.
    n_blocks = max(1, min(len(units), 4 * concurrency, _MAX_INPUT_BLOCKS))
    ds = ray.data.from_items(units, override_num_blocks=n_blocks)
    if shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True))
    return ds, n_blocks


def _tune_context(ctx: "ray.data.DataContext", block_mb: float) -> None:
    """Ray Data settings of one dataset (its own DataContext copy; other datasets keep the defaults).

    The pipeline is one real operator whose tasks are coarse (a block of row groups: ~100 MB of uint8 rows
    each), which two of Ray Data's scheduling heuristics misjudge; measured with
    ``benchmarks/data_throughput.py`` on 2 CPUs, they left a decode slot idle for 10-20 % of every epoch:

    - op resource reservation held the second decode task back until the first one finished (~1 s at the
      start of every epoch) — there is no other operator to reserve resources for;
    - the downstream-capacity policy compares the running tasks' pending outputs with the consumer's one or two
      batches in flight, so it stopped new decode tasks most of the time.

    Memory stays bounded by Ray Data's object-store budget (its resource-budget policy) and the task
    concurrency cap. ``block_mb`` caps the size of the output blocks.
    """
    ctx.target_max_block_size = int(block_mb * 2**20)
    ctx.op_resource_reservation_enabled = False
    ctx.downstream_capacity_backpressure_ratio = None


def build_train_dataset(images_uri: str, masks_uri: str, image_size: int, seed: int = 0, epoch: int = 0, *,
                        num_cpus: float = DEFAULT_NUM_CPUS, concurrency: int | None = None,
                        mask_split: str = "train", deterministic: bool = False,
                        block_mb: float = DEFAULT_BLOCK_MB) -> "ray.data.Dataset":
    """Lazy training dataset of (image, mask, id, skipped) uint8 rows — see the module docstring.

    Never materialised: each iteration streams the shards again with a new seeded order and new augmentations.
    ``num_cpus`` / ``concurrency`` bound what the read+decode tasks take from the cluster.

    Reproducibility: the unit order and every random draw are seeded by (seed, epoch, execution), but parallel
    tasks finish in varying order, so the order rows arrive in can differ between two runs (Ray Data's documented
    behaviour). ``deterministic=True`` sets ``preserve_order`` on this dataset: bit-identical streams for the
    same (seed, epoch) at some throughput cost (for debugging and tests).

    ``block_mb`` caps Ray Data's block size for the decoded rows (default 32 MB): the blocks Ray Train splits
    between workers and the consumer's prefetch stay small.
    """
    import ray
    from ray.data.expressions import random as rand_expr

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    cluster.connect()
    concurrency = concurrency or default_concurrency(num_cpus)
    base = derive_seed("train", seed, epoch)
    ds, n_blocks = _units_dataset(images_uri, "train", shuffle_seed=base % 2**31, concurrency=concurrency)
    compute = ray.data.TaskPoolStrategy(size=min(concurrency, n_blocks))  # a tiny dataset has fewer blocks
    ds = ds.with_column("_rand", rand_expr(seed=(base >> 1) % 2**31, reseed_after_execution=True),
                        num_cpus=num_cpus, compute=compute)
    ds = ds.map_batches(  # batch_size=None: one call gets the block's units, so it can read ahead
        _train_units_udf, batch_size=None, batch_format="numpy",
        fn_kwargs={"image_size": image_size, "base_seed": base, "bank": [_bank_ref(masks_uri, mask_split)]},
        num_cpus=num_cpus, compute=compute)
    _tune_context(ds.context, block_mb)
    if deterministic:
        ds.context.execution_options.preserve_order = True
    return ds


def build_val_dataset(images_uri: str, masks_uri: str, image_size: int, limit: int | None = None, *,
                      num_cpus: float = DEFAULT_NUM_CPUS, concurrency: int | None = None) -> "ray.data.Dataset":
    """Validation dataset: fixed image/mask pairs (``index``, ``mask_index`` columns), centre crop, no augmentation.
    Row order is not guaranteed across runs; the pairs are (sort by ``index`` if order matters)."""
    import ray

    cluster.connect()
    concurrency = concurrency or default_concurrency(num_cpus)
    manifest = _image_manifest(images_uri)
    keys = shards.read_table(shards.shard_uris(images_uri, manifest, "val"), ["key"]).column("key").to_pylist()
    if not keys:
        raise ValueError(f"{images_uri}: the val split is empty (counts={manifest.get('counts')}); "
                         "re-run prepare_data.py images with --val-fraction > 0")
    ref = _bank_ref(masks_uri, "val")
    n_masks = len(ref) if isinstance(ref, SRPairs) else len(ray.get(ref))
    pairing = val_pairing(keys, n_masks, limit)
    ds, n_blocks = _units_dataset(images_uri, "val", shuffle_seed=None, concurrency=concurrency, manifest=manifest)
    ds = ds.map_batches(_val_units_udf, batch_size=None, batch_format="numpy",  # the block's units: read-ahead
                        fn_kwargs={"image_size": image_size, "bank": [ref], "pairing": pairing},
                        num_cpus=num_cpus, compute=ray.data.TaskPoolStrategy(size=min(concurrency, n_blocks)))
    _tune_context(ds.context, DEFAULT_BLOCK_MB)
    return ds


def load_val_pairs(images_uri: str, masks_uri: str, image_size: int, limit: int | None = None,
                   include_masked: bool = False) -> dict[str, Any] | None:
    """The fixed validation pairs as numpy arrays, without Ray (sample grids, validation metrics).

    Returns ``{"image": N x 3 x S x S, "mask": N x 1 x S x S (float32), "keys", "mask_keys", "bin", "border",
    "skipped"}`` ordered by sorted image key, or None (logged) when the images have no val split. Same pairing
    as :func:`build_val_dataset`. Memory stays bounded: the pairing is fixed from the ``key`` column alone, then
    only the row groups holding the first ``limit`` keys are read (one at a time) and only those rows decoded.
    """
    manifest = _image_manifest(images_uri)
    units = read_units(images_uri, "val", manifest)
    if not units:
        log.warning("%s has no val split (counts=%s): no validation pairs", images_uri, manifest.get("counts"))
        return None
    unit_keys = [shards.read_row_group(u["uri"], u["row_group"], ["key"]).column("key").to_pylist() for u in units]
    bank = load_mask_bank(masks_uri, "val")
    pairing = val_pairing([k for keys in unit_keys for k in keys], len(bank), limit)
    parts = []
    for u, keys in zip(units, unit_keys):
        rows = [i for i, k in enumerate(keys) if k in pairing]
        if rows:
            table = shards.read_row_group(u["uri"], u["row_group"], ["key", "image"]).take(rows)
            parts.append(transforms.val_transform({"key": np.array(table.column("key").to_pylist(), dtype=object),
                                          "image": np.array(table.column("image").to_pylist(), dtype=object)},
                                         image_size=image_size, bank=bank, pairing=pairing))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # val_transform's columns (sr: + "lr")
    order = np.argsort(out["index"], kind="stable")
    result: dict[str, Any] = to_float(out["image"][order], out["mask"][order], include_masked)
    inv = {i: k for k, (i, _) in pairing.items()}
    result["keys"] = [inv[int(i)] for i in out["index"][order]]
    mi = out["mask_index"][order]
    result["mask_keys"] = [bank.keys[int(j)] for j in mi]
    result["bin"], result["border"] = bank.bins[mi], bank.border[mi]
    result["skipped"] = int(out["skipped"].sum())
    result.update({"lr": out["lr"][order]} if "lr" in out else {})  # task sr: uint8 LR crops (pconv.data.transforms)
    return result


def iter_train_batches(images_uri: str, masks_uri: str, image_size: int, batch_size: int, *, seed: int = 0,
                       start_epoch: int = 0, local_shuffle_buffer_size: int | None = None, include_masked: bool = False,
                       **dataset_kwargs: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """Endless ``(epoch, float batch)`` stream for step-based loops outside Ray Train: the dataset is rebuilt with
    ``epoch + 1`` after each pass (new order and augmentations). Stop by breaking out. Inside Ray Train iterate
    ``ray.train.get_dataset_shard("train")`` repeatedly instead (each pass is re-seeded)."""
    epoch = start_epoch
    while True:
        ds = build_train_dataset(images_uri, masks_uri, image_size, seed=seed, epoch=epoch, **dataset_kwargs)
        n = 0
        for batch in iter_batches(ds, batch_size, drop_last=True, include_masked=include_masked,
                                  local_shuffle_buffer_size=local_shuffle_buffer_size,
                                  local_shuffle_seed=derive_seed("shuffle", seed, epoch) % 2**31
                                  if local_shuffle_buffer_size else None):
            n += 1
            yield epoch, batch
        if n == 0:
            raise RuntimeError(f"{images_uri}: epoch {epoch} produced no full batch of {batch_size}")
        epoch += 1
