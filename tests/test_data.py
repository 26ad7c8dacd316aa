"""pconv.data.stream on real Ray, the path the training workers use: image shards -> each rank's dataset of an epoch
(decoded, cropped, paired uint8 rows, in order, with their data position) -> the worker stream across epochs;
corrupt rows; the fixed validation pairs; and the read/decode task's own work without Ray.

The Ray tests run on the session's local Ray (``ray_local``: 2 CPUs, the size of the development machine); the
read/decode tasks request 0.25 CPU, so they schedule beside training workers as on the real machine. Reading the
shards from S3 through this path is covered end to end by tests/test_train_e2e.py (2 workers, ``s3://`` shards).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pconv.data import plan, stream, transforms
from pconv.data.inputs import to_float_batch
from pconv.storage import shards, uris

SIZE = 32


def _train_keys(root: str) -> set[int]:
    manifest = shards.read_manifest(root)
    keys = shards.read_table(shards.shard_uris(root, manifest, "train"), ["key"]).column("key").to_pylist()
    return {shards.key_id(k) for k in keys}


def _datasets(roots: dict[str, str], seed: int, images: str | None = None) -> stream.WorkerDatasets:
    """A lone rank's datasets (as a 1-worker training run builds them)."""
    return stream.WorkerDatasets(images or roots["images"], transforms.load_mask_bank(roots["masks"]), SIZE, None,
                                 seed=seed, rank=0, world=1, num_cpus=0.25)


def _epoch(ds) -> tuple[list[int], dict[int, torch.Tensor], dict[int, torch.Tensor], int, list[int]]:
    """(ids in order, image and mask per id, skipped rows, positions) of one pass, checking the row contract."""
    ids, images, masks, skipped, pos = [], {}, {}, 0, []
    for raw in ds.iter_torch_batches(batch_size=4):
        assert raw["image"].dtype == torch.uint8 and raw["mask"].dtype == torch.uint8
        n = len(raw["id"])
        assert raw["image"].shape == (n, 3, SIZE, SIZE) and raw["mask"].shape == (n, 1, SIZE, SIZE)
        assert set(torch.unique(raw["mask"]).tolist()) <= {0, 1}
        skipped += int(raw["skipped"].sum())
        pos += raw["pos"].tolist()
        for i, id_ in enumerate(raw["id"].tolist()):
            ids.append(id_)
            images[id_], masks[id_] = raw["image"][i], raw["mask"][i]
    return ids, images, masks, skipped, pos


def test_a_ranks_epochs_are_replayable_and_differ_from_each_other(ray_local, prepared_shards):
    datasets = _datasets(prepared_shards, seed=5)
    expected = _train_keys(prepared_shards["images"])
    ids0, img0, mask0, skipped0, pos0 = _epoch(datasets.dataset(0))
    again = _epoch(datasets.dataset(0))  # the same epoch again (a resume replays it): bit-identical, in order
    ids1, img1, mask1, skipped1, _ = _epoch(datasets.dataset(1))
    assert sorted(ids0) == sorted(ids1) == sorted(expected) and skipped0 == skipped1 == 0
    assert pos0 == list(range(len(ids0)))  # rows arrive in the rank's sequence order: consumed = a prefix
    assert again[0] == ids0 and all(torch.equal(again[1][i], img0[i]) and torch.equal(again[2][i], mask0[i])
                                    for i in ids0)
    assert ids0 != ids1, "row order must change between epochs"
    changed = [i for i in ids0 if not torch.equal(img0[i], img1[i]) or not torch.equal(mask0[i], mask1[i])]
    assert len(changed) == len(ids0), "crops/flips/masks must be re-drawn every epoch"
    hole = np.array([1.0 - float(m.float().mean()) for m in mask0.values()])
    assert (hole > 0.0).all() and hole.mean() < 0.8  # real holes, not all-hole masks


def test_a_dataset_from_a_position_is_the_tail_of_the_epoch(ray_local, prepared_shards):
    datasets = _datasets(prepared_shards, seed=2)
    ids, _, _, _, pos = _epoch(datasets.dataset(0))
    tail_ids, _, _, _, tail_pos = _epoch(datasets.dataset(0, start=5))
    assert tail_ids == ids[5:] and tail_pos == pos[5:]
    assert datasets.dataset(0, start=len(ids)) is None  # nothing left of the epoch


