"""Ray Data pipelines that stream image shards from object storage into training batches.

Training (:func:`build_train_dataset`)::

    read_parquet(train shards, S3 filesystem from the env, files shuffled per execution)
      -> with_column("_rand", random(seed, reseed_after_execution=True))   # per-row, per-epoch random numbers
      -> map_batches(decode JPEG/PNG at reduced scale, resize short side, random crop + hflip,
                     pair with a random mask from the broadcast mask bank, augment it, build float tensors)

Batches (``iter_torch_batches``) carry:

- ``image``  float32 ``N x 3 x S x S`` in [0, 1];  ``mask`` float32 ``N x 1 x S x S`` in {0, 1} (1 = valid);
- ``masked`` = image * mask (optional, ``include_masked``);
- ``id``     int64 stable id of the source key (:func:`pconv.shards.key_id`) — for checks and debugging;
- ``skipped`` int32: the number of corrupt rows dropped while building this data. Rows that fail to decode are
  logged (key + reason) and dropped; the count of a decode batch is put on its first surviving row, so the SUM of
  ``skipped`` over everything a consumer sees equals the number of dropped rows (re-batching preserves sums).
  A decode batch whose rows are ALL corrupt has no row to carry its count: it is only logged.

Epochs. Every execution of a dataset (each pass of ``iter_torch_batches`` over a Ray Train dataset shard, i.e.
each training epoch) gets a new, seeded shard order (``FileShuffleConfig(reseed_after_execution=True)``) and new
crops / flips / masks (the ``_rand`` column uses ``random(..., reseed_after_execution=True)``): seeded from
``seed`` (bit-exact across runs with ``deterministic=True``) yet different per epoch. ``epoch`` is mixed into the seed too, so rebuilding the dataset for epoch e + 1
(:func:`iter_train_batches`, for step-based loops outside Ray Train) also changes the order.

Resources. Read + transform run as Ray TASKS with a small explicit CPU request (``num_cpus``, default 0.5) and a
bounded ``concurrency``, so they still schedule when training workers hold most CPUs of a small machine (with
1-CPU tasks and two 1-CPU workers on 2 CPUs nothing would ever run: "Cluster resources are not enough" is a hang).
Ray Train also excludes its workers' resources from Ray Data's budget, and Ray 2.60's Parquet reader lists files
in a short task that asks for a whole CPU, so the cluster needs >= 1 CPU beyond the training workers:
:func:`check_headroom` turns that hang into an error before training starts.

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

from pconv import shards, storage
from pconv import transforms as T
from pconv.transforms import MaskBank, derive_seed, load_mask_bank, val_pairing

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

log = logging.getLogger(__name__)

DEFAULT_NUM_CPUS = 0.5          # CPU request of each read/decode task (fractional: see module docstring)
DEFAULT_BLOCK_MB = 32.0         # Ray Data block size target: ~100-300 encoded photos per decode task
_BLOCK_BYTES = 32 * 2**20       # cap on one decode call's float32 output
_BANK_REFS: dict[tuple, Any] = {}   # driver side: (masks root, manifest run, split, job, node) -> ObjectRef
_BANK_LOCAL: dict[str, MaskBank] = {}  # task side: ObjectRef hex -> bank, one ray.get per worker process


def _bank_ref(masks_uri: str, split: str = "train") -> Any:
    """ObjectRef of the mask bank, put once per driver/job and reused across epochs/rebuilds."""
    import ray

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
    hexid = ref.hex()
    if hexid not in _BANK_LOCAL:
        _BANK_LOCAL.clear()  # one bank per process at a time
        _BANK_LOCAL[hexid] = ray.get(ref)
    return _BANK_LOCAL[hexid]


def _train_udf(batch: dict[str, np.ndarray], *, bank: list, **kwargs: Any) -> dict[str, np.ndarray]:
    return T.train_transform(batch, bank=_resolve_bank(bank), **kwargs)


def _val_udf(batch: dict[str, np.ndarray], *, bank: list, **kwargs: Any) -> dict[str, np.ndarray]:
    return T.val_transform(batch, bank=_resolve_bank(bank), **kwargs)


# ---------------------------------------------------------------------------------------------
# Ray Datasets
# ---------------------------------------------------------------------------------------------
def _image_manifest(images_uri: str) -> dict[str, Any]:
    manifest = shards.read_manifest(images_uri)
    if manifest.get("kind") != "images":
        raise ValueError(f"{images_uri}: manifest kind is {manifest.get('kind')!r}, expected 'images'")
    return manifest


def rows_per_block(image_size: int, include_masked: bool = True) -> int:
    """Rows per decode call so its float32 output (7 or 4 channels of S x S per row) stays <= ~32 MB."""
    per_row = (7 if include_masked else 4) * 4 * image_size * image_size
    return int(max(1, min(64, _BLOCK_BYTES // per_row)))


MIN_FREE_CPUS = 1.0  # Ray Data's ListFiles task (read_parquet, datasource V2) requests one full CPU


def check_headroom(cluster_cpus: float, training_cpus: float, num_cpus: float = DEFAULT_NUM_CPUS) -> None:
    """ValueError if the CPUs left after the training workers cannot run the data pipeline (it would hang)."""
    free = cluster_cpus - training_cpus
    need = max(MIN_FREE_CPUS, num_cpus)
    if free < need:
        raise ValueError(
            f"the Ray cluster has {cluster_cpus:g} CPUs and training workers take {training_cpus:g}: the data "
            f"pipeline needs at least {need:g} free CPU(s) (file listing + decode tasks), or it hangs. Lower the "
            "CPUs per worker (e.g. 0.5 on CPU-only machines), use fewer workers, or add CPUs.")


def default_concurrency(num_cpus: float) -> int:
    """At most ~75 % of the cluster's CPUs for data tasks (at least 1 task), leaving room for trainers."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0)) if ray.is_initialized() else 1.0
    return max(1, int(cpus * 0.75 / num_cpus))


