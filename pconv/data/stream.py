"""Image shards -> training and validation rows: Ray Data streams for the training workers, in-process val pairs.

Training (one stream per Ray Train worker, :func:`worker_stream`). Every worker computes the epoch plan by itself
(:mod:`pconv.data.plan`: the train split's read units dealt to the ranks in a seeded order) and, per epoch, builds its
own dataset (:class:`WorkerDatasets`)::

    this rank's units of the epoch from its data position on (pconv.data.plan.remaining_units)
      -> from_items(units), a few units per input block
      -> map_batches(decode_train_units: read a row group (the next one read ahead), put its rows in their seeded
                     order, drop the rows before the position, decode JPEG/PNG at reduced scale, resize the short
                     side, random crop + hflip, pair each crop (pconv.data.transforms.PairSource))
      -> preserve_order: what the worker consumed is always a prefix of its sequence (exact resume)

One task reads AND decodes its units (row groups): a unit of similar size whatever the shard size, no separate file
listing/footer stage per epoch, and the encoded bytes never pass through the object store. The worker iterates
``iter_torch_batches`` of uint8 rows and converts them on its device (:func:`pconv.data.inputs.to_float_batch`);
:class:`pconv.data.plan.WorkerStream` moves it from epoch to epoch in step with the other ranks.

Rows (compact, uint8, so 4x fewer bytes move through the object store and to the GPU):

- ``image``  uint8 ``N x 3 x S x S`` (0..255);  ``mask`` uint8 ``N x 1 x S x S`` in {0, 1} (1 = valid);
- the pair source's columns (SR: ``lr``, :mod:`pconv.data.transforms`);
- ``id``     int64 stable id of the source key (:func:`pconv.storage.shards.key_id`) — for checks and debugging;
- ``pos``    int64 the row's place in the worker's epoch sequence (its data position, :mod:`pconv.data.plan`);
- ``skipped`` int32: the number of corrupt rows dropped while building this data. Rows that fail to decode are
  logged (key + reason) and dropped; each surviving row counts the corrupt rows between the previous surviving
  row of its unit and itself, and a unit's last surviving row also counts the corrupt rows after it. So the SUM
  of ``skipped`` over everything a consumer sees equals the number of dropped rows (re-batching preserves sums),
  and it stays exact across a resume (issue 25): a data position is the row after a consumed (surviving) row, so
  the corrupt rows before it were all counted on rows the checkpointed run consumed, and those after it on rows
  the resumed stream yields — what the resumed stream counts depends on the positions only, not on where its
  decode pieces begin. A unit slice whose rows are ALL corrupt has no row to carry its count: it is only logged
  (as an error).

Epochs. Each epoch's dataset is built anew: a new seeded unit order and deal (:func:`pconv.data.plan.epoch_plan`),
new row orders, crops, flips and masks, all from ``(seed, epoch)`` — the same on every run, different per epoch.
The read/decode tasks tune their allocator (:func:`pconv.data.allocator.reuse_freed_memory`).

Resources. The read+decode tasks request a small explicit CPU share (``num_cpus``, default 0.5) with a bounded
``concurrency``, so they still schedule when training workers hold most CPUs of a small machine (with 1-CPU
tasks and two 1-CPU workers on 2 CPUs nothing would ever run: "Cluster resources are not enough" is a hang).
The training driver plans CPUs for them beside its workers on the cluster as its autoscaler can make it
(:mod:`pconv.cluster`); ``concurrency`` bounds each rank's task pool by its share of the CPUs the cluster can reach.

The pair source (a mask bank is small: 12,000 x ~2.5 KB in one contiguous byte buffer + offsets) is put into the
object store once per worker, and every task of every epoch samples from it (zero-copy numpy from the store).

Validation is fixed and read without Ray (:func:`load_val_pairs`): val image i (sorted keys) is paired with fixed
mask ``(i * stride) mod M`` of the pair source (:func:`pconv.data.transforms.val_pairing`), centre crop, no
augmentation: the same pairs on every run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from pconv import cluster
from pconv.data import transforms
from pconv.data.allocator import reuse_freed_memory
from pconv.data.inputs import to_float_batch
from pconv.data.plan import DataPosition, Segment, WorkerStream, rank_plan, remaining_units
from pconv.data.transforms import PairSource, derive_seed, val_pairing
from pconv.storage import shards, uris

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

log = logging.getLogger(__name__)

DEFAULT_NUM_CPUS = 0.5          # CPU request of each read/decode task (fractional: see module docstring)
DEFAULT_BLOCK_MB = 32.0         # Ray Data block size target of the decoded rows (~32 rows at 512 px)
_DECODE_BYTES = 8 * 2**20       # cap on one decode call's uint8 output: 8 rows at 512 px (small buffers get reused)
_MAX_INPUT_BLOCKS = 4096        # read units are spread over at most this many input blocks (= tasks)
_PAIRS_LOCAL: dict[str, PairSource] = {}  # task side: ObjectRef hex -> pair source, one ray.get per process


def rows_per_block(image_size: int) -> int:
    """Rows decoded together (and yielded as one piece) so one decode call's uint8 output stays <= ~8 MB."""
    return int(max(1, min(64, _DECODE_BYTES // (4 * image_size * image_size))))


def read_units(images_uri: str, split: str, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The read units of one split: ``{"uri", "row_group", "rows"}`` per Parquet row group, in manifest order.
    Row-group sizes come from the manifest (older manifests: from each shard's footer, read in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    manifest = manifest if manifest is not None else shards.read_manifest(images_uri, kind=shards.IMAGES_KIND)
    entries = [e for e in manifest["shards"] if e["split"] == split]
    paths = [uris.join(images_uri, e["path"]) for e in entries]
    with ThreadPoolExecutor(max_workers=16) as pool:
        groups = list(pool.map(shards.row_groups, paths, entries))
    return [{"uri": uri, "row_group": g, "rows": n} for uri, sizes in zip(paths, groups) for g, n in enumerate(sizes)]


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


def _unit_rows(unit_uri: str, group: int, unit_rand: float, base_seed: int) -> tuple[np.ndarray, ...]:
    """(keys, blobs, per-row random numbers) of one row group, the rows in their seeded order (per unit and epoch)."""
    table = shards.read_row_group(unit_uri, group, ["key", "image"])
    keys = np.array(table.column("key").to_pylist(), dtype=object)
    blobs = np.array(table.column("image").to_pylist(), dtype=object)
    rng = np.random.default_rng([base_seed, int(float(unit_rand) * 2**53)])
    order = rng.permutation(len(keys))
    return keys[order], blobs[order], rng.random(len(keys))


def _read_ahead(todo: list[tuple[str, int, float]], base_seed: int) -> Iterator[tuple[str, int, tuple[np.ndarray, ...]]]:
    """``(uri, group, rows of _unit_rows)`` for each ``(uri, group, unit_rand)`` of ``todo``, in order; the next
    unit is read in a background thread while the caller decodes this one (object-storage latency hidden behind
    CPU work)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pconv-read") as reader:
        pending = reader.submit(_unit_rows, *todo[0], base_seed) if todo else None
        for j, (uri, group, _) in enumerate(todo):
            rows = pending.result()
            if j + 1 < len(todo):
                pending = reader.submit(_unit_rows, *todo[j + 1], base_seed)
            yield uri, group, rows


def decode_train_units(units: dict[str, np.ndarray], *, pairs: PairSource, image_size: int,
                       base_seed: int) -> Iterator[dict[str, np.ndarray]]:
    """The work of one read/decode task, without Ray: read + decode its units (the columns of
    :func:`pconv.data.plan.remaining_units`) into training rows, a few rows at a time, in the given order, each
    unit read while the previous one is decoded.

    Of each unit's seeded row order, the slice ``[lo, hi)`` is this rank's; its first ``skip`` rows are dropped
    before decoding, and every row carries ``pos`` = ``pos0`` + its index in the slice (its data position) and
    ``skipped`` = the corrupt rows it stands for (:func:`_count_dropped`)."""
    reuse_freed_memory()
    step = rows_per_block(image_size)
    n = len(units["uri"])
    todo = [(str(units["uri"][i]), int(units["row_group"][i]), float(units["_rand"][i])) for i in range(n)]
    for i, (uri, group, (keys, blobs, rands)) in enumerate(_read_ahead(todo, base_seed)):
        lo, hi, skip = int(units["lo"][i]), int(units["hi"][i]), int(units["skip"][i])
        keys, blobs, rands = keys[lo:hi], blobs[lo:hi], rands[lo:hi]
        pos = int(units["pos0"][i]) + np.arange(len(keys), dtype=np.int64)
        keys, blobs, rands, pos = keys[skip:], blobs[skip:], rands[skip:], pos[skip:]
        held = None  # the last piece with rows: yielded once the next one has rows or the unit ends (its last
        #             row may still have to count the corrupt rows after it); one extra piece (<= 8 MB) in memory
        last = int(pos[0]) - 1 if len(pos) else 0  # the position of the last surviving row (before: none yet)
        for s in range(0, len(keys), step):
            rows = {"key": keys[s:s + step], "image": blobs[s:s + step], "_rand": rands[s:s + step],
                    "pos": pos[s:s + step]}
            out = transforms.train_transform(rows, image_size=image_size, base_seed=base_seed, pairs=pairs)
            if len(out["id"]) == 0:
                continue
            out["skipped"] = _count_dropped(out["pos"], last)
            last = int(out["pos"][-1])
            if held is not None:
                yield held
            held = out
        trailing = int(pos[-1]) - last if len(pos) else 0  # corrupt rows after the last surviving row
        if held is not None:
            held["skipped"][-1] += trailing
            yield held
        elif trailing and skip:
            log.debug("training data: %s row group %d: %d corrupt rows after row %d, counted before the data "
                      "position", uri, group, trailing, int(pos[0]) - 1)
        elif trailing:
            log.error("training data: %s row group %d: all %d rows of this rank's slice are corrupt (not counted "
                      "in 'skipped')", uri, group, trailing)


def _count_dropped(kept: np.ndarray, last: int) -> np.ndarray:
    """``skipped`` of the surviving rows at positions ``kept`` (increasing, in one unit; the previous surviving row
    at ``last``): each row counts the corrupt rows between the previous surviving row and itself. Which row counts a
    corrupt row depends on the positions alone, not on where a decode piece starts, which keeps the count exact
    across a resume (see the module docstring)."""
    return (np.diff(kept, prepend=last) - 1).astype(np.int32)


def _decode_task(units: dict[str, np.ndarray], *, pairs: list, image_size: int,
                 base_seed: int) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data task: :func:`decode_train_units` with the pair source behind ``[ref]`` (a list, so Ray passes
    the ref, not the value), fetched once per process."""
    import ray

    ref = pairs[0]
    if ref.hex() not in _PAIRS_LOCAL:
        _PAIRS_LOCAL.clear()  # one pair source per process at a time
        _PAIRS_LOCAL[ref.hex()] = ray.get(ref)
    yield from decode_train_units(units, pairs=_PAIRS_LOCAL[ref.hex()], image_size=image_size, base_seed=base_seed)


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
    # No progress bars: a rank's stream is one dataset per epoch (and per resume) inside a worker, whose bars reach
    # the job log as carriage-return frames line by line (30,000 lines in a 60-step, 2-worker CPU job). The loop
    # logs the training's progress (log_every) and the data metrics go to MLflow.
    ctx.enable_progress_bars = False
    ctx.op_resource_reservation_enabled = False
    ctx.downstream_capacity_backpressure_ratio = None


class WorkerDatasets:
    """The Ray Data datasets of one rank of a group of ``world``: :meth:`dataset` gives its rows of an epoch from a
    row on. ``units``: the train split's read units (:func:`read_units`; read here if None). The pair source is put
    into the object store once, here, for the tasks of every epoch.

    ``concurrency``: the most read/decode tasks of this rank; by default the cluster's share
    (:func:`default_concurrency`, as the cluster is when each epoch starts) divided by ``world``. ``block_mb`` caps
    Ray Data's block size for the decoded rows (default 32 MB): the consumer's prefetch stays small."""

    def __init__(self, images_uri: str, pairs: PairSource, image_size: int, units: list[dict[str, Any]] | None, *,
                 seed: int, rank: int, world: int, num_cpus: float = DEFAULT_NUM_CPUS,
                 concurrency: int | None = None, block_mb: float = DEFAULT_BLOCK_MB) -> None:
        import ray

        self.images_uri, self.image_size, self.seed, self.rank, self.world = images_uri, image_size, seed, rank, world
        self.num_cpus, self.concurrency, self.block_mb = num_cpus, concurrency, block_mb
        self.units = units if units is not None else read_units(images_uri, "train")
        self._pairs = [ray.put(pairs)]
        log.info("rank %d: %r shared with the read/decode tasks", rank, pairs)

    def sequence_rows(self, epoch: int, earlier: tuple[Segment, ...] = ()) -> int:
        """The length of this rank's sequence of ``epoch`` (after the ``earlier`` group sizes of the epoch)."""
        return sum(u["rows"] for u in rank_plan(self.units, self.seed, epoch, earlier, self.world)[self.rank])

    def dataset(self, epoch: int, earlier: tuple[Segment, ...] = (), start: int = 0) -> "ray.data.Dataset | None":
        """This rank's rows of ``epoch`` (its plan after the ``earlier`` group sizes of the epoch,
        :func:`pconv.data.plan.rank_plan`) from row ``start`` on (``image``, ``mask``, the pair source's columns,
        ``id``, ``skipped``, ``pos``), in order; None when nothing is left."""
        import ray

        todo = remaining_units(rank_plan(self.units, self.seed, epoch, earlier, self.world)[self.rank], start)
        if not todo:
            return None
        concurrency = self.concurrency or max(1, default_concurrency(self.num_cpus) // self.world)
        n_blocks = max(1, min(len(todo), 4 * concurrency))
        ds = ray.data.from_items(todo, override_num_blocks=n_blocks)
        ds = ds.map_batches(  # batch_size=None: one call gets the block's units, so it can read ahead
            _decode_task, batch_size=None, batch_format="numpy",
            fn_kwargs={"image_size": self.image_size, "base_seed": derive_seed("train", self.seed, epoch),
                       "pairs": self._pairs},
            num_cpus=self.num_cpus, compute=ray.data.TaskPoolStrategy(size=min(concurrency, n_blocks)))
        _tune_context(ds.context, self.block_mb)
        ds.context.execution_options.preserve_order = True  # consumed rows = a prefix of the sequence
        return ds


def worker_stream(images_uri: str, pairs: PairSource, image_size: int, units: list[dict[str, Any]] | None, *,
                  seed: int, batch_size: int, position: DataPosition | None, rank: int, world: int,
                  agree: Callable[[bool], bool], decode_concurrency: int | None = None) -> WorkerStream:
    """Rank ``rank``'s stream inside a Ray Train worker group, from ``position`` (the loop's data input).
    ``agree(has_batch)``: True only when every rank has a batch (the loop's all-reduce; alone: ``has_batch``).
    ``units``: :func:`read_units` (read here if None). ``decode_concurrency``: the most read/decode tasks of ALL
    ranks (the driver's plan; this rank's share is divided by ``world``); None: from the cluster as this worker
    sees it."""
    concurrency = max(1, decode_concurrency // world) if decode_concurrency else None
    datasets = WorkerDatasets(images_uri, pairs, image_size, units, seed=seed, rank=rank, world=world,
                              concurrency=concurrency)
    return WorkerStream(datasets, batch_size, position, rank, world, agree)


# ---------------------------------------------------------------------------------------------
# Validation pairs (in-process)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValPairs:
    """The fixed validation pairs, ordered by image key."""

    rows: dict[str, np.ndarray]  # uint8 ``image`` N x 3 x S x S, ``mask`` N x 1 x S x S, + the pair source's columns
    keys: list[str]              # the image key of each pair
    mask_index: np.ndarray       # int64: the fixed mask of each pair (< PairSource.n_val_masks)
    paired_with: list[str]       # what each image is paired with (PairSource.describe)
    mask_varies: bool            # PairSource.mask_varies: False when every pair has the same mask (SR's grid)
    skipped: int                 # corrupt rows met on the way (logged)

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, device: Any = None) -> dict[str, Any]:
        """The pairs as one batch of model inputs on ``device`` (:func:`pconv.data.inputs.to_float_batch`: float
        ``image``, ``mask`` and the net's ``input``)."""
        import torch

        return to_float_batch({k: torch.from_numpy(v) for k, v in self.rows.items()}, device)


def load_val_pairs(images_uri: str, pairs: PairSource, image_size: int,
                   limit: int | None = None) -> ValPairs | None:
    """The fixed validation pairs of ``images_uri``'s val split with ``pairs``' fixed masks, without Ray (rank 0's
    validation metrics and sample grids), or None (logged) when the images have no val split.

    Memory stays bounded: the pairing is fixed from the ``key`` column alone, then only the row groups holding the
    first ``limit`` keys are read (one at a time) and only those rows decoded.
    """
    manifest = shards.read_manifest(images_uri, kind=shards.IMAGES_KIND)
    units = read_units(images_uri, "val", manifest)
    if not units:
        log.warning("%s has no val split (counts=%s): no validation pairs", images_uri, manifest.get("counts"))
        return None
    unit_keys = [shards.read_row_group(u["uri"], u["row_group"], ["key"]).column("key").to_pylist() for u in units]
    pairing = val_pairing([k for keys in unit_keys for k in keys], pairs.n_val_masks, limit)
    parts = []
    for u, keys in zip(units, unit_keys):
        rows = [i for i, k in enumerate(keys) if k in pairing]
        if rows:
            table = shards.read_row_group(u["uri"], u["row_group"], ["key", "image"]).take(rows)
            parts.append(transforms.val_transform({"key": np.array(table.column("key").to_pylist(), dtype=object),
                                                   "image": np.array(table.column("image").to_pylist(), dtype=object)},
                                                  image_size=image_size, pairs=pairs, pairing=pairing))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(out["index"], kind="stable")
    inv = {i: k for k, (i, _) in pairing.items()}
    mask_index = out["mask_index"][order]
    return ValPairs(rows={k: v[order] for k, v in out.items() if k not in ("index", "mask_index", "skipped")},
                    keys=[inv[int(i)] for i in out["index"][order]], mask_index=mask_index,
                    paired_with=[pairs.describe(int(j)) for j in mask_index], mask_varies=pairs.mask_varies,
                    skipped=int(out["skipped"].sum()))


__all__ = ["DEFAULT_BLOCK_MB", "DEFAULT_NUM_CPUS", "MIN_FREE_CPUS", "ValPairs", "WorkerDatasets",
           "decode_train_units", "default_concurrency", "load_val_pairs", "read_units", "rows_per_block",
           "worker_stream"]