def test_the_worker_stream_crosses_epochs(ray_local, prepared_shards):
    n_train = shards.read_manifest(prepared_shards["images"])["counts"]["train"]
    per_epoch = n_train // 4
    batches = stream.worker_stream(prepared_shards["images"], transforms.load_mask_bank(prepared_shards["masks"]),
                                   SIZE, None, seed=1, batch_size=4, position=None, rank=0, world=1,
                                   agree=lambda has_batch: has_batch)
    seen = []
    for _ in range(per_epoch + 2):
        epoch, batch = batches.next()
        assert batch["image"].shape == (4, 3, SIZE, SIZE)
        seen.append(epoch)
    batches.close()
    assert seen == [0] * per_epoch + [1, 1] and (batches.epoch, batches.rows) == (1, 8)


def _corrupt_root(prepared_shards, tmp_path) -> tuple[str, int, int]:
    """A shard root whose single train shard holds real images plus rows that no longer decode."""
    src = prepared_shards["images"]
    manifest = shards.read_manifest(src)
    table = shards.read_table(shards.shard_uris(src, manifest, "train"), ["key", "image", "height", "width",
                                                                          "format", "split"])
    rows = table.to_pylist()[:6]
    good = len(rows)
    rows.append({**rows[0], "key": "bad/truncated.jpg", "image": rows[0]["image"][:300]})
    rows.append({**rows[1], "key": "bad/garbage.png", "image": b"\x89PNG\r\n\x1a\n" + b"\x00" * 50})
    root = str(tmp_path / "corrupt")
    writer = shards.ShardWriter(root, "train", shards.IMAGE_SCHEMA, 2**40, "test", "image")
    for r in rows:
        writer.add(r)
    writer.flush()
    bad_manifest = {**manifest, "shards": writer.shards, "counts": {"train": len(rows), "val": 0}}
    uris.write_bytes_atomic(uris.join(root, shards.MANIFEST), json.dumps(bad_manifest).encode())
    return root, good, len(rows) - good


def test_corrupt_rows_are_skipped_and_counted(ray_local, prepared_shards, tmp_path):
    root, good, bad = _corrupt_root(prepared_shards, tmp_path)
    ids, _, _, skipped, pos = _epoch(_datasets(prepared_shards, seed=0, images=root).dataset(0))
    assert len(ids) == good and skipped == bad == 2
    assert shards.key_id("bad/truncated.jpg") not in ids
    assert len(pos) == good and sorted(pos) == pos  # the dropped rows leave gaps in the sequence, no reordering


def test_validation_pairs_are_fixed(prepared_shards):
    images = prepared_shards["images"]
    bank = transforms.load_mask_bank(prepared_shards["masks"], "val")
    a = stream.load_val_pairs(images, bank, SIZE)
    b = stream.load_val_pairs(images, bank, SIZE)
    n_val = shards.read_manifest(images)["counts"]["val"]
    assert len(a) == n_val and set(a.rows) == {"image", "mask"}  # inpainting: no extra column
    assert a.rows["image"].shape == (n_val, 3, SIZE, SIZE) and a.rows["mask"].shape == (n_val, 1, SIZE, SIZE)
    assert a.rows["image"].dtype == np.uint8 and set(np.unique(a.rows["mask"])) <= {0, 1}
    assert a.keys == sorted(a.keys) and a.paired_with == b.paired_with and a.skipped == 0
    np.testing.assert_array_equal(a.rows["image"], b.rows["image"])
    np.testing.assert_array_equal(a.rows["mask"], b.rows["mask"])
    assert a.paired_with == [bank.keys[int(j)] for j in a.mask_index] and a.mask_varies
    assert len(set(a.paired_with)) == n_val  # spread over the mask set, not the first few
    assert len(set(bank.bins[a.mask_index].tolist())) > 1
    for i, j in enumerate(a.mask_index):  # each pair: its fixed mask, centre square, nearest resize
        np.testing.assert_array_equal(a.rows["mask"][i, 0], transforms.center_square_mask(bank.mask(int(j)), SIZE))
    inputs = a.batch()
    torch.testing.assert_close(inputs["image"] * 255, torch.from_numpy(a.rows["image"]).float(), rtol=0, atol=1e-4)
    limited = stream.load_val_pairs(images, bank, SIZE, limit=2)
    assert limited.keys == a.keys[:2]