def _read(images_uri: str, split: str, *, shuffle_seed: int | None, num_cpus: float, concurrency: int):
    import ray.data
    from ray.data import FileShuffleConfig

    manifest = _image_manifest(images_uri)
    uris = shards.shard_uris(images_uri, manifest, split)
    if not uris:
        raise ValueError(f"{images_uri}: no {split} shards (counts={manifest.get('counts')})")
    fs, paths = storage.ray_paths(uris)  # with a filesystem, Ray wants scheme-less paths
    shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle, num_cpus=num_cpus,
                               compute=ray.data.TaskPoolStrategy(size=concurrency))
    return ds.select_columns(["key", "image"]), manifest


def build_train_dataset(images_uri: str, masks_uri: str, image_size: int, seed: int = 0, epoch: int = 0, *,
                        num_cpus: float = DEFAULT_NUM_CPUS, concurrency: int | None = None,
                        batch_size: int | None = None, include_masked: bool = True,
                        mask_split: str = "train", deterministic: bool = False,
                        block_mb: float = DEFAULT_BLOCK_MB) -> "ray.data.Dataset":
    """Lazy training dataset of (image, mask, masked, id, skipped) rows — see the module docstring.

    Never materialised: each iteration streams the shards again with a new seeded order and new augmentations.
    ``num_cpus`` / ``concurrency`` bound what the read+decode tasks take from the cluster.

    Reproducibility: the shard order and every random draw are seeded by (seed, epoch, execution), but parallel
    reads finish in varying order, so which row meets which random numbers can differ between two runs (Ray Data's
    documented behaviour). ``deterministic=True`` sets ``preserve_order`` on this dataset: bit-identical streams
    for the same (seed, epoch) at some throughput cost (for debugging and tests).

    ``block_mb`` caps Ray Data's block size for this dataset (default 32 MB instead of Ray's 128 MB): a 256 MB shard
    is cut into many small blocks, so decoding spreads over all data tasks instead of one task per shard.
    """
    import ray
    from ray.data.expressions import random as rand_expr

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if not ray.is_initialized():
        ray.init()
    concurrency = concurrency or default_concurrency(num_cpus)
    base = derive_seed("train", seed, epoch)
    ds, _ = _read(images_uri, "train", shuffle_seed=base % 2**31, num_cpus=num_cpus, concurrency=concurrency)
    ds = ds.with_column("_rand", rand_expr(seed=(base >> 1) % 2**31, reseed_after_execution=True),
                        num_cpus=num_cpus, compute=ray.data.TaskPoolStrategy(size=concurrency))
    ds = ds.map_batches(
        _train_udf, batch_size=batch_size or rows_per_block(image_size, include_masked), batch_format="numpy",
        fn_kwargs={"image_size": image_size, "base_seed": base, "bank": [_bank_ref(masks_uri, mask_split)],
                   "include_masked": include_masked},
        num_cpus=num_cpus, compute=ray.data.TaskPoolStrategy(size=concurrency))
    ds.context.target_max_block_size = int(block_mb * 2**20)
    if deterministic:
        ds.context.execution_options.preserve_order = True
    return ds


def build_val_dataset(images_uri: str, masks_uri: str, image_size: int, limit: int | None = None, *,
                      num_cpus: float = DEFAULT_NUM_CPUS, concurrency: int | None = None,
                      include_masked: bool = True) -> "ray.data.Dataset":
    """Validation dataset: fixed image/mask pairs (``index``, ``mask_index`` columns), centre crop, no augmentation.
    Row order is not guaranteed across runs; the pairs are (sort by ``index`` if order matters)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    concurrency = concurrency or default_concurrency(num_cpus)
    manifest = _image_manifest(images_uri)
    keys = shards.read_table(shards.shard_uris(images_uri, manifest, "val"), ["key"]).column("key").to_pylist()
    if not keys:
        raise ValueError(f"{images_uri}: the val split is empty (counts={manifest.get('counts')}); "
                         "re-run prepare_data.py images with --val-fraction > 0")
    ref = _bank_ref(masks_uri, "val")
    n_masks = len(ray.get(ref))
    pairing = val_pairing(keys, n_masks, limit)
    ds, _ = _read(images_uri, "val", shuffle_seed=None, num_cpus=num_cpus, concurrency=concurrency)
    ds = ds.map_batches(_val_udf, batch_size=rows_per_block(image_size, include_masked), batch_format="numpy",
                        fn_kwargs={"image_size": image_size, "bank": [ref], "pairing": pairing,
                                   "include_masked": include_masked},
                        num_cpus=num_cpus, compute=ray.data.TaskPoolStrategy(size=concurrency))
    ds.context.target_max_block_size = int(DEFAULT_BLOCK_MB * 2**20)
    return ds


def load_val_pairs(images_uri: str, masks_uri: str, image_size: int, limit: int | None = None,
                   include_masked: bool = False) -> dict[str, Any] | None:
    """The fixed validation pairs as numpy arrays, without Ray (sample grids, validation metrics).

    Returns ``{"image": N x 3 x S x S, "mask": N x 1 x S x S (float32), "keys", "mask_keys", "bin", "border",
    "skipped"}`` ordered by sorted image key, or None (logged) when the images have no val split. Same pairing
    as :func:`build_val_dataset`.
    """
    manifest = _image_manifest(images_uri)
    uris = shards.shard_uris(images_uri, manifest, "val")
    if not uris:
        log.warning("%s has no val split (counts=%s): no validation pairs", images_uri, manifest.get("counts"))
        return None
    table = shards.read_table(uris, ["key", "image"]).sort_by("key")
    bank = load_mask_bank(masks_uri, "val")
    pairing = val_pairing(table.column("key").to_pylist(), len(bank), limit)
    out = T.val_transform({"key": np.array(table.column("key").to_pylist(), dtype=object),
                           "image": np.array(table.column("image").to_pylist(), dtype=object)},
                          image_size=image_size, bank=bank, pairing=pairing, include_masked=include_masked)
    order = np.argsort(out["index"], kind="stable")
    result: dict[str, Any] = {k: out[k][order] for k in ("image", "mask", *(("masked",) if include_masked else ()))}
    inv = {i: k for k, (i, _) in pairing.items()}
    result["keys"] = [inv[int(i)] for i in out["index"][order]]
    mi = out["mask_index"][order]
    result["mask_keys"] = [bank.keys[int(j)] for j in mi]
    result["bin"], result["border"] = bank.bins[mi], bank.border[mi]
    result["skipped"] = int(out["skipped"].sum())
    return result


def iter_train_batches(images_uri: str, masks_uri: str, image_size: int, batch_size: int, *, seed: int = 0,
                       start_epoch: int = 0, local_shuffle_buffer_size: int | None = None,
                       **dataset_kwargs: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """Endless ``(epoch, torch batch)`` stream for step-based loops outside Ray Train: the dataset is rebuilt with
    ``epoch + 1`` after each pass (new order and augmentations). Stop by breaking out. Inside Ray Train iterate
    ``ray.train.get_dataset_shard("train").iter_torch_batches(...)`` repeatedly instead (each pass is re-seeded)."""
    epoch = start_epoch
    while True:
        ds = build_train_dataset(images_uri, masks_uri, image_size, seed=seed, epoch=epoch, **dataset_kwargs)
        n = 0
        for batch in ds.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                           local_shuffle_buffer_size=local_shuffle_buffer_size,
                                           local_shuffle_seed=derive_seed("shuffle", seed, epoch) % 2**31
                                           if local_shuffle_buffer_size else None):
            n += 1
            yield epoch, batch
        if n == 0:
            raise RuntimeError(f"{images_uri}: epoch {epoch} produced no full batch of {batch_size}")
        epoch += 1