def test_read_units_cover_every_row_with_or_without_recorded_row_groups(prepared_shards, tmp_path):
    root = prepared_shards["images"]
    manifest = shards.read_manifest(root)
    units = stream.read_units(root, "train", manifest)
    assert sum(u["rows"] for u in units) == manifest["counts"]["train"]
    assert all(e.get("row_groups") for e in manifest["shards"])  # written by ingestion
    # An older manifest without row-group sizes: the same units, from the shards' Parquet footers.
    legacy = {**manifest, "shards": [{k: v for k, v in e.items() if k != "row_groups"} for e in manifest["shards"]]}
    assert stream.read_units(root, "train", legacy) == units
    rows = sum(shards.read_row_group(u["uri"], u["row_group"], ["key"]).num_rows for u in units)
    assert rows == manifest["counts"]["train"]


def test_a_missing_or_mismatched_shard_is_a_clear_error(prepared_shards, tmp_path):
    root = prepared_shards["images"]
    unit = stream.read_units(root, "train")[0]
    with pytest.raises(ValueError, match="no row group 999"):
        shards.read_row_group(unit["uri"], 999, ["key"])
    with pytest.raises(FileNotFoundError, match="missing"):
        shards.read_row_group(str(tmp_path / "gone.parquet"), 0, ["key"])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="junk.parquet: not a readable Parquet shard"):
        shards.read_row_group(str(tmp_path / "junk.parquet"), 0, ["key"])


def test_rows_are_compact_uint8_and_float_batches_follow_the_contract(ray_local, prepared_shards):
    raw = next(iter(_datasets(prepared_shards, seed=3).dataset(0).iter_torch_batches(batch_size=4)))
    assert set(raw) == {"image", "mask", "id", "skipped", "pos"}
    assert raw["image"].dtype == torch.uint8 and raw["mask"].dtype == torch.uint8
    assert set(torch.unique(raw["mask"]).tolist()) <= {0, 1}
    batch = to_float_batch(raw)
    assert batch["image"].dtype == torch.float32 and batch["mask"].dtype == torch.float32
    torch.testing.assert_close(batch["image"] * 255, raw["image"].float(), rtol=0, atol=1e-4)
    assert torch.equal(batch["mask"], raw["mask"].float()) and batch["input"] is batch["image"]
    assert torch.equal(batch["id"], raw["id"])


def _block(units: list[dict]) -> dict[str, np.ndarray]:
    """A read/decode task's input block: ``units`` as one rank's whole epoch (plan.remaining_units from row 0)."""
    todo = plan.remaining_units([{**u, "_rand": 0.1 * (j + 1)} for j, u in enumerate(units)], 0)
    return {k: np.array([u[k] for u in todo]) for k in ("uri", "row_group", "_rand", "pos0", "skip", "lo", "hi")}


def test_the_next_read_unit_is_fetched_while_one_is_decoded(prepared_shards, monkeypatch):
    """Object-storage latency hides behind decoding: while unit j is decoded, unit j + 1 is already being read.
    (Decoding unit j waits until the read of unit j + 1 has started; a read-then-decode loop fails here.)"""
    import threading

    units = stream.read_units(prepared_shards["images"], "train")[:3]
    assert len(units) == 3
    unit_of = {k: j for j, u in enumerate(units)
               for k in shards.read_row_group(u["uri"], u["row_group"], ["key"]).column("key").to_pylist()}
    bank = transforms.load_mask_bank(prepared_shards["masks"])
    reads, cond = [], threading.Condition()
    real_rows, real_transform = stream._unit_rows, transforms.train_transform

    def rows(uri, group, *args):
        with cond:
            reads.append((uri, group))
            cond.notify_all()
        return real_rows(uri, group, *args)

    def transform(batch, **kwargs):
        j = unit_of[str(batch["key"][0])]
        with cond:
            assert cond.wait_for(lambda: len(reads) >= min(j + 2, len(units)), timeout=10), \
                f"unit {j + 1} was not being read while unit {j} was decoded"
        return real_transform(batch, **kwargs)

    monkeypatch.setattr(stream, "_unit_rows", rows)
    monkeypatch.setattr(transforms, "train_transform", transform)
    out = list(stream.decode_train_units(_block(units), pairs=bank, image_size=SIZE, base_seed=0))
    assert reads == [(u["uri"], u["row_group"]) for u in units]  # in the given (plan) order
    assert sum(len(o["id"]) for o in out) == sum(u["rows"] for u in units)
    assert np.concatenate([o["pos"] for o in out]).tolist() == list(range(sum(u["rows"] for u in units)))


_FAULTS_SCRIPT = """
import ctypes, resource, sys
import numpy as np
from pconv.data import allocator
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KB pages only, so fault counts do not depend
                                         # on whether the kernel found free 2 MB huge pages this time
applied = allocator.reuse_freed_memory() if sys.argv[1] == "tune" else False
def churn():  # allocate, touch and free a 48 MB buffer (above glibc's largest adaptive mmap threshold)
    a = np.empty(48 * 2**20, np.uint8)
    a.fill(1)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="malloc tuning is glibc-only")
def test_reuse_freed_memory_stops_page_faults_on_reallocation():
    """After reuse_freed_memory() a freed large buffer is reused: allocating it again costs no page faults
    (each fresh mmap page-faults on first touch). PCONV_MALLOC_TUNING=0 opts out."""
    import os
    import subprocess
    import sys

    def run(mode: str, **env: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1],
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env})
        applied, faults = out.stdout.split()
        return applied, int(faults)

    plain, tuned, opted_out = run("plain"), run("tune"), run("tune", PCONV_MALLOC_TUNING="0")
    assert plain[0] == "False" and tuned[0] == "True" and opted_out[0] == "False"
    assert plain[1] >= 100, plain  # 10 x 48 MB fresh mappings: ~120,000 faults of 4 KB pages
    assert tuned[1] * 20 < plain[1], (tuned, plain)
    assert opted_out[1] * 2 > plain[1], (opted_out, plain)


def test_decode_tasks_and_training_workers_tune_malloc(prepared_shards, monkeypatch):
    """The processes that allocate per image (read/decode tasks) and per batch (training workers) call it."""
    import inspect

    from pconv.train import loop

    calls = []
    monkeypatch.setattr(stream, "reuse_freed_memory", lambda: calls.append(1) or True)
    unit = stream.read_units(prepared_shards["images"], "train")[0]
    next(stream.decode_train_units(_block([unit]), pairs=transforms.load_mask_bank(prepared_shards["masks"]),
                                   image_size=SIZE, base_seed=0))
    assert calls == [1]
    assert "reuse_freed_memory()" in inspect.getsource(loop.train_loop_per_worker)


def test_read_ahead_reads_the_next_unit_while_the_caller_decodes_this_one(monkeypatch):
    """Decode tasks read unit j + 1 in a background thread while decoding unit j: units come back in order, each
    read once with its own seed, and unit 1's read starts before unit 0 is released."""
    import threading

    started = {i: threading.Event() for i in range(3)}
    reads = []

    def fake_rows(uri, group, unit_rand, base_seed):
        reads.append((uri, group, unit_rand, base_seed, threading.current_thread().name))
        started[group].set()
        return (np.array([f"{uri}/{group}"], dtype=object),) * 3

    monkeypatch.setattr(stream, "_unit_rows", fake_rows)
    todo = [("s3://b/a.parquet", g, 0.1 * g) for g in range(3)]
    units = stream._read_ahead(todo, 7)
    uri, group, (keys, _, _) = next(units)
    assert (uri, group, keys[0]) == ("s3://b/a.parquet", 0, "s3://b/a.parquet/0")
    assert started[1].wait(timeout=10), "unit 1 was not read while unit 0 was being decoded"
    assert [g for _, g, _ in units] == [1, 2]
    assert [(r[1], r[2], r[3]) for r in reads] == [(0, 0.0, 7), (1, 0.1, 7), (2, 0.2, 7)]
    assert all(r[4].startswith("pconv-read") for r in reads)
    assert list(stream._read_ahead([], 0)) == []


def test_scheduling_settings_exist_in_this_ray_and_stay_on_our_dataset(ray_local, prepared_shards):
    """WorkerDatasets sets two DataContext fields by name; a renamed field would be a silent no-op (dataclass
    instances accept any attribute), so check they are real fields and that other datasets keep the defaults."""
    import dataclasses

    from ray.data import DataContext

    fields = {f.name for f in dataclasses.fields(DataContext)}
    assert {"op_resource_reservation_enabled", "downstream_capacity_backpressure_ratio",
            "target_max_block_size"} <= fields
    ds = _datasets(prepared_shards, seed=0).dataset(0)
    assert ds.context.op_resource_reservation_enabled is False
    assert ds.context.downstream_capacity_backpressure_ratio is None
    assert ds.context.execution_options.preserve_order is True
    assert DataContext.get_current().op_resource_reservation_enabled is True  # the process default is untouched
    assert DataContext.get_current().execution_options.preserve_order is False
